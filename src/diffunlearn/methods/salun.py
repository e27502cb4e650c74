"""`salun`: Saliency Unlearning ([001] eq. 9, [002] eq. 6; Fan et al. 2023).

1. Saliency mask: accumulate |grad| of the plain denoising loss on D_f with the forget
   prompts over `mask_batches` batches, and keep the top `mask_fraction` of the trained
   weights by magnitude, one threshold across all of them (the official
   OPTML-Group/Unlearn-Saliency `generate_mask.py` thresholds the concatenated gradients).
2. Only masked weights train, on
       E_{D_f} || eps_theta(x_t, c_f) - sg(eps_theta(x_t, c_a)) ||^2  +  beta * L(D_r)
   where c_a relabels the forget image with an anchor concept (task.anchor_scheme).
Paper defaults ([001] App. C): beta=1, lr 1e-5, batch 4, 10 epochs (forget one style).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from diffunlearn.methods.base import Method, MethodConfig
from diffunlearn.objectives import Term, forget_gradient_magnitudes

if TYPE_CHECKING:
    import torch


class SalUnConfig(MethodConfig):
    beta: float = Field(1.0, ge=0, description="weight of the retain term")
    mask_fraction: float = Field(0.5, gt=0, le=1, description="share of weights kept trainable by saliency")
    mask_batches: int = Field(8, ge=1, description="forget batches whose gradients form the saliency map")


class SalUn(Method):
    Config = SalUnConfig
    paper = "[001] eq. 9, [002] eq. 6"
    trains = "the most salient 50% of the UNet"
    needs_retain = True
    uses_anchor = True
    profiles = {
        "paper": {"lr": 1e-5, "batch_size": 4, "epochs": 10, "beta": 1.0, "param_group": "full"},
        "testbed": {"lr": 3e-4, "batch_size": 16, "epochs": 40, "beta": 1.0, "param_group": "full"},
    }

    def __init__(self, cfg, backend, task):
        super().__init__(cfg, backend, task)
        self.mask: dict[str, torch.Tensor] = {}

    def terms(self) -> list[Term]:
        return [
            Term("forget", images="forget", prompt="forget", target="student-sg", target_prompt="anchor"),
            Term("retain", images="retain", prompt="retain", target="gaussian", weight=self.cfg.beta),
        ]

    def setup(self) -> None:
        self.mask = saliency_mask(self.backend, self.task, self.cfg.batch_size, self.cfg.mask_batches,
                                  self.cfg.mask_fraction, seed=self.task.seed)

    def step(self, step: int, gen: torch.Generator) -> dict[str, float]:
        logs = super().step(step, gen)
        for name, p in self.backend.named_trainable():
            if p.grad is not None:
                p.grad.mul_(self.mask[name])
        return logs

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {f"mask.{n}": m for n, m in self.mask.items()}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.mask = {n[5:]: m for n, m in tensors.items() if n.startswith("mask.")}


def saliency_mask(backend, task, batch_size: int, batches: int, fraction: float, seed: int
                  ) -> dict[str, torch.Tensor]:
    """1 for the top `fraction` of trainable weights by accumulated |grad| of the forget loss."""
    import torch

    saliency = forget_gradient_magnitudes(backend, task, batch_size, batches, seed)
    flat = torch.cat([s.flatten() for s in saliency.values()])
    keep = max(1, int(round(fraction * flat.numel())))
    chosen = torch.zeros_like(flat)
    chosen[torch.topk(flat, keep, sorted=False).indices] = 1.0  # exactly `keep`, whatever the ties
    pieces = chosen.split([s.numel() for s in saliency.values()])
    return {n: piece.view_as(s) for (n, s), piece in zip(saliency.items(), pieces, strict=True)}
