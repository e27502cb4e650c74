"""`core`: Concept REconditioning ([001] eq. 2-4).

    E_{D_f} || eps_theta(x_t, c_f) - eps_star(x_t, c_a) ||^2
      + alpha * E_{D_r} || eps_theta(x_t, c_r) - eps_star(x_t, c_r) ||^2

Forget images are re-conditioned onto an anchor concept's prediction by the frozen model,
with a one-to-one anchor map by default (task.anchor_scheme). [001]'s ablations are
configurations of the same terms: `target` = teacher (CORE) | student-sg (Table 3's
eps_theta target) | ascent (gradient ascent to eps); `retain_target` = teacher | gaussian;
anchor schemes of Table 4 through `task.anchor_scheme`.
Paper defaults: alpha=1, Adam lr 1e-5 constant, batch 4, 25 epochs over D_f (first 3 images
per style-object pair), cross-attention weights, no gradient clipping ([001] App. B names
none; the `testbed` profile keeps the shared clip at 1.0 it was measured with).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from diffunlearn.methods.base import Method, MethodConfig
from diffunlearn.objectives import Term


class CoreConfig(MethodConfig):
    alpha: float = Field(1.0, ge=0, description="weight of the retain (preservation) term")
    target: Literal["teacher", "student-sg", "ascent"] = Field(
        "teacher", description="forget target: eps_star(c_a) | sg(eps_theta(c_a)) | ascent from eps")
    retain_target: Literal["teacher", "gaussian"] = Field("teacher", description="retain target")


class Core(Method):
    Config = CoreConfig
    paper = "[001] eq. 2-4"
    trains = "cross-attention (xattn)"
    needs_retain = True
    uses_anchor = True
    profiles = {
        # [001] App. B: Adam, constant lr 1e-5, batch 4, 25 epochs (Forget01/06), no gradient clipping
        "paper": {"lr": 1e-5, "batch_size": 4, "epochs": 25, "alpha": 1.0, "param_group": "xattn",
                  "grad_clip": None},
        "testbed": {"lr": 1e-3, "batch_size": 16, "epochs": 40, "alpha": 1.0, "param_group": "xattn"},
    }

    def terms(self) -> list[Term]:
        cfg = self.cfg
        if cfg.target == "ascent":
            forget = Term("forget", images="forget", prompt="forget", target="gaussian", weight=-1.0)
        else:
            forget = Term("forget", images="forget", prompt="forget", target=cfg.target, target_prompt="anchor")
        retain = Term("retain", images="retain", prompt="retain", target=cfg.retain_target,
                      target_prompt="retain", weight=cfg.alpha)
        return [forget, retain]
