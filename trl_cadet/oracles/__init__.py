"""Oracles: sequence-level judges in TRL's reward-function convention, returning a satisfaction score in [0, 1].

The model-backed oracles import their heavy dependencies only when built, so importing this package is cheap.
"""

from .base import OracleFunc, OracleScores, ToxicityOracle, call_oracles, completion_text, oracle_name
from .classifier import ClassifierOracle
from .detoxify import DetoxifyOracle
from .jigsaw import JigsawOracle
from .profanity import ProfanityCheckOracle
from .registry import BUILTIN_ORACLES, load_oracle


__all__ = [
    "BUILTIN_ORACLES",
    "ClassifierOracle",
    "DetoxifyOracle",
    "JigsawOracle",
    "OracleFunc",
    "OracleScores",
    "ProfanityCheckOracle",
    "ToxicityOracle",
    "call_oracles",
    "completion_text",
    "load_oracle",
    "oracle_name",
]
