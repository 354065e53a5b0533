"""The oracle protocol and the plumbing that turns oracle scores into NADO labels.

An oracle follows TRL's reward-function convention: a callable ``oracle(prompts, completions, **kwargs)`` that
returns one float per completion. For CADET the float is a *satisfaction score* in ``[0, 1]``: 1 means the
completion satisfies the constraint (for detoxification: it is not toxic). ``None`` or NaN means "no verdict" and
drops the sample. Prompts and completions arrive in the dataset's format: strings, or lists of chat messages for
conversational data, as in `GRPOTrainer`.
"""

import logging
import math
import numbers
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm
from trl.trainer.utils import get_callable_name, get_config_model_id


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
    """A short name for logging, by GRPOTrainer's rule for reward functions: a model is named by its model id, a
    callable by its name (a `functools.partial` by its function's, an instance by its class's)."""
    if not hasattr(oracle, "__name__") and hasattr(oracle, "config"):
        name = get_config_model_id(oracle.config)
    else:
        name = get_callable_name(oracle)
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


class OraclePhaseStopped(Exception):
    """Raised in the oracle phase when training was stopped (e.g. by Ctrl-C) while an oracle was still running."""


def _as_score(name: str, value: Any) -> float | None:
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # numpy scalars, 0-d arrays and tensors
        value = value.item()
    if value is None:
        return None
    # Only real numbers: a string such as "0.3" or a dict key is a bug in the oracle, not a score
    if not isinstance(value, numbers.Real):
        raise TypeError(
            f"The oracle `{name}` returned {value!r} ({type(value).__name__}) as a score; each score must be a real "
            "number in [0, 1] (a float, int or bool), or None/NaN to drop the sample."
        )
    value = float(value)
    if math.isnan(value):
        return None
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"The oracle `{name}` returned {value}, outside [0, 1]. CADET oracles return a satisfaction score: "
            "1 when the completion satisfies the constraint, 0 when it violates it. Rescale the output (for a "
            "toxicity probability `p`, return `1 - p`; for a logit, apply a sigmoid)."
        )
    return value


def check_scores(name: str, scores: Any, n: int) -> list[float | None]:
    """The scores an oracle returned, checked: a list (or tuple, array, tensor) of `n` real numbers in `[0, 1]`, or
    None/NaN for no verdict. Anything else raises an error naming what was received."""
    if not isinstance(scores, list | tuple) and hasattr(scores, "tolist"):  # numpy arrays, tensors, pandas Series
        scores = scores.tolist()
    # A dict would be read by its keys and a string character by character: refuse both, and anything unordered
    if not isinstance(scores, list | tuple):
        raise TypeError(
            f"The oracle `{name}` returned {type(scores).__name__}; it must return a list with one float per "
            "completion, in order (None to drop a sample)."
        )
    if len(scores) != n:
        raise ValueError(
            f"The oracle `{name}` returned {len(scores)} scores for {n} completions. An oracle must return exactly "
            "one score per completion, in order (None for a sample it cannot judge)."
        )
    return [_as_score(name, value) for value in scores]


def _call_oracle(
    oracle: OracleFunc, timeout: float | None, stop: threading.Event | None, kwargs: dict[str, Any]
) -> Any:
    """Call `oracle(**kwargs)`, giving up after `timeout` seconds (TimeoutError) or when `stop` is set.

    With a timeout or a stop event the call runs in a daemon thread. Python cannot end a thread, so a call that hangs
    is abandoned, not stopped: it no longer holds training up, and ends with the process.
    """
    if timeout is None and stop is None:
        return oracle(**kwargs)
    outcome: dict[str, Any] = {}
    grad_enabled = torch.is_grad_enabled()  # grad mode is per thread

    def target():
        try:
            with torch.set_grad_enabled(grad_enabled):
                outcome["scores"] = oracle(**kwargs)
        except BaseException as error:  # handed to the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=target, name=f"cadet-oracle-{oracle_name(oracle)}", daemon=True)
    thread.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    while thread.is_alive():
        if stop is not None and stop.is_set():
            raise OraclePhaseStopped("Training was stopped while an oracle was running.")
        wait = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
        if wait <= 0:
            raise TimeoutError(f"no answer within `oracle_timeout={timeout}` seconds")
        thread.join(wait)
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("scores")


def call_oracles(
    oracles: Sequence[OracleFunc],
    prompts: Sequence[Any],
    completions: Sequence[Any],
    weights: Sequence[float] | None = None,
    max_retries: int = 0,
    progress: bool = False,
    timeout: float | None = None,
    retry_delay: float = 1.0,
    stop: threading.Event | None = None,
    **kwargs,
) -> OracleScores:
    """Score completions with one or several oracles and combine them into one satisfaction score each.

    Several oracles are combined by a weighted mean, so the result stays in `[0, 1]`. A sample any oracle drops
    (`None`/NaN) is dropped. An oracle that raises, returns malformed scores or takes longer than `timeout` seconds is
    called again up to `max_retries` times, after waiting `retry_delay` seconds (doubled at each further retry); if
    it still fails, the whole batch is dropped for it and counted, and training goes on. Setting `stop` ends the call
    with `OraclePhaseStopped`. `progress` shows a bar over the oracles.
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
        scores: list[float | None] = []
        for attempt in range(max_retries + 1 if n else 0):
            if attempt and retry_delay > 0:  # a judge that is warming up or rate-limited needs time, not a hammering
                delay = retry_delay * 2 ** (attempt - 1)
                if stop is None:
                    time.sleep(delay)
                elif stop.wait(delay):
                    raise OraclePhaseStopped("Training was stopped while an oracle call was waiting to be retried.")
            try:
                raw = _call_oracle(
                    oracle, timeout, stop, dict(prompts=list(prompts), completions=list(completions), **kwargs)
                )
                scores = check_scores(name, raw, n)
                break
            except OraclePhaseStopped:
                raise
            except Exception as error:  # a remote judge may fail transiently; a malformed result is handled alike
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
                    scores = [None] * n
        key = name
        suffix = 1
        while key in per_oracle:
            suffix += 1
            key = f"{name}_{suffix}"
        per_oracle[key] = scores

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
