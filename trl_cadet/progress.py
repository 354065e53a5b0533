"""The training progress bar, with an estimate of the time left that knows the oracle phases to come.

`Trainer`'s bar estimates the time left from its recent rate of steps. A CADET round starts with an oracle phase that
holds training up for minutes, so right after one the bar reads `2/30 [03:26<40:10, 86.08s/it]`: the phase counted
into every remaining step. This bar times the two apart (the trainer says how long each phase held training up) and
estimates the time left as the remaining steps at the mean step time plus the remaining oracle phases at the latest
phase's time.
"""

import math
import time

from tqdm.auto import tqdm
from transformers.trainer_callback import ProgressCallback


class _RoundsBar(tqdm):
    """A tqdm bar whose time left and pace are set from outside (`left_s`, `pace`), not from its own rate."""

    left_s: float | None = None
    pace: str = ""

    @property
    def format_dict(self):
        values = super().format_dict
        values["left"] = "?" if self.left_s is None else self.format_interval(self.left_s)
        values["pace"] = self.pace
        return values


class RoundProgressCallback(ProgressCallback):
    """`ProgressCallback` with the time left of a CADET run: `[elapsed<left, 2.69s/step, oracle phase 3:26 x 2 left]`."""

    BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{left}, {pace}]"

    def __init__(self, trainer):
        super().__init__()
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        # As `ProgressCallback.on_train_begin`, with this bar, started at the step a resumed run starts from
        self.start_step, self.started_at = state.global_step, time.perf_counter()
        self.blocked_at_start = self.trainer.oracle_blocking_s
        if state.is_world_process_zero:
            self.training_bar = _RoundsBar(
                total=state.max_steps, initial=state.global_step, dynamic_ncols=True, bar_format=self.BAR_FORMAT
            )
        self.current_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            left_s, pace = self.time_left(state.global_step, state.max_steps, args.steps_per_round)
            self.training_bar.left_s, self.training_bar.pace = left_s, pace
        super().on_step_end(args, state, control, **kwargs)

    def time_left(self, step: int, max_steps: int, steps_per_round: int) -> tuple[float | None, str]:
        """Seconds left and a description of the pace, from the steps and oracle phases timed so far in this run."""
        steps = step - self.start_step
        if steps <= 0:
            return None, ""
        blocked = self.trainer.oracle_blocking_s - self.blocked_at_start
        step_s = max(time.perf_counter() - self.started_at - blocked, 0.0) / steps
        # Round k starts, with its oracle phase, when step k · steps_per_round is done (k >= 1, below `max_steps`):
        # those from this step on are still to come
        last_round = math.ceil(max_steps / steps_per_round) - 1
        phases_left = max(last_round - max(math.ceil(step / steps_per_round), 1) + 1, 0)
        phase_s = self.trainer.last_oracle_blocking_s
        left_s = (max_steps - step) * step_s + phases_left * phase_s
        pace = f"{step_s:.2f}s/step"
        if phases_left:
            pace += f", oracle phase {self.training_bar.format_interval(phase_s)} x {phases_left} left"
        return left_s, pace
