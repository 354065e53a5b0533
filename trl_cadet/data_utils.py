"""Reading a TRL dataset for CADET: where the oracle phase's prompts are, whether the corpus can be trained on, and the
prompts themselves."""

from typing import Any

import pyarrow.compute as pc
from datasets import Dataset, IterableDataset
from trl.data_utils import maybe_convert_to_chatml


def _column_names(dataset: Dataset | IterableDataset) -> list[str]:
    return dataset.column_names or list(next(iter(dataset)).keys())


def prompt_column(dataset: Dataset | IterableDataset, text_field: str = "text", name: str = "dataset") -> str:
    """The column the oracle phase takes its prompts from, or a `ValueError` saying what to change."""
    columns = _column_names(dataset)
    for column in ("prompt", "messages", "conversations", text_field, "input_ids"):
        if column in columns:
            return column
    raise ValueError(
        f"Cannot find prompts for the oracle phase in the {name}, whose columns are {columns}. Give it a 'prompt' "
        f"column (standard or conversational), a conversational 'messages' column or a text column named "
        f"{text_field!r} (`dataset_text_field`), or pass `prompt_dataset=` with a 'prompt' column."
    )


def _check_no_missing_values(dataset: Dataset | IterableDataset, columns: list[str]) -> None:
    """Raise, naming the row and the column, when a column SFTTrainer will read holds a missing value (None), which it
    would only report as a tokenizer error. Arrow keeps a count of them, so a `Dataset` is checked without reading it;
    a streamed dataset is not checked."""
    if not isinstance(dataset, Dataset):
        return
    for column in columns:
        values = dataset.with_format("arrow")[column]
        if values.null_count:
            row = pc.index(pc.is_null(values), True).as_py()
            raise ValueError(
                f"Row {row} of the train_dataset's {column!r} column is None ({values.null_count} rows are). Remove "
                f"or fill those rows, e.g. `dataset.filter(lambda row: row[{column!r}] is not None)`."
            )


def check_corpus_columns(dataset: Dataset | IterableDataset, text_field: str = "text") -> None:
    """Raise, before `SFTTrainer` tokenizes anything, when no column of the corpus is one it can train on."""
    columns = _column_names(dataset)
    used = [c for c in ("messages", "conversations", text_field, "input_ids") if c in columns]
    if used:
        _check_no_missing_values(dataset, used)
        return
    if "prompt" in columns and "completion" in columns:
        _check_no_missing_values(dataset, ["prompt", "completion"])
        return
    if "prompt" in columns:
        raise ValueError(
            f"The train_dataset has a 'prompt' column but no 'completion' column (columns: {columns}), so there is "
            "nothing to fine-tune on. Pass the corpus as `train_dataset` (text, 'messages', or 'prompt' and "
            "'completion' columns) and a prompt-only dataset as `prompt_dataset=`."
        )
    raise ValueError(
        f"The train_dataset has columns {columns}, none of which SFTTrainer can train on. Name the text column "
        f"{text_field!r} or set `dataset_text_field` to its name, use a conversational 'messages' column or "
        "'prompt' and 'completion' columns, or pass a `formatting_func`."
    )


def extract_prompts(
    dataset: Dataset | IterableDataset,
    processing_class,
    corpus_prompt_length: int,
    text_field: str = "text",
    name: str = "dataset",
    max_rows: int | None = None,
) -> list[Any]:
    """Prompts for the oracle phase, from a prompt dataset or from the corpus itself.

    A `prompt` column is used as is (standard or conversational). A conversational `messages` (or ShareGPT-style
    `conversations`) column gives the conversation up to its last assistant turn. A text column (`text_field`) or a
    tokenized `input_ids` column gives its first `corpus_prompt_length` tokens. Only the first `max_rows` rows are
    read when it is given (a streamed dataset may never end). A missing value or one of the wrong type raises a
    `ValueError` naming `name`, the row and the column.
    """
    column = prompt_column(dataset, text_field)
    prompts: list[Any] = []
    for row, example in enumerate(dataset):
        if max_rows is not None and row >= max_rows:
            break
        value = example[column]
        expected = (
            (str, list)
            if column == "prompt"
            else list
            if column in ("messages", "conversations", "input_ids")
            else str
        )
        if not isinstance(value, expected):
            kind = {"prompt": "a string or a list of chat messages", "input_ids": "a list of token ids"}.get(
                column, "a list of chat messages" if column in ("messages", "conversations") else "a string"
            )
            raise ValueError(
                f"Row {row} of the {name}'s {column!r} column holds {value!r} ({type(value).__name__}), but the oracle "
                f"phase needs {kind} there. Fix or remove that row (e.g. with `dataset.filter`), or pass "
                "`prompt_dataset=` with a 'prompt' column of strings."
            )
        if column == "prompt":
            prompts.append(value)
        elif column in ("messages", "conversations"):
            messages = maybe_convert_to_chatml(example)["messages"] if column == "conversations" else value
            last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
            if last:
                prompts.append(messages[:last])
        else:
            ids = value if column == "input_ids" else None
            if ids is None:
                ids = processing_class(text=value, add_special_tokens=False)["input_ids"]
            ids = ids[:corpus_prompt_length]
            if ids:
                prompts.append(processing_class.decode(ids, skip_special_tokens=column == "input_ids"))
    return [p for p in prompts if p]
