"""A toxicity oracle over the `detoxify` package (Jigsaw-trained BERT/RoBERTa/ALBERT classifiers by Unitary)."""

import logging
import os
import pickle
from collections.abc import Sequence
from urllib.parse import urlparse

import torch
from huggingface_hub import is_offline_mode

from .base import ToxicityOracle


logger = logging.getLogger(__name__)

# Detoxify renames the Jigsaw class names of its older checkpoints so that all models share one vocabulary.
_DETOXIFY_CLASS_RENAMES = {"toxic": "toxicity", "identity_hate": "identity_attack", "severe_toxic": "severe_toxicity"}


def _offline() -> bool:
    flags = (os.environ.get(name, "").upper() for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return is_offline_mode() or any(flag in {"1", "ON", "YES", "TRUE"} for flag in flags)


def _as_list(scores: float | list[float]) -> list[float]:
    # `Detoxify.predict` squeezes its output, so a batch of one text gives a bare float.
    return scores if isinstance(scores, list) else [scores]


class DetoxifyOracle(ToxicityOracle):
    """Oracle scoring completions with a [Detoxify](https://github.com/unitaryai/detoxify) model.

    The toxicity of a completion is the highest probability among the chosen `attributes`; the oracle returns the
    satisfaction score `1 - toxicity`. The model is loaded on the first call.

    Detoxify downloads its weights from GitHub (cached in the torch hub folder) and the tokenizer and config of the
    base model from the Hugging Face Hub. To run offline, pass `checkpoint` (a local `.ckpt` file) and
    `huggingface_config_path` (a local folder with the matching tokenizer and config, as written by
    `save_pretrained`); nothing is then fetched.

    Args:
        model_type (`str`, *optional*, defaults to `"original"`):
            Detoxify model to download when `checkpoint` is `None`: `"original"`, `"unbiased"`, `"multilingual"`,
            `"original-small"` or `"unbiased-small"`.
        checkpoint (`str`, *optional*):
            Path to a local Detoxify checkpoint (`.ckpt`). Overrides `model_type`.
        huggingface_config_path (`str`, *optional*):
            Local folder with the tokenizer and config of the checkpoint's base model (for example
            `bert-base-uncased` for `"original"`), for offline loading.
        device (`str` or `torch.device`, *optional*):
            Device to run the model on. Defaults to CUDA when available, else CPU.
        attributes (`str` or `Sequence[str]`, *optional*, defaults to `("toxicity",)`):
            Classes of the model whose maximum is the toxicity, for example `("toxicity", "insult", "threat")`.
        batch_size (`int`, *optional*, defaults to `32`):
            Number of texts scored per forward pass.
    """

    def __init__(
        self,
        model_type: str = "original",
        checkpoint: str | os.PathLike | None = None,
        huggingface_config_path: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        attributes: str | Sequence[str] = ("toxicity",),
        batch_size: int = 32,
    ):
        from detoxify.detoxify import MODEL_URLS

        if checkpoint is None and model_type not in MODEL_URLS:
            raise ValueError(
                f"Unknown Detoxify model_type `{model_type}`. Use one of {sorted(MODEL_URLS)}, or pass `checkpoint=` "
                "the path of a local Detoxify checkpoint."
            )
        if checkpoint is not None and not os.path.isfile(checkpoint):
            raise FileNotFoundError(
                f"The Detoxify checkpoint `{checkpoint}` does not exist; pass the path of a .ckpt file."
            )
        if huggingface_config_path is not None and not os.path.isdir(huggingface_config_path):
            raise FileNotFoundError(
                f"`huggingface_config_path` must be a local folder holding the tokenizer and config of the model, "
                f"got `{huggingface_config_path}`."
            )
        if isinstance(attributes, str):
            attributes = (attributes,)
        if len(attributes) == 0:
            raise ValueError("`attributes` must name at least one class of the Detoxify model, e.g. ('toxicity',).")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size}.")
        self.model_type = model_type
        self.checkpoint = None if checkpoint is None else os.fspath(checkpoint)
        self.huggingface_config_path = None if huggingface_config_path is None else os.fspath(huggingface_config_path)
        self.device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        self.attributes = tuple(attributes)
        self.batch_size = batch_size
        self._detoxify = None

    @property
    def detoxify(self):
        """The underlying `detoxify.Detoxify` model, loaded on first access."""
        if self._detoxify is None:
            detoxify = self._load()
            unknown = [name for name in self.attributes if name not in detoxify.class_names]
            if unknown:
                raise ValueError(
                    f"The {self._source()} has no class {unknown}; it predicts {detoxify.class_names}. Pass "
                    "`attributes=` a subset of these."
                )
            self._detoxify = detoxify
        return self._detoxify

    @property
    def class_names(self) -> list[str]:
        """Classes predicted by the model (loads it)."""
        return list(self.detoxify.class_names)

    def _source(self) -> str:
        return f"checkpoint `{self.checkpoint}`" if self.checkpoint else f"Detoxify model `{self.model_type}`"

    def _offline_error(self, cause: str) -> RuntimeError:
        return RuntimeError(
            f"Could not load the {self._source()}: {cause}. Detoxify downloads its weights from GitHub (cached in "
            f"`{os.path.join(torch.hub.get_dir(), 'checkpoints')}`) and the tokenizer and config of its base model "
            "from the Hugging Face Hub. Either load it once with network access so both are cached, or pass "
            "`checkpoint=` a local Detoxify .ckpt file together with `huggingface_config_path=` a local folder "
            "holding the matching tokenizer and config (saved with `save_pretrained`), or use the offline "
            "`JigsawOracle` from `trl_cadet.oracles`."
        )

    def _load(self):
        from detoxify import Detoxify
        from detoxify.detoxify import MODEL_URLS

        if self.checkpoint is None:
            url = MODEL_URLS[self.model_type]
            cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))
            # Fail at once rather than wait on a download that offline mode forbids (or a firewall drops).
            if _offline() and not os.path.isfile(cached):
                raise self._offline_error(f"offline mode is on (HF_HUB_OFFLINE) and `{cached}` is not cached")
        try:
            if self.huggingface_config_path is None:
                return Detoxify(model_type=self.model_type, checkpoint=self.checkpoint, device=self.device)
            return self._load_with_local_config()
        except OSError as error:  # urllib's URLError and transformers' "couldn't connect" errors are OSErrors
            raise self._offline_error(f"{type(error).__name__}: {str(error).rstrip('.')}") from error

    def _load_with_local_config(self):
        # `detoxify.Detoxify` (<= 0.5.x) still fetches the base model's config from the Hub when
        # `huggingface_config_path` is given, which fails offline (unitaryai/detoxify#126). This follows its
        # `load_checkpoint` but reads that config from the local folder.
        import transformers
        from detoxify import Detoxify
        from detoxify.detoxify import MODEL_URLS

        # Weights only: a checkpoint is data, and unpickling arbitrary objects would run code from the file
        try:
            if self.checkpoint is None:
                loaded = torch.hub.load_state_dict_from_url(
                    MODEL_URLS[self.model_type], map_location=self.device, weights_only=True
                )
            else:
                loaded = torch.load(self.checkpoint, map_location=self.device, weights_only=True)
        except pickle.UnpicklingError as error:
            raise ValueError(
                f"`{self.checkpoint}` is not a Detoxify checkpoint made of tensors and plain data, so it was not "
                f"loaded ({str(error).splitlines()[0]}). Pass a checkpoint saved by Detoxify."
            ) from error
        if "config" not in loaded or "state_dict" not in loaded:
            raise ValueError(
                f"`{self.checkpoint}` is not a Detoxify checkpoint: it must hold the `config` it was trained with and "
                "the `state_dict`."
            )
        arch = loaded["config"]["arch"]["args"]
        model_class = getattr(transformers, arch["model_name"])
        config = model_class.config_class.from_pretrained(
            self.huggingface_config_path, num_labels=arch["num_classes"], local_files_only=True
        )
        model = model_class.from_pretrained(
            None, config=config, state_dict=loaded["state_dict"], local_files_only=True
        )
        tokenizer = getattr(transformers, arch["tokenizer_name"]).from_pretrained(
            self.huggingface_config_path, local_files_only=True
        )
        detoxify = Detoxify.__new__(Detoxify)  # `Detoxify.__init__` would load again; fill in what `predict` uses
        detoxify.model = model.to(self.device)
        detoxify.tokenizer = tokenizer
        detoxify.class_names = [
            _DETOXIFY_CLASS_RENAMES.get(name, name) for name in loaded["config"]["dataset"]["args"]["classes"]
        ]
        detoxify.device = self.device
        return detoxify

    def toxicity(self, texts: list[str]) -> list[float]:
        if len(texts) == 0:
            return []
        detoxify = self.detoxify
        toxicity = []
        for start in range(0, len(texts), self.batch_size):
            predictions = detoxify.predict(list(texts[start : start + self.batch_size]))
            per_attribute = [_as_list(predictions[name]) for name in self.attributes]
            toxicity.extend(max(values) for values in zip(*per_attribute, strict=True))
        return toxicity
