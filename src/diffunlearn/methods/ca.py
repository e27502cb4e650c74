"""`ca-model` and `ca-noise`: Concept Ablation (Kumari et al. 2023).

The anchor concept's images are shown under the forget prompt:
    ca-model:  E || eps_theta(x_t, c_f) - sg(eps_theta(x_t, c_a)) ||^2 + lambda * L(D_r)
    ca-noise:  E || eps_theta(x_t, c_f) - eps ||^2                       + lambda * L(D_r)
with x_t from the anchor concept's images (the testbed renders them; the CA code generates
them with the original model from anchor prompts) and the retain term as CA's prior
preservation. [001] eq. 11-12 write a variant (`source: forget`) that takes x_t from D_f and
uses an unsquared norm with a time weight w_t; that variant is offered with w_t = 1 (the
weighting is not defined in [001]; the official CA code, nupurkmr9/concept-ablation
`diffusers/train.py`, also trains with an unweighted MSE). Parameter group: cross-attention K/V, as the official
code's `crossattn_kv`/`cross-attn`. [001] App. C: lr 1.6e-5, batch 4, 200 steps (forget one).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from diffunlearn.methods.base import Method, MethodConfig
from diffunlearn.objectives import Term


class CAConfig(MethodConfig):
    retain_weight: float = Field(1.0, ge=0, description="lambda: weight of the retain (prior-preservation) term")
    source: Literal["anchor", "forget"] = Field(
        "anchor", description="x_t from the anchor's images (Kumari) or from D_f with an unsquared norm ([001])")


class _ConceptAblation(Method):
    Config = CAConfig
    trains = "cross-attention K/V (xattn-kv)"
    needs_retain = True
    uses_anchor = True
    target: ClassVar[str]
    profiles = {
        "paper": {"lr": 1.6e-5, "batch_size": 4, "steps": 200, "param_group": "xattn-kv"},
        "testbed": {"lr": 1e-3, "batch_size": 16, "steps": 150, "param_group": "xattn-kv"},
    }

    def terms(self) -> list[Term]:
        cfg = self.cfg
        norm = "squared" if cfg.source == "anchor" else "l2"
        target_prompt = "anchor" if self.target == "student-sg" else None
        ablate = Term("ablate", images=cfg.source, prompt="forget", target=self.target, target_prompt=target_prompt,
                      norm=norm)
        retain = Term("retain", images="retain", prompt="retain", target="gaussian", weight=cfg.retain_weight)
        return [ablate, retain]


class CAModel(_ConceptAblation):
    paper = "Kumari et al. 2023 (model-based); [001] eq. 11"
    target = "student-sg"


class CANoise(_ConceptAblation):
    paper = "Kumari et al. 2023 (noise-based); [001] eq. 12"
    target = "gaussian"
