"""An oracle over any 🤗 Transformers sequence-classification model (a toxicity classifier, a reward model, ...)."""

import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .base import completion_text


logger = logging.getLogger(__name__)

_HARM_WORDS = r"(toxic|insult|threat|obscen|hate|offensive|abus|harass|profan|identity[\s_-]?attack|sexual)"
_HARM = re.compile(_HARM_WORDS, re.IGNORECASE)
_NOT_HARM = re.compile(r"\b(non|not|no)[\s_-]?" + _HARM_WORDS, re.IGNORECASE)


def looks_toxic(label_name: str) -> bool:
    """Whether a label name means toxicity (`"toxic"`, `"severe_toxic"`, `"insult"`, `"hate"`; not `"non-toxic"`)."""
    return bool(_HARM.search(label_name)) and not _NOT_HARM.search(label_name)


class ClassifierOracle:
    """Oracle scoring completions with a sequence-classification model.

    The model gives a probability `p` for one of its labels: `sigmoid(logit)` for a single-logit model, a sigmoid
    per label for a multi-label model (`config.problem_type == "multi_label_classification"`), a softmax over the
    labels otherwise. The oracle returns `p` as the satisfaction score if `higher_is_better`, else `1 - p`.

    Models are accepted as in TRL's `GRPOTrainer` reward models: a loaded model or a path/Hub id, with the tokenizer
    loaded from the same place when not given, and the EOS token used for padding when there is no padding token.

    Args:
        model (`str` or [`~transformers.PreTrainedModel`]):
            The classifier, or its path or Hub id (loaded with
            [`~transformers.AutoModelForSequenceClassification.from_pretrained`]).
        tokenizer ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            Its tokenizer. Defaults to the one saved with the model.
        label (`int` or `str`, *optional*):
            Label whose probability is read: an index or a name from `config.id2label`. Defaults to the only logit
            of a single-logit model, else to a label whose name contains "toxic" (`"toxic"`, `"TOXICITY"`, not
            `"non-toxic"`), else to label 1 of a two-label model.
        higher_is_better (`bool`, *optional*):
            Whether a high probability of `label` means the constraint is satisfied. Defaults to `False` when the
            label name means toxicity (`"toxic"`, `"insult"`, `"threat"`, `"hate"`, ...; see `looks_toxic`), else
            `True`.
        with_prompt (`bool`, *optional*, defaults to `False`):
            Classify the prompt text followed by the completion text, instead of the completion alone. For
            conversational data, the text of the last message of each is used.
        batch_size (`int`, *optional*, defaults to `32`):
            Number of texts scored per forward pass.
        max_length (`int`, *optional*):
            Truncation length in tokens. Defaults to the tokenizer's `model_max_length`, or to the model's
            `max_position_embeddings` when the tokenizer sets none.
        device (`str` or `torch.device`, *optional*):
            Device to move the model to. Defaults to the device of a given model, and to CUDA when available (else
            CPU) for a model loaded from a path.
        model_init_kwargs (`dict`, *optional*):
            Keyword arguments for `from_pretrained` when `model` is a path (`dtype`, `revision`, ...).
    """

    def __init__(
        self,
        model: str | os.PathLike | PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None = None,
        label: int | str | None = None,
        higher_is_better: bool | None = None,
        with_prompt: bool = False,
        batch_size: int = 32,
        max_length: int | None = None,
        device: str | torch.device | None = None,
        model_init_kwargs: dict[str, Any] | None = None,
    ):
        if isinstance(model, str | os.PathLike):
            model_id = os.fspath(model)
            model = AutoModelForSequenceClassification.from_pretrained(model_id, **(model_init_kwargs or {}))
            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(model_id, revision=(model_init_kwargs or {}).get("revision"))
        elif not isinstance(model, PreTrainedModel):
            raise TypeError(
                f"`model` must be a path or Hub id, or a transformers `PreTrainedModel`, got {type(model).__name__}."
            )
        elif tokenizer is None:
            if not model.config._name_or_path:
                raise ValueError(
                    "The model was not loaded from a path, so its tokenizer cannot be found; pass `tokenizer=`."
                )
            tokenizer = AutoTokenizer.from_pretrained(model.config._name_or_path)
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size}.")

        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise ValueError(
                    "The tokenizer has neither a padding token nor an EOS token to pad batches with; set "
                    "`tokenizer.pad_token` before passing it."
                )
            tokenizer.pad_token = tokenizer.eos_token
        # Decoder classifiers read the logits at the last non-padding token, found through `pad_token_id`.
        model.config.get_text_config().pad_token_id = tokenizer.pad_token_id

        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.with_prompt = with_prompt
        self.batch_size = batch_size
        self.max_length = max_length if max_length is not None else self._default_max_length()
        self.multi_label = model.config.problem_type == "multi_label_classification"
        self.label_index, self.label_name = self._resolve_label(label)
        if higher_is_better is None:
            higher_is_better = not looks_toxic(self.label_name)
        self.higher_is_better = higher_is_better
        self.__name__ = (model.config._name_or_path or type(self).__name__).rstrip("/").split("/")[-1]

    def _default_max_length(self) -> int | None:
        max_length = self.tokenizer.model_max_length
        if max_length is None or max_length > 1_000_000:  # transformers' "no limit set" sentinel is ~1e30
            max_length = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        return max_length

    def _resolve_label(self, label: int | str | None) -> tuple[int, str]:
        num_labels = self.model.config.num_labels
        id2label = {int(i): str(name) for i, name in (self.model.config.id2label or {}).items()}
        names = [id2label.get(i, f"LABEL_{i}") for i in range(num_labels)]
        if isinstance(label, bool) or not isinstance(label, int | str | None):
            raise TypeError(f"`label` must be a label index or name, got {label!r}.")
        if isinstance(label, int):
            if not 0 <= label < num_labels:
                raise ValueError(f"`label={label}` is out of range: the classifier has {num_labels} labels {names}.")
            return label, names[label]
        if isinstance(label, str):
            if label not in names:
                raise ValueError(f"The classifier has no label `{label}`; its labels are {names}.")
            return names.index(label), label
        toxic = [i for i, name in enumerate(names) if "toxic" in name.lower() and looks_toxic(name)]
        if toxic:
            exact = [i for i in toxic if names[i].lower() in {"toxic", "toxicity"}]
            index = (exact or toxic)[0]
            return index, names[index]
        if num_labels == 1:
            return 0, names[0]
        if num_labels == 2:
            index = 1
            logger.warning(
                "No label of the classifier %s names toxicity; reading label %d (`%s`) as the probability that the "
                "constraint is satisfied. Pass `label=` and `higher_is_better=` to say which label to read.",
                names,
                index,
                names[index],
            )
            return index, names[index]
        raise ValueError(
            f"Cannot tell which label of the classifier to read: none of {names} names toxicity. Pass `label=` an "
            "index or a name from this list."
        )

    def _texts(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[str]:
        texts = [completion_text(c) for c in completions]
        if not self.with_prompt:
            return texts
        if len(prompts) != len(completions):
            raise ValueError(
                f"Got {len(prompts)} prompts for {len(completions)} completions; `with_prompt=True` needs one prompt "
                "per completion."
            )
        return [completion_text(p) + t for p, t in zip(prompts, texts, strict=True)]

    @torch.no_grad()
    def probabilities(self, texts: Sequence[str]) -> list[float]:
        """Probability of the chosen label for each text."""
        probabilities = []
        for start in range(0, len(texts), self.batch_size):
            inputs = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                return_tensors="pt",
                padding=True,
                padding_side="right",
                truncation=self.max_length is not None,
                max_length=self.max_length,
            ).to(self.model.device)
            logits = self.model(**inputs).logits.float()
            if logits.shape[-1] == 1 or self.multi_label:
                probs = torch.sigmoid(logits[:, self.label_index])
            else:
                probs = torch.softmax(logits, dim=-1)[:, self.label_index]
            probabilities.extend(probs.tolist())
        return probabilities

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs) -> list[float]:
        probabilities = self.probabilities(self._texts(prompts, completions))
        return probabilities if self.higher_is_better else [1.0 - p for p in probabilities]
