__version__ = "0.1.0.dev0"

from .cadet_config import CADETConfig
from .cadet_trainer import CADETTrainer
from .modeling_nado import NADOConfig, NADOModel
from .nado import cadet_kl, importance_weights, nado_loss, sequence_logprobs, target_logprobs


__all__ = [
    "CADETConfig",
    "CADETTrainer",
    "NADOConfig",
    "NADOModel",
    "cadet_kl",
    "importance_weights",
    "nado_loss",
    "sequence_logprobs",
    "target_logprobs",
]
