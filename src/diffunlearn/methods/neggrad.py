"""`neggrad` (NG): gradient ascent on the forget set, `-L(D_f)`.

[004] §5's baseline. The loss is unbounded below, so it over-forgets and damages the rest
of the model; the step count is what keeps it usable.
"""

from __future__ import annotations

from diffunlearn.methods.base import Method
from diffunlearn.objectives import Term


class NegGrad(Method):
    paper = "[004] baseline"
    trains = "full UNet"
    profiles = {
        "paper": {"lr": 1e-5, "batch_size": 4, "steps": 500, "param_group": "full"},
        # measured forgetting `dotted`: 5e-5 x 60 destroyed everything (IRA 10), 1e-5 x 20 forgot
        # nothing (UA 5); 2e-5 x 20 forgets (UA 85) while over-forgetting its neighbours (IRA 79.5)
        "testbed": {"lr": 2e-5, "batch_size": 16, "steps": 20, "param_group": "full"},
    }

    def terms(self) -> list[Term]:
        return [Term("forget", images="forget", prompt="forget", target="gaussian", weight=-1.0)]
