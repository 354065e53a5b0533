"""Reading a TRL dataset for CADET: where the oracle phase's prompts are, whether the corpus can be trained on, and the
prompts themselves."""

import logging
import random
from dataclasses import dataclass
from typing import Any

import pyarrow.compute as pc
import torch
from datasets import Dataset, IterableDataset
from transformers import PreTrainedTokenizerBase
from trl.data_utils import get_dataset_column_names, maybe_convert_to_chatml

from .sampling import tokenize_prompts


logger = logging.getLogger(__name__)

# A streamed prompt source may never end: the oracle phase draws its prompts from this many first rows
STREAMED_PROMPT_ROWS = 1000


def _last_assistant_turn(messages: list[dict]) -> int | None:
    """Index of a conversation's last assistant turn: the oracle phase's prompt is the conversation before it."""
    return max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)


def prompt_column(dataset: Dataset | IterableDataset, text_field: str = "text", name: str = "dataset") -> str:
    """The column the oracle phase takes its prompts from, or a `ValueError` saying what to change."""
    columns = get_dataset_column_names(dataset)
    for column in ("prompt", "messages", "conversations", text_field, "input_ids"):
        if column in columns:
            return column
    raise ValueError(
        f"Cannot find prompts for the oracle phase in the {name}, whose columns are {columns}. Give it a 'prompt' "
        f"column (standard or conversational), a conversational 'messages' column or a text column named "
        f"{text_field!r} (`dataset_text_field`), or pass `prompt_dataset=` with a 'prompt' column."
    )


def formatted_corpus(dataset: Dataset | IterableDataset, formatting_func, text_field: str = "text"):
    """The corpus as `SFTTrainer` trains on it with a `formatting_func`: a text column `text_field` holding
    `formatting_func(example)`, for the oracle phase's prompts and the corpus completions. A corpus with a 'prompt'
    column (the prompts to use) or already tokenized ('input_ids', which SFTTrainer does not format) is returned as
    it is."""
    columns = get_dataset_column_names(dataset)
    if "prompt" in columns or "input_ids" in columns:
        return dataset
    return dataset.map(lambda example: {text_field: formatting_func(example)}, remove_columns=columns)


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
    columns = get_dataset_column_names(dataset)
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
            last = _last_assistant_turn(messages)
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


@dataclass
class AssistantMarkers:
    """The tokens that open an assistant turn in a chat template (its generation prompt) and the token that closes it."""

    header: list[int]
    end: int


def assistant_markers(tokenizer) -> AssistantMarkers | None:
    """Read the assistant turn's opening tokens and closing token off the tokenizer's chat template, by rendering a
    one-turn conversation with and without its generation prompt and with a reply. `None` when the template has no
    generation prompt or closes turns with no special token (CADET then regularises every trained-on token)."""
    if getattr(tokenizer, "chat_template", None) is None:
        return None

    def ids(messages, **kwargs) -> list[int]:
        text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
        return tokenizer(text=text, add_special_tokens=False)["input_ids"]

    user = [{"role": "user", "content": "Hello."}]
    try:
        plain = ids(user)
        prompted = ids(user, add_generation_prompt=True)
        full = ids(user + [{"role": "assistant", "content": "Fine, thanks."}])
    except Exception as error:  # a template that refuses this conversation (e.g. one that needs a system turn)
        logger.warning("Could not read the assistant markers off the chat template (%s).", error)
        return None
    common = next((i for i, (a, b) in enumerate(zip(plain, prompted)) if a != b), min(len(plain), len(prompted)))
    header = prompted[common:]
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    if not header or full[: len(prompted)] != prompted:
        return None
    end = next((token for token in full[len(prompted) :] if token in special), None)
    return None if end is None else AssistantMarkers(header=header, end=end)


def assistant_token_mask(input_ids: torch.Tensor, markers: AssistantMarkers) -> torch.Tensor:
    """`[B, L]` bool: the tokens of assistant turns, from the first token after an assistant header to the closing token
    included (the model learns to stop there); system prompts, user turns and the headers themselves are excluded."""
    batch, length = input_ids.shape
    header = torch.tensor(markers.header, device=input_ids.device)
    width = len(markers.header)
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    if length > width:
        found = (input_ids.unfold(1, width, 1) == header).all(-1)  # [B, L - width + 1]: a header begins here
        starts[:, width:] = found[:, : length - width]  # the turn begins right after its header
    positions = torch.arange(length, device=input_ids.device).expand(batch, length)
    none = torch.full_like(positions, -1)
    last_start = torch.where(starts, positions, none).cummax(dim=1).values
    last_end = torch.where(input_ids == markers.end, positions, none).cummax(dim=1).values
    end_before = torch.cat([none[:, :1], last_end[:, :-1]], dim=1)  # the last closing token strictly before t
    return (last_start >= 0) & (last_start > end_before)


@dataclass
class CorpusCompletions:
    """Completions of the training corpus as the oracle phase sees its own samples: the prompt (for the oracles), its
    token ids (rendered as for sampling) and the completion's token ids (ending with the turn's closing token)."""

    prompts: list[Any]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]


