"""The oracle protocol and the plumbing that turns oracle scores into NADO labels.

An oracle follows TRL's reward-function convention: a callable ``oracle(prompts, completions, **kwargs)`` that
returns one float per completion. For CADET the float is a *satisfaction score* in ``[0, 1]``: 1 means the
completion satisfies the constraint (for detoxification: it is not toxic). ``None`` or NaN means "no verdict" and
drops the sample. Prompts and completions arrive in the dataset's format: strings, or lists of chat messages for
conversational data, as in `GRPOTrainer`.
"""

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm


logger = logging.getLogger(__name__)

OracleFunc = Callable[..., list[float | None]]


def completion_text(completion: Any) -> str:
    """Return the text of a completion given as a string or as a list of chat messages (the last message's)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        if isinstance(content, list):  # multimodal content blocks
            return "".join(block.get("text", "") for block in content if isinstance(block, dict))
        return content
    raise TypeError(
        f"A completion must be a string or a list of chat messages, got {type(completion).__name__}. Pass completions "
        "in the same format as the dataset's prompts."
    )


def oracle_name(oracle: Any) -> str:
    """A short name for logging, like TRL's reward function names."""
    name = getattr(oracle, "__name__", None)
    if name is None and hasattr(oracle, "config"):
        name = getattr(oracle.config, "_name_or_path", None)
    return (name or type(oracle).__name__).split("/")[-1]


class ToxicityOracle:
    """Base class for oracles built on a toxicity scorer.

    Subclasses implement `toxicity(texts) -> list[float]` (probability of toxicity in `[0, 1]`); calling the oracle
    returns the satisfaction score `1 - toxicity` of each completion, so it plugs into `CADETTrainer` and the
    evaluation tools alike.
    """

    def toxicity(self, texts: list[str]) -> list[float]:
        raise NotImplementedError

    @property
    def __name__(self) -> str:
        return type(self).__name__

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs) -> list[float]:
        texts = [completion_text(c) for c in completions]
        return [1.0 - float(t) for t in self.toxicity(texts)]


@dataclass
class OracleScores:
    """Scores of one labelling call. `scores[i]` is `None` when the sample was dropped.

    `num_failures` counts the oracle calls that raised (retries included); `errors` describes each oracle that still
    failed after its last retry, whose samples were dropped.
    """

    scores: list[float | None]
    per_oracle: dict[str, list[float | None]] = field(default_factory=dict)
    num_dropped: int = 0
    num_failures: int = 0
    errors: list[str] = field(default_factory=list)


def check_scores(name: str, scores: Any, n: int) -> list[float | None]:
    if scores is None or not hasattr(scores, "__len__"):
        raise TypeError(
            f"The oracle `{name}` returned {type(scores).__name__}; it must return a list with one float per "
            "completion (None to drop a sample)."
        )
    scores = list(scores)
    if len(scores) != n:
        raise ValueError(
            f"The oracle `{name}` returned {len(scores)} scores for {n} completions. An oracle must return exactly "
            "one score per completion, in order (None for a sample it cannot judge)."
        )
    checked = []
    for value in scores:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            checked.append(None)
            continue
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise TypeError(
                f"The oracle `{name}` returned {value!r} ({type(value).__name__}) as a score; each score must be a "
                "number in [0, 1], or None to drop the sample."
            ) from None
        if math.isnan(value):
            checked.append(None)
            continue
        if not 0.0 <= value <= 1.0:
            raise ValueError(
                f"The oracle `{name}` returned {value}, outside [0, 1]. CADET oracles return a satisfaction score: "
                "1 when the completion satisfies the constraint, 0 when it violates it. Rescale the output (for a "
                "toxicity probability `p`, return `1 - p`; for a logit, apply a sigmoid)."
            )
        checked.append(value)
    return checked


def call_oracles(
    oracles: Sequence[OracleFunc],
    prompts: Sequence[Any],
    completions: Sequence[Any],
    weights: Sequence[float] | None = None,
    max_retries: int = 0,
    progress: bool = False,
    **kwargs,
) -> OracleScores:
    """Score completions with one or several oracles and combine them into one satisfaction score each.

    Several oracles are combined by a weighted mean, so the result stays in `[0, 1]`. A sample any oracle drops
    (`None`/NaN) is dropped. An oracle that raises is called again up to `max_retries` times; if it still fails, the
    whole batch is dropped for it and counted, and training goes on. `progress` shows a bar over the oracles.
    """
    n = len(completions)
    if weights is None:
        weights = [1.0] * len(oracles)
    if len(weights) != len(oracles):
        raise ValueError(f"Got {len(weights)} oracle weights for {len(oracles)} oracles; pass one weight per oracle.")
    per_oracle: dict[str, list[float | None]] = {}
    num_failures = 0
    errors: list[str] = []
    for oracle in tqdm(oracles, desc="Oracle phase: labelling", unit="oracle", disable=not progress, leave=False):
        name = oracle_name(oracle)
        # A process with no share of the prompts has nothing to judge, and user oracles need not cope with that
        raw = []
        for attempt in range(max_retries + 1 if n else 0):
            try:
                raw = oracle(prompts=list(prompts), completions=list(completions), **kwargs)
                break
            except Exception as error:  # a remote judge may fail transiently; anything else fails every attempt
                num_failures += 1
                if attempt == max_retries:
                    errors.append(f"`{name}` ({type(error).__name__}: {error})")
                    logger.warning(
                        "The oracle `%s` failed %d time(s) (%s: %s); dropping the %d samples of this batch.",
                        name,
                        attempt + 1,
                        type(error).__name__,
                        error,
                        n,
                    )
                    raw = [None] * n
        key = name
        suffix = 1
        while key in per_oracle:
            suffix += 1
            key = f"{name}_{suffix}"
        per_oracle[key] = check_scores(name, raw, n)

    total_weight = float(sum(weights))
    combined: list[float | None] = []
    for i in range(n):
        values = [scores[i] for scores in per_oracle.values()]
        if any(v is None for v in values):
            combined.append(None)
        else:
            combined.append(sum(w * v for w, v in zip(weights, values, strict=True)) / total_weight)
    return OracleScores(
        scores=combined,
        per_oracle=per_oracle,
        num_dropped=sum(v is None for v in combined),
        num_failures=num_failures,
        errors=errors,
    )
