"""`dimum`: Diffusion Model Unlearning by Memorization ([002] Alg. 1).

    beta * E_{D_u'} || eps - eps_theta(x_t, c_f) ||^2 + E_{D_r} || eps - eps_theta(x_t, c_r) ||^2

D_u' pairs the alternative concept's images (from the retain side) with the forget prompts,
so the model memorises the alternative under the forget prompt; both terms are plain
denoising losses, hence convergent ([002] §V). Eq. 11 in the text repeats L_u; Alg. 1
line 16 has the retain loss as the second term, which is what this implements. The paper
does not state beta; 1 is used. The alternative is the task's anchor map (`next` for
CIFAR-style classes, a chosen style such as `fixed:NAME` for styles).
"""

from __future__ import annotations

from pydantic import Field

from diffunlearn.methods.base import Method, MethodConfig
from diffunlearn.objectives import Term


class DiMUMConfig(MethodConfig):
    beta: float = Field(1.0, ge=0, description="weight of the memorization (unlearning) term")


class DiMUM(Method):
    Config = DiMUMConfig
    paper = "[002] Alg. 1"
    trains = "full UNet"
    needs_retain = True
    uses_anchor = True
    profiles = {
        "paper": {"lr": 1e-5, "batch_size": 4, "steps": 2000, "beta": 1.0, "param_group": "full"},
        "testbed": {"lr": 2e-4, "batch_size": 16, "steps": 300, "beta": 1.0, "param_group": "full"},
    }

    def terms(self) -> list[Term]:
        return [
            Term("memorize", images="anchor", prompt="forget", target="gaussian", weight=self.cfg.beta),
            Term("retain", images="retain", prompt="retain", target="gaussian"),
        ]
