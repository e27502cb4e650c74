"""`ca-model` and `ca-noise`: Concept Ablation (Kumari et al. 2023).

The anchor concept's images are shown under the forget prompt:
    ca-model:  E || eps_theta(x_t, c_f) - sg(eps_theta(x_t, c_a)) ||^2 + lambda * L(D_r)
    ca-noise:  E || eps_theta(x_t, c_f) - eps ||^2                       + lambda * L(D_r)
with x_t from the anchor concept's images (the testbed renders them; the CA code generates
them with the original model from anchor prompts) and the retain term as CA's prior
preservation. [001] eq. 11-12 write a variant (`source: forget`) that takes x_t from D_f and
uses an unsquared norm with a time weight w_t; that variant is offered with w_t = 1 (the
weighting is not defined in [001]; the official CA code, nupurkmr9/concept-ablation
`diffusers/train.py`, also trains with an unweighted MSE).

`ca-noise` with `source: forget` **ascends** its ablation term (weight -1): eq. 12 as printed
(forget images, forget prompt, the Gaussian noise that made x_t, positive weight) is the plain
denoising loss on D_f, i.e. fine-tuning that reinforces the concept; [001] §4.3 (ablation 2 and
Table 3) describes CA-noise's unlearning loss as gradient-ascent-like, `-E||eps_theta(x_t^f, p_f)
- eps||^2`, so the sign is the one [001] means. (`source: anchor`, Kumari's own reading, is
relabelling, not ascent: it descends. `ca-model` descends in both sources: its target is the
anchor's prediction.)
Parameter group: cross-attention K/V, as the official code's `crossattn_kv`/`cross-attn`.
[001] App. C: lr 1.6e-5, batch 4, 200 steps (forget one), training as UnlearnCanvas does
([001] App. C); UnlearnCanvas' CA (`mu_concept_ablation_ca/train.py`, a PyTorch Lightning trainer
whose configs set no `gradient_clip_val`) does not clip gradients, so the `paper` profile does not
either (Kumari's diffusers script clips at 1.0).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from diffunlearn.methods.base import Method, MethodConfig
from diffunlearn.objectives import Term


class CAConfig(MethodConfig):
    retain_weight: float = Field(1.0, ge=0, description="lambda: weight of the retain (prior-preservation) term")
    source: Literal["anchor", "forget"] = Field(
        "anchor", description="x_t from the anchor's images (Kumari) or from D_f with an unsquared norm "
                              "([001]; ca-noise then ascends, as [001] §4.3 describes it)")


class _ConceptAblation(Method):
    Config = CAConfig
    trains = "cross-attention K/V (xattn-kv)"
    needs_retain = True
    uses_anchor = True
    target: ClassVar[str]
    profiles = {
        "paper": {"lr": 1.6e-5, "batch_size": 4, "steps": 200, "param_group": "xattn-kv", "grad_clip": None},
        "testbed": {"lr": 1e-3, "batch_size": 16, "steps": 150, "param_group": "xattn-kv"},
    }

    def terms(self) -> list[Term]:
        cfg = self.cfg
        norm = "squared" if cfg.source == "anchor" else "l2"
        target_prompt = "anchor" if self.target == "student-sg" else None
        # forget images under their own prompt with the noise as target is the training loss on D_f:
        # only its ascent unlearns ([001] §4.3)
        sign = -1.0 if cfg.source == "forget" and self.target == "gaussian" else 1.0
        ablate = Term("ablate", images=cfg.source, prompt="forget", target=self.target, target_prompt=target_prompt,
                      norm=norm, weight=sign)
        retain = Term("retain", images="retain", prompt="retain", target="gaussian", weight=cfg.retain_weight)
        return [ablate, retain]


class CAModel(_ConceptAblation):
    paper = "Kumari et al. 2023 (model-based); [001] eq. 11"
    target = "student-sg"


class CANoise(_ConceptAblation):
    paper = "Kumari et al. 2023 (noise-based); [001] eq. 12"
    target = "gaussian"
