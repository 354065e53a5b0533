"""CADET's checkpoint files: what a checkpoint holds beside Trainer's, how it is published whole, and how an intact one
is found to resume from. The trainer decides what the state holds; this module names, writes and checks the files."""

import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from typing import Any

from safetensors import safe_open
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_NAME


logger = logging.getLogger(__name__)

NADO_DIR = "nado"
PENDING_NADO_DIR = "nado_pending"
NADO_OPTIMIZER_NAME = "nado_optimizer.pt"
CADET_STATE_NAME = "cadet_state.json"
# Checkpoints are written here, then renamed to `checkpoint-N` once complete; the name does not match `checkpoint-*`,
# so neither `get_last_checkpoint` nor `rotate_checkpoints` ever sees a half-written checkpoint
STAGING_DIR = ".checkpoint-in-progress"


def publish(staged: str, final: str) -> None:
    """Move a complete checkpoint to its place in one rename; a stale one of the same step is moved aside first."""
    replaced = f"{staged}.replaced"
    if os.path.exists(final):
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(staged, final)
    shutil.rmtree(replaced, ignore_errors=True)
    try:
        os.rmdir(os.path.dirname(staged))
    except OSError:
        pass  # not empty: the leftovers of an earlier save


def checkpoint_step(name: str) -> int | None:
    match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name)
    return int(match.group(1)) if match else None


CADET_STATE_KEYS = ("cadet_lambda", "current_round", "nado_source_round", "oracle_calls", "latest_samples", "pending")
# Trainer's files a single-process run needs to continue as it was; without them it resumes silently with fresh state
TRAINER_RESUME_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth")


def checkpoint_problem(path: str, trainer_files: Sequence[str] = TRAINER_RESUME_FILES) -> str | None:
    """What makes `path` unfit to resume from (a missing or corrupt file, named), or None when it is intact.

    Reads only `cadet_state.json` and the headers of the NADO weights, so it is cheap to call on every checkpoint.
    """
    if not os.path.isdir(path):
        return "it does not exist"
    for name in (CADET_STATE_NAME, TRAINER_STATE_NAME, NADO_OPTIMIZER_NAME, *trainer_files):
        if not os.path.isfile(os.path.join(path, name)):
            return f"it has no {name}"
    try:
        with open(os.path.join(path, CADET_STATE_NAME)) as f:
            state = json.load(f)
        missing = [key for key in CADET_STATE_KEYS if key not in state]
    except (OSError, ValueError, TypeError) as error:
        return f"its {CADET_STATE_NAME} cannot be read ({type(error).__name__}: {error})"
    if missing:
        return f"its {CADET_STATE_NAME} lacks {missing}"
    for folder in (NADO_DIR, PENDING_NADO_DIR) if state["pending"] is not None else (NADO_DIR,):
        weights = os.path.join(path, folder, SAFE_WEIGHTS_NAME)
        if not os.path.isfile(os.path.join(path, folder, CONFIG_NAME)) or not os.path.isfile(weights):
            return f"it has no {folder}/{CONFIG_NAME} and {folder}/{SAFE_WEIGHTS_NAME}"
        try:
            with safe_open(weights, framework="pt"):
                pass  # the header is checked against the file's size: a truncated file fails here
        except Exception as error:  # SafetensorError is not exported under a stable name
            return f"its {folder}/{SAFE_WEIGHTS_NAME} is corrupt ({error})"
    return None


def last_complete_checkpoint(folder: str, trainer_files: Sequence[str] = TRAINER_RESUME_FILES) -> str | None:
    """The newest intact `checkpoint-N` in `folder`, skipping (with a warning naming what is wrong) any that is not."""
    if not os.path.isdir(folder):
        return None
    candidates = sorted((step, name) for name in os.listdir(folder) if (step := checkpoint_step(name)) is not None)
    for _, name in reversed(candidates):
        path = os.path.join(folder, name)
        problem = checkpoint_problem(path, trainer_files)
        if problem is None:
            return path
        logger.warning("Skipping %s: %s, so it is incomplete or corrupt.", path, problem)
    return None


def write_cadet_state(output_dir: str, state: dict[str, Any]) -> None:
    with open(os.path.join(output_dir, CADET_STATE_NAME), "w") as f:
        json.dump(state, f)


def read_cadet_state(checkpoint: str) -> dict[str, Any]:
    with open(os.path.join(checkpoint, CADET_STATE_NAME)) as f:
        return json.load(f)
