__version__ = "0.1.0.dev0"

from . import _quiet  # noqa: F401  (first: before any library that imports bitsandbytes)
from .cadet_config import CADETConfig
from .cadet_trainer import CADETTrainer
from .decoding import NADOLogitsProcessor
from .modeling_nado import NADOConfig, NADOModel
from .nado import cadet_kl, guided_logits, importance_weights, nado_loss, sequence_logprobs, target_logprobs


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
]
