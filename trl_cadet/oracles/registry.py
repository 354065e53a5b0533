"""Turn the forms an oracle may be given in (a callable, a classifier model, a name, a path) into a callable."""

import os
from typing import Any


# Built-in oracles known by name, imported on first use: each pulls its own optional dependencies
BUILTIN_ORACLES = {
    "detoxify": "trl_cadet.oracles.detoxify:DetoxifyOracle",
    "jigsaw": "trl_cadet.oracles.jigsaw:JigsawOracle",
    "profanity": "trl_cadet.oracles.profanity:ProfanityCheckOracle",
}


def load_oracle(oracle: Any, **kwargs):
    """Resolve one oracle, as `GRPOTrainer` resolves a reward function.

    Args:
        oracle: a callable `(prompts, completions, **kwargs) -> list[float]`; a sequence-classification
            `PreTrainedModel`; a built-in name (`"detoxify"`, `"jigsaw"`, `"profanity"`); or the path or Hub id of a
            sequence-classification model.
        **kwargs: passed to the built-in oracle's or `ClassifierOracle`'s constructor.
    """
    from transformers import PreTrainedModel

    if isinstance(oracle, str):
        if oracle.lower() in BUILTIN_ORACLES:
            import importlib

            module, name = BUILTIN_ORACLES[oracle.lower()].split(":")
            return getattr(importlib.import_module(module), name)(**kwargs)
        from .classifier import ClassifierOracle

        if not os.path.exists(oracle) and "/" not in oracle:
            raise ValueError(
                f"Unknown oracle or judge {oracle!r}. Pass a callable, a sequence-classification model, one of the built-in "
                f"names {sorted(BUILTIN_ORACLES)}, or the path of a sequence-classification model."
            )
        return ClassifierOracle(oracle, **kwargs)
    if isinstance(oracle, PreTrainedModel):
        from .classifier import ClassifierOracle

        return ClassifierOracle(oracle, **kwargs)
    if callable(oracle):
        return oracle
    raise TypeError(
        f"An oracle must be a callable, a sequence-classification model, a built-in name or a model path; got "
        f"{type(oracle).__name__}."
    )
