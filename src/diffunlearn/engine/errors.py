"""The engine's errors, torch-free so that the command line can catch them before torch loads."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message says which and what to do."""


class TrainingDiverged(ArithmeticError):
    """A loss, gradient norm or weight became NaN or infinite: training stopped at `step`
    (counted from 1, like checkpoint steps) before the bad values reached a checkpoint;
    `checkpoint_step` is the last good checkpoint's step (None: none was written)."""

    def __init__(self, step: int, what: str, checkpoint_step: int | None, message: str | None = None):
        self.step, self.what, self.checkpoint_step = step, what, checkpoint_step
        kept = f"the last good checkpoint (step {checkpoint_step}) is kept" if checkpoint_step else "no checkpoint yet"
        super().__init__(message or f"training diverged at step {step}: {what}; {kept}")
