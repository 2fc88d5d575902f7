"""Loss spikes (PaLM, Chowdhery et al. 2022, section 5.1): which steps the driver skips, and when it rolls back.

With train.spike_threshold > 0 a step is a spike when its loss is over spike_threshold x the median loss of
the last SPIKE_WINDOW accepted steps, or its gradient norm over spike_threshold x their median gradient norm;
a non-finite loss or gradient norm always is. The medians set limits once SPIKE_MIN_STEPS accepted steps are
in the window (before that the limits are +inf and only non-finite steps are spikes). The jitted step compares
and skips the update (train.step.skip_if_over); SpikeGuard keeps the window, the streak of consecutive spikes
(train.spike_patience of them roll the run back to a checkpoint before the streak) and the rollbacks so far,
all saved in each checkpoint's meta so that --resume decides as the uninterrupted run would have.
"""

from __future__ import annotations

import collections
import math

import numpy as np

SPIKE_WINDOW = 32  # the accepted steps whose median loss / gradient norm set the limits
SPIKE_MIN_STEPS = 8  # accepted steps in the window before the medians set limits (until then: non-finite only)
MAX_ROLLBACKS = 5  # rollbacks in one run (a resumed run counts on); one more streak stops it with LossSpikeError


class LossSpikeError(RuntimeError):
    """Loss spikes the run could not roll back from (no checkpoint before them, or too many rollbacks)."""


class SpikeGuard:
    """The running window of accepted steps, the current streak of spikes, the rollbacks so far."""

    def __init__(self, threshold: float, patience: int, saved: dict | None = None):
        self.threshold, self.patience = threshold, patience
        self.window: collections.deque = collections.deque(maxlen=SPIKE_WINDOW)  # (step, loss, grad norm)
        self.streak: list[int] = []  # steps of the consecutive spikes since the last accepted step
        self.rollbacks = 0
        if saved:
            self.window.extend(tuple(e) for e in saved["window"])
            self.streak, self.rollbacks = list(saved["streak"]), saved["rollbacks"]

    def limits(self) -> np.ndarray:
        """float32 [max loss, max grad norm] for the next step: threshold x the window's medians, or +inf."""
        if len(self.window) < SPIKE_MIN_STEPS:
            return np.full(2, np.inf, np.float32)
        _, losses, norms = zip(*self.window)
        return np.float32(self.threshold) * np.array([np.median(losses), np.median(norms)], np.float32)

    def accept(self, step: int, loss: float, grad_norm: float) -> None:
        self.window.append((step, loss, grad_norm))
        self.streak.clear()

    def spike(self, step: int, loss: float, grad_norm: float, limits: np.ndarray) -> dict:
        """Count a skipped step into the streak; returns its metrics.jsonl "spike" record."""
        self.streak.append(step)
        return {"loss": _number(loss), "grad_norm": _number(grad_norm), "max_loss": _number(limits[0]),
                "max_grad_norm": _number(limits[1]), "streak": len(self.streak)}

    def must_roll_back(self) -> bool:
        return len(self.streak) >= self.patience

    def rolled_back(self, saved: dict | None) -> None:
        """After restoring a checkpoint: its window (`saved`, its meta's "spikes"), no streak, one more rollback."""
        self.window.clear()
        self.window.extend(tuple(e) for e in (saved or {}).get("window", []))
        self.streak.clear()
        self.rollbacks += 1

    def state(self) -> dict:
        """What a checkpoint's meta holds (JSON), so that a resumed run continues the same window and streak."""
        return {"window": [list(e) for e in self.window], "streak": list(self.streak), "rollbacks": self.rollbacks}


def _number(x) -> float | str:
    """A float for metrics.jsonl; 'nan' / 'inf' for the non-finite ones (strict JSON has no NaN)."""
    x = float(x)
    return x if math.isfinite(x) else str(x)
