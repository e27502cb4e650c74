"""`finetune` (FT): keep training on the retain set only, `L(D_r)`.

[004] §5's baseline: it forgets only through catastrophic forgetting, so it bounds from
below what an unlearning method must add.
"""

from __future__ import annotations

from diffunlearn.methods.base import Method
from diffunlearn.objectives import Term


class Finetune(Method):
    paper = "[004] baseline"
    trains = "full UNet"
    needs_retain = True
    profiles = {
        "paper": {"lr": 1e-5, "batch_size": 4, "steps": 1000, "param_group": "full"},
        "testbed": {"lr": 2e-4, "batch_size": 16, "steps": 300, "param_group": "full"},
    }

    def terms(self) -> list[Term]:
        return [Term("retain", images="retain", prompt="retain", target="gaussian")]
