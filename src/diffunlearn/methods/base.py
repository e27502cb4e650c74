"""What every unlearning method is: a config, two profiles, and losses (or a step).

A method never owns a training loop. It supplies `terms()` (the CORE framework, objectives.py),
or overrides `step()` (EraseDiff, AdvAnchor), `setup()` (SalUn's mask), or `closed_form()`
(UCE, MACE); the engine runs it. Method modules import torch only inside hooks, so a
method's config can be validated before torch is loaded.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from diffunlearn.config import TrainConfig
from diffunlearn.objectives import Term, compute_loss

if TYPE_CHECKING:
    import torch

    from diffunlearn.backends.base import Backend
    from diffunlearn.data.tasks import UnlearningTask


class MethodConfig(TrainConfig):
    """Shared training settings; each method adds its own hyperparameters."""

    epochs: float | None = Field(
        None, gt=0, description="passes over D_f; when set, steps = ceil(epochs * |D_f| / batch_size)")


class Method:
    """Base class: subclasses set `Config`, `profiles`, `paper` and implement `terms()`."""

    Config: ClassVar[type[MethodConfig]] = MethodConfig
    # 'paper': the papers' SD-scale settings; 'testbed': chosen by measurement on the shipped model.
    profiles: ClassVar[dict[str, dict[str, Any]]] = {"paper": {}, "testbed": {}}
    paper: ClassVar[str] = ""
    trains: ClassVar[str] = ""
    uses_anchor: ClassVar[bool] = False  # AR_CL is reported only where an alternative concept exists
    needs_retain: ClassVar[bool] = False  # trains on D_r: a task without retain concepts is refused up front
    closed_form: ClassVar[bool] = False  # True: apply_closed_form() edits the weights, no loop runs

    def __init__(self, cfg: MethodConfig, backend: Backend, task: UnlearningTask):
        self.cfg, self.backend, self.task = cfg, backend, task

    def param_group(self) -> str:
        return self.cfg.param_group

    def resolved_steps(self) -> int:
        if self.cfg.epochs is None:
            return self.cfg.steps
        n_forget = len(self.task.forget_items()) * self.task.images_per_prompt
        return math.ceil(self.cfg.epochs * n_forget / self.cfg.batch_size)

    def terms(self) -> list[Term]:
        raise NotImplementedError(f"{type(self).__name__} must define terms() or override step()")

    def setup(self) -> None:
        """Runs once before training (after the parameter group is set trainable)."""

    def step(self, step: int, gen: torch.Generator) -> dict[str, float]:
        """Compute this step's gradients; the loop clips and applies them."""
        total, logs = compute_loss(self.terms(), self.backend, self.task, self.cfg.batch_size, gen)
        self.backend.backward(total)
        return logs

    def apply_closed_form(self) -> dict[str, float]:
        """Closed-form methods (UCE, MACE's refinement) edit the trained group here."""
        raise NotImplementedError(f"{type(self).__name__} is not a closed-form method")

    def cost(self) -> dict[str, Any]:
        """Cost figures the shared loop cannot see (retrain's pretraining); they override the loop's."""
        return {}

    def final_weights(self) -> dict[str, torch.Tensor] | None:
        """The weights the run delivers instead of the trained ones, by trained-group name; None
        (the default) delivers the trained weights. SDD returns its EMA, as the official
        `train_sdd.py` saves `unet_teacher`. The erase run copies them into the model once, after
        training (a resumed run too, from the restored `extra_state`), before saving and before
        the 'after' evaluation; it must not change the state a checkpoint resumes from."""
        return None

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Method-owned tensors that a resumed run needs (masks, EMA teachers)."""
        return {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what `extra_state` saved."""
