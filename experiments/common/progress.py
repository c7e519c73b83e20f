"""A tqdm progress bar over training steps that shows step time and throughput."""

from __future__ import annotations

import sys
import time
from typing import Any, Optional

import jax


class StepProgress:
    """Progress over training steps with a moving step time and images/s.

    Call `update()` once per step, after the step's result is ready (e.g. after
    `jax.block_until_ready` or fetching the loss), so the timing is real rather than
    the asynchronous dispatch time.

    Args:
        total_steps: Last step of the run.
        initial_step: Step the run starts from (non-zero after a resume).
        examples_per_step: Global batch size, for the images/s figure.
        description: Text in front of the bar.
        enabled: Show the bar; defaults to process 0 only.
        smoothing: Weight of the newest step in the exponential moving average.
    """

    def __init__(
        self,
        total_steps: int,
        *,
        initial_step: int = 0,
        examples_per_step: int = 0,
        description: str = "train",
        enabled: Optional[bool] = None,
        smoothing: float = 0.1,
    ):
        from tqdm.auto import tqdm

        self.examples_per_step = examples_per_step
        self.smoothing = smoothing
        self.step_seconds: Optional[float] = None
        self._last = time.perf_counter()
        enabled = jax.process_index() == 0 if enabled is None else enabled
        self._bar = tqdm(
            total=total_steps,
            initial=initial_step,
            desc=description,
            disable=not enabled,
            dynamic_ncols=True,
            file=sys.stderr,
            mininterval=0.5,
        )

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advances by `n` steps and refreshes the step time, images/s and `postfix`."""
        now = time.perf_counter()
        seconds = (now - self._last) / max(n, 1)
        self._last = now
        if self.step_seconds is None:
            self.step_seconds = seconds
        else:
            self.step_seconds += self.smoothing * (seconds - self.step_seconds)
        shown: dict[str, Any] = {"step_ms": f"{1e3 * self.step_seconds:.1f}"}
        if self.examples_per_step:
            shown["img/s"] = f"{self.examples_per_step / self.step_seconds:.0f}"
        shown.update({k: _fmt(v) for k, v in postfix.items()})
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(n)

    def reset_timer(self) -> None:
        """Excludes the time since the last update (e.g. an evaluation) from the next step."""
        self._last = time.perf_counter()

    def write(self, message: str) -> None:
        """Prints a line without breaking the bar."""
        if not self._bar.disable:
            self._bar.write(message, file=sys.stderr)

    def close(self) -> None:
        """Closes the bar."""
        self._bar.close()

    def __enter__(self) -> "StepProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.4g}"
    return value

