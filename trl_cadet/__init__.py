__version__ = "0.1.0.dev0"

import importlib
from typing import TYPE_CHECKING

from . import _quiet  # noqa: F401  (first: before any library that imports bitsandbytes)


# The public names are imported on first use, as TRL does: `import trl_cadet` (or `trl_cadet.nado`) does not pay for
# TRL, transformers' Trainer, PEFT and bitsandbytes until a name that needs them is used
_LAZY = {
    "CADETConfig": "cadet_config",
    "CADETTrainer": "cadet_trainer",
    "NADOConfig": "modeling_nado",
    "NADOLogitsProcessor": "decoding",
    "NADOModel": "modeling_nado",
    "cadet_kl": "nado",
    "guided_logits": "nado",
    "importance_weights": "nado",
    "nado_loss": "nado",
    "sequence_logprobs": "nado",
    "target_logprobs": "nado",
    "target_token_weights": "nado",
}
__all__ = [
    "CADETConfig",
    "CADETTrainer",
    "NADOConfig",
    "NADOLogitsProcessor",
    "NADOModel",
    "cadet_kl",
    "guided_logits",
    "importance_weights",
    "nado_loss",
    "sequence_logprobs",
    "target_logprobs",
    "target_token_weights",
]

if TYPE_CHECKING:
    from .cadet_config import CADETConfig
    from .cadet_trainer import CADETTrainer
    from .decoding import NADOLogitsProcessor
    from .modeling_nado import NADOConfig, NADOModel
    from .nado import (
        cadet_kl,
        guided_logits,
        importance_weights,
        nado_loss,
        sequence_logprobs,
        target_logprobs,
        target_token_weights,
    )


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
