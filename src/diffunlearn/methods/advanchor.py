"""`advanchor`: adversarial anchors for unlearning ([003] §3.2, Alg. 1).

A universal perturbation e_adv (one vector per forget concept) is added to the text-encoder
output at the concept's token positions of a forget prompt p_u, giving the anchor
e_anchor = e_pu (+ e_adv at the concept). e_adv is optimised with Adam (lr 1e-4) to *maximise*
    adv1 = -cos(eps_star(x_t, e_anchor), eps_star(x_t, e_pu))                       or
    adv2 = -cos(g(e_anchor), g(e_pu)),  g(e) = eps_star(x_t, e) - eps_star(x_t, e_empty),
for at most S iterations, stopping as soon as L_adv >= 0 (the cosine has reached 0; Alg. 1
prints `<= 0`, which would stop at once since L_adv starts near -1, §3.2 says "= 0").
The model then trains (cross-attention, Adam lr 1e-5, 50 steps in [003]) on
    || eps_theta(x_t, e_pu) - eps_star(x_t, e_anchor) ||_2
      + lambda || eps_theta(x_t, e_empty) - eps_star(x_t, e_empty) ||_2
with unsquared norms as printed (lambda = 10 was tuned for them). Strategies ([003] §3.2):
alternating (default: e_adv then theta on every input), sequential (e_adv built on all
inputs first, then theta), cyclical (inputs revisited until every one meets the criterion).
Each input's S iterations start a fresh Adam state; e_adv itself carries over (universal).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from diffunlearn.methods.base import Method, MethodConfig
from diffunlearn.objectives import draw_batch

if TYPE_CHECKING:
    import torch


class AdvAnchorConfig(MethodConfig):
    loss: Literal["adv1", "adv2"] = Field("adv1", description="similarity loss that builds the anchor")
    strategy: Literal["alternating", "sequential", "cyclical"] = "alternating"
    max_iters: int = Field(30, ge=1, description="S: at most this many e_adv updates per input")
    adv_lr: float = Field(1e-4, gt=0, description="Adam learning rate of e_adv")
    lam: float = Field(10.0, ge=0, description="weight of the empty-prompt regulariser")
    init_std: float = Field(1e-3, ge=0, description="std of e_adv's random initialisation")
    anchor_inputs: int = Field(8, ge=1, description="sequential/cyclical: inputs that build e_adv")
    max_cycles: int = Field(5, ge=1, description="cyclical: passes over the inputs at most")


class AdvAnchor(Method):
    Config = AdvAnchorConfig
    paper = "[003] §3.2, Alg. 1"
    trains = "cross-attention (xattn)"
    profiles = {
        "paper": {"lr": 1e-5, "batch_size": 1, "steps": 50, "lam": 10.0, "param_group": "xattn"},
        # the tiny text encoder's embeddings need a larger e_adv step to reach cosine 0 within S.
        # measured forgetting `dotted` (60 steps): lr 1e-3: UA 100, IRA 87.5, CRA 99.5, SFID 3.4;
        # lr 1e-4: UA 5, SFID 80.6; lr 2e-4: UA 75, IRA 99.5, CRA 99, SFID 60.3; lr 3e-4 x 40 steps: UA 80,
        # SFID 48.4; lr 3e-4: UA 100, IRA 99.5, CRA 99, SFID 42 (chosen)
        "testbed": {"lr": 3e-4, "batch_size": 8, "steps": 60, "lam": 10.0, "adv_lr": 1e-2, "param_group": "xattn"},
    }

    def __init__(self, cfg, backend, task):
        super().__init__(cfg, backend, task)
        self.e_adv: dict[str, torch.Tensor] = {}
        self.adv_iterations: list[int] = []

    # ---- the perturbation --------------------------------------------------------------------
    def setup(self) -> None:
        import torch

        from diffunlearn.engine.loop import step_generator

        dim = self.backend.encode([""]).shape[-1]
        gen = torch.Generator().manual_seed(self.task.seed)
        self.e_adv = {c: (torch.randn(dim, generator=gen) * self.cfg.init_std).to(self.backend.device)
                      for c in self.task.forget}
        if self.cfg.strategy == "alternating":
            return
        inputs = [self._inputs(step_generator(self.task.seed, -1 - i)) for i in range(self.cfg.anchor_inputs)]
        cycles = 1 if self.cfg.strategy == "sequential" else self.cfg.max_cycles
        for _ in range(cycles):
            met = [self.build_anchor(*batch) for batch in inputs]
            if all(met):
                break

    def _inputs(self, gen: torch.Generator):
        batch = draw_batch(self.backend, self.task, "forget", self.cfg.batch_size, gen)
        x_t = batch.noisy(self.backend)
        prompts = batch.prompts["forget"]
        return x_t, batch.t, prompts

    def anchor_cond(self, prompts: list[str], e_adv: dict[str, torch.Tensor]) -> torch.Tensor:
        """e_pu with e_adv added at each prompt's forget-concept token positions."""
        import torch

        cond = self.backend.encode(prompts)
        offsets = torch.zeros_like(cond)
        for i, prompt in enumerate(prompts):
            for concept, vector in e_adv.items():
                for pos in self.backend.token_positions(prompt, self.task.concept_set.text(concept)):
                    offsets[i, pos] = offsets[i, pos] + vector
        return cond + offsets

    def adversarial_loss(self, x_t, t, prompts, e_adv) -> torch.Tensor:
        import torch
        from torch.nn.functional import cosine_similarity

        n = len(prompts)
        anchor = self.anchor_cond(prompts, e_adv)
        pu = self.backend.encode(prompts)
        conds = [anchor, pu] + ([self.backend.encode([""] * n)] if self.cfg.loss == "adv2" else [])
        out = self.backend.eps(torch.cat([x_t] * len(conds)), torch.cat([t] * len(conds)), torch.cat(conds),
                               params=self.backend.teacher_params() or None).split(n)
        if self.cfg.loss == "adv1":
            a, b = out[0], out[1].detach()
        else:
            a, b = out[0] - out[2].detach(), (out[1] - out[2]).detach()
        return -cosine_similarity(a.flatten(1), b.flatten(1), dim=1).mean()

    def build_anchor(self, x_t, t, prompts) -> bool:
        """Up to S Adam steps on e_adv maximising L_adv; True once L_adv >= 0."""
        import torch

        params = {c: v.detach().clone().requires_grad_(True) for c, v in self.e_adv.items()}
        optimizer = torch.optim.Adam(params.values(), lr=self.cfg.adv_lr)
        met, updates = False, 0
        while updates < self.cfg.max_iters:
            loss = self.adversarial_loss(x_t, t, prompts, params)
            if float(loss.detach()) >= 0:
                met = True
                break
            optimizer.zero_grad()
            for p, g in zip(params.values(), self.backend.grad(-loss, list(params.values())), strict=True):
                p.grad = g  # maximise L_adv
            optimizer.step()
            updates += 1
        self.adv_iterations.append(updates)
        self.e_adv = {c: v.detach() for c, v in params.items()}
        return met

    # ---- the model -----------------------------------------------------------------------------
    def step(self, step: int, gen: torch.Generator) -> dict[str, float]:
        import torch

        x_t, t, prompts = self._inputs(gen)
        met = self.build_anchor(x_t, t, prompts) if self.cfg.strategy == "alternating" else True
        n = len(prompts)
        empty = self.backend.encode([""] * n)
        with torch.no_grad():
            target_anchor, target_empty = self.backend.teacher_eps(
                torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([self.anchor_cond(prompts, self.e_adv), empty])
            ).split(n)
        pred_pu, pred_empty = self.backend.eps(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                               torch.cat([self.backend.encode(prompts), empty])).split(n)
        loss_op = (pred_pu - target_anchor).flatten(1).norm(dim=1).mean()
        loss_reg = (pred_empty - target_empty).flatten(1).norm(dim=1).mean()
        total = loss_op + self.cfg.lam * loss_reg
        self.backend.backward(total)
        return {"loss": float(total.detach()), "loss_op": float(loss_op.detach()),
                "loss_reg": float(loss_reg.detach()), "anchor_met": float(met),
                "adv_iterations": float(self.adv_iterations[-1]) if self.adv_iterations else 0.0}

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {f"e_adv.{c}": v for c, v in self.e_adv.items()}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.e_adv = {n[6:]: v for n, v in tensors.items() if n.startswith("e_adv.")}