def extract_completions(
    dataset: Dataset | IterableDataset,
    tokenizer,
    count: int,
    max_completion_length: int,
    corpus_prompt_length: int,
    text_field: str = "text",
    seed: int = 0,
) -> CorpusCompletions:
    """Up to `count` completions drawn from the corpus (seeded), cut to `max_completion_length` tokens.

    A conversational corpus gives its last assistant turn after the conversation before it, a prompt-completion corpus
    its completions, a text corpus the `max_completion_length` tokens after its first `corpus_prompt_length` tokens.
    Rows whose chat template does not render the prompt as a prefix of the whole conversation are skipped.
    """

    if isinstance(dataset, Dataset):
        order = random.Random(seed).sample(range(len(dataset)), min(count, len(dataset)))
        rows = (dataset[i] for i in order)
    else:
        rows = iter(dataset)
    columns = get_dataset_column_names(dataset)
    eos = {tokenizer.eos_token_id}
    markers = assistant_markers(tokenizer)
    if markers is not None:
        eos.add(markers.end)
    found = CorpusCompletions([], [], [])
    for example in rows:
        if len(found.prompts) >= count:
            break
        if "messages" in columns or "conversations" in columns:
            messages = maybe_convert_to_chatml(example)["messages"]
            last = _last_assistant_turn(messages)
            if not last:
                continue
            prompt, completion = messages[:last], messages[last : last + 1]
        elif "prompt" in columns and "completion" in columns:
            prompt, completion = example["prompt"], example["completion"]
        elif text_field in columns:
            ids = tokenizer(text=example[text_field], add_special_tokens=False)["input_ids"]
            if len(ids) <= corpus_prompt_length:
                continue
            prompt = tokenizer.decode(ids[:corpus_prompt_length])
            found.prompts.append(prompt)
            found.prompt_ids.append(tokenize_prompts([prompt], tokenizer)[0])
            found.completion_ids.append(ids[corpus_prompt_length : corpus_prompt_length + max_completion_length])
            continue
        else:
            return found
        conversational = isinstance(prompt, list)
        if conversational:
            whole = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        else:
            whole = prompt + completion + (tokenizer.eos_token or "")
        prompt_ids = tokenize_prompts([prompt], tokenizer)[0]
        whole_ids = tokenizer(text=whole, add_special_tokens=not conversational)["input_ids"]
        if whole_ids[: len(prompt_ids)] != prompt_ids or len(whole_ids) == len(prompt_ids):
            continue
        completion_ids = whole_ids[len(prompt_ids) :]
        cut = next((i + 1 for i, token in enumerate(completion_ids) if token in eos), len(completion_ids))
        found.prompts.append(prompt)
        found.prompt_ids.append(prompt_ids)
        found.completion_ids.append(completion_ids[: min(cut, max_completion_length)])
    return found


def row_completions(example: dict[str, Any], text_field: str = "text") -> list[tuple[Any, Any]]:
    """The `(prompt, completion)` pairs of one corpus row as TRL's reward functions get them, in the order their tokens
    come: each assistant turn of a conversation after the conversation before it (the turn as a one-message list), a
    prompt-completion row's pair, or a text row whole after an empty prompt."""
    if "messages" in example or "conversations" in example:
        messages = maybe_convert_to_chatml(example)["messages"]
        return [(messages[:i], messages[i : i + 1]) for i, m in enumerate(messages) if m["role"] == "assistant"]
    if "prompt" in example and "completion" in example:
        return [(example["prompt"], example["completion"])]
    return [("", example[text_field])]


def tokenizer_of(processing_class) -> PreTrainedTokenizerBase | None:
    """The tokenizer of a tokenizer or of a processor (which holds one)."""
    if processing_class is None or isinstance(processing_class, PreTrainedTokenizerBase):
        return processing_class
    return getattr(processing_class, "tokenizer", None)


def oracle_prompts(dataset, name: str, tokenizer, args) -> tuple[list[Any], list[list[int]]]:
    """The oracle phase's prompts and their token ids (`args` is a `CADETConfig`), checked now rather than after
    hours of training."""
    column = prompt_column(dataset, args.dataset_text_field, name)
    max_rows = None
    if isinstance(dataset, IterableDataset):
        max_rows = STREAMED_PROMPT_ROWS
        logger.warning(
            "The %s is streamed (an IterableDataset), so the oracle phase takes its prompts from its first %d rows "
            "instead of reading the whole stream. To choose them, pass `prompt_dataset=` a `Dataset` of prompts.",
            name,
            max_rows,
        )
    prompts = extract_prompts(
        dataset, tokenizer, args.corpus_prompt_length, args.dataset_text_field, name=name, max_rows=max_rows
    )
    if not prompts:
        why = "every prompt is empty"
        if column in ("messages", "conversations"):
            why = "no conversation has an assistant turn to cut before"
        raise ValueError(
            f"No prompt for the oracle phase could be taken from the {name}'s {column!r} column: {why}. Pass "
            "`prompt_dataset=` with a non-empty 'prompt' column."
        )
    prompt_ids = tokenize_prompts(prompts, tokenizer)
    if args.max_prompt_length is not None:
        too_long = [i for i, ids in enumerate(prompt_ids) if len(ids) > args.max_prompt_length]
        if too_long:
            longest = max(len(prompt_ids[i]) for i in too_long)
            raise ValueError(
                f"{len(too_long)} of {len(prompt_ids)} oracle-phase prompts are longer than "
                f"`max_prompt_length={args.max_prompt_length}` tokens (the longest has {longest}, e.g. prompt "
                f"#{too_long[0]}). Raise `max_prompt_length`, or shorten or filter those prompts."
            )
    return prompts, prompt_ids
