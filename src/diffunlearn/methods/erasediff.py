"""`erasediff`: the value-function bi-level step of EraseDiff ([004] Alg. 1), and
`erasediff-sum`, its scalarised baseline ("MOO" in [004] Fig. 2; the "EDiff" of [001] Table 1).

Forget loss `L_f = || eps_f - eps_theta(x_t, c_f) ||^2` on D_f with `eps_f = sg(eps_theta(x_t, c_m))`
(variant `rl`, c_m from the task's anchor map) or uniform noise U(0, I) (variant `noise`).
Each step of `erasediff`:
  1. phi^K: K (`inner_steps`) steps of gradient descent of size xi (`inner_lr`) on L_f from theta,
     on a copy of the trained group (evaluated with torch.func.functional_call, no second model);
  2. g = L_f(theta) - L_f(phi^K); with phi^K held constant, grad g = grad L_f(theta);
  3. direction = grad L_r + lambda_t * grad g, with `lambda_mode`
        paper: lambda_t = max(0, (a_t - grad_g . grad_Lr) / ||grad_g||^2), a_t = eta_a ||grad_g||^2,
               i.e. max(0, eta_a - grad_g . grad_Lr / ||grad_g||^2)  ([004] Thm. 3.1; the default);
        cos:   max(0, eta_a - cos(grad_Lr, grad_g)): the official code's rule, which it runs only
               when `--lambda_bome < 0` (`eta_bome` = eta_a = 0.1);
        fixed: `lambda_fixed`, the official `--lambda_bome`, the code's default mode: 0.1 by default
               (ddpm/main.py, sd/train_scripts/erasediff*.py), 1.0 as the SD recipes pass it
               (sd/train_scripts/train_cls.sh, train_nsfw.sh).
K and xi therefore only change the logged g, never the update. The same holds in the official
code (ddpm/runners/diffusion.py, sd/train_scripts/erasediff.py): its inner steps train the model
itself with the shared Adam and are then undone (`set_param`), and L_f(phi^K) enters the loss as
a detached constant, so K and xi (there the shared learning rate) move its update only because
the inner steps have advanced Adam's moment estimates. Here the inner descent runs on a copy and
leaves the optimiser alone. With a fixed lambda the official update is Adam on L_r + lambda L_f,
i.e. `erasediff-sum` with forget_weight = lambda (up to those moments).
`eta_a` is its own parameter, not the learning rate: with the lr in its place lambda_t ~ 0 and
the method degenerates to fine-tuning. Each step logs the cosine of the update with grad L_r and
with grad L_f ([004] Fig. 2). [004] §8: DDPM batch 128, Adam lr 1e-4, ~300 steps (the DDPM code
clips gradients at 1.0); SD lr 1e-5 (the SD scripts do not clip).

`erasediff-sum` is L_r + forget_weight * L_f, one descent step each. Its `paper` profile is the
EDiff that [001] Table 1 ran, UnlearnCanvas' `mu_erase_diff_ediff/train-erase.py` (batch 4,
lr 5e-5, 5 epochs, cross-attention, Adam without clipping, alpha = 0.1): there L_f takes the
*forget* images under the forget prompt, and its target is the model's own detached prediction
for the same x_t (same noise, same t) under the prompts of a retain batch, "A {object} image in
Photo style.". The data loaders are not shuffled and each batch is the first one
(`next(iter(loader))`), so the forget and retain batches list the same objects in the same order:
the target prompt is the forget prompt with its style replaced by the retain set's base style
Photo. In our terms that is variant `rl` (images=forget, prompt=forget, target=student-sg on the
anchor prompt) with weight 0.1, run with one base style as every concept's anchor
(`task.anchor_scheme=fixed:NAME`, as [001] App. C sets Forget01's baselines), plus
L_r = the denoising loss on D_r. The loss is `L_r + 0.1 (L_f - const)`: the constant (the inner
steps' mean L_f) has no gradient. [001] eq. 10 as printed (a uniform target, beta on L_r) is
variant `noise` with forget_weight = 1/beta.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from diffunlearn.methods.base import Method, MethodConfig
from diffunlearn.objectives import ParamsView, Term, draw_batch, term_losses

if TYPE_CHECKING:
    import torch


class EraseDiffConfig(MethodConfig):
    variant: Literal["rl", "noise"] = Field("noise", description="forget target: anchor prediction or U(0, I)")
    lambda_mode: Literal["paper", "cos", "fixed"] = Field("paper", description="how lambda_t is set")
    eta_a: float = Field(0.1, ge=0, description="a_t = eta_a * ||grad g||^2 (not the learning rate); cos: eta_bome")
    lambda_fixed: float = Field(0.1, ge=0, description="lambda_mode=fixed: lambda_t, the official --lambda_bome "
                                                       "(default 0.1; the SD recipes pass 1.0)")
    inner_steps: int = Field(2, ge=1, description="K: gradient steps of phi on L_f")
    inner_lr: float = Field(1e-4, gt=0, description="step size of the inner descent on L_f")


class EraseDiffSumConfig(MethodConfig):
    variant: Literal["rl", "noise"] = Field("noise", description="forget target: anchor prediction or U(0, I)")
    forget_weight: float = Field(1.0, ge=0, description="lambda in L_r + lambda * L_f")


class AnchorWhenRl:
    """`uses_anchor` of the EraseDiff methods: an instance has an alternative concept (AR_CL) only
    with the `rl` target; the class, which has no config, answers False."""

    def __get__(self, method, owner=None) -> bool:
        return method is not None and method.cfg.variant == "rl"


def forget_term(variant: str, weight: float = 1.0) -> Term:
    if variant == "rl":
        return Term("forget", images="forget", prompt="forget", target="student-sg", target_prompt="anchor",
                    weight=weight)
    return Term("forget", images="forget", prompt="forget", target="uniform", weight=weight)


RETAIN = Term("retain", images="retain", prompt="retain", target="gaussian")


class EraseDiffSum(Method):
    Config = EraseDiffSumConfig
    uses_anchor = AnchorWhenRl()
    paper = "[004] Fig. 2 'MOO'; [001] eq. 10"
    trains = "full UNet"
    needs_retain = True
    profiles = {
        # [001] Table 1's EDiff = UnlearnCanvas mu_erase_diff_ediff/train-erase.py defaults (see the docstring);
        # anchor: one base style for every concept (task.anchor_scheme=fixed:NAME), as [001] App. C
        "paper": {"lr": 5e-5, "batch_size": 4, "epochs": 5, "variant": "rl", "forget_weight": 0.1,
                  "param_group": "xattn", "grad_clip": None},
        # measured forgetting `dotted`: lr 2e-4 x 150, forget_weight 1: UA 100, IRA 82.5, CRA 92, SFID 2.4;
        # lr 5e-5 x 100: UA 100, IRA 63, CRA 74; forget_weight 0.1: IRA 91.5, CRA 93.5, SFID 4.6 (x 300
        # steps: IRA 78); 0.005: UA 10; forget_weight 0.02: UA 100, IRA 98, CRA 99, SFID 28.4 (chosen)
        "testbed": {"lr": 2e-4, "batch_size": 16, "steps": 150, "forget_weight": 0.02, "param_group": "full"},
    }

    def terms(self) -> list[Term]:
        return [RETAIN, forget_term(self.cfg.variant, self.cfg.forget_weight)]


class EraseDiff(Method):
    Config = EraseDiffConfig
    uses_anchor = AnchorWhenRl()
    paper = "[004] Alg. 1"
    trains = "full UNet"
    needs_retain = True
    profiles = {
        # the official SD recipe (sd/train_scripts/train_cls.sh, class forgetting): fixed lambda 1.0, K=1,
        # Adam lr 1e-5 (also the inner steps' size), batch 16, 2 epochs, every UNet weight, rl target, no clipping
        "paper": {"lr": 1e-5, "batch_size": 16, "epochs": 2, "variant": "rl", "lambda_mode": "fixed",
                  "lambda_fixed": 1.0, "inner_steps": 1, "inner_lr": 1e-5, "param_group": "full", "grad_clip": None},
        # measured forgetting `dotted`: 2e-4 x 150 broke retained concepts (IRA 51, CRA 52.5);
        # 5e-5 x 100: UA 100, IRA 80.5, CRA 96 (1e-4 x 100 ties: IRA 84.5, CRA 91)
        "testbed": {"lr": 5e-5, "batch_size": 16, "steps": 100, "eta_a": 0.1, "param_group": "full"},
    }

    def step(self, step: int, gen: torch.Generator) -> dict[str, float]:
        import torch

        cfg, model = self.cfg, self.backend
        params = dict(model.named_trainable())
        names = list(params)
        forget, retain = forget_term(cfg.variant), RETAIN
        batch_f = draw_batch(model, self.task, "forget", cfg.batch_size, gen)
        batch_r = draw_batch(model, self.task, "retain", cfg.batch_size, gen)
        # the forget targets are fixed for this step (same uniform noise / sg prediction for theta and phi)
        target_gen_seed = int(torch.randint(0, 2**62, (1,), generator=gen))

        def forget_loss(param_values: dict[str, torch.Tensor] | None) -> torch.Tensor:
            fixed = torch.Generator().manual_seed(target_gen_seed)
            return term_losses([forget], ParamsView(model, student=param_values), [batch_f], fixed)["forget"]

        loss_f = forget_loss(None)
        grad_f = model.grad(loss_f, [params[n] for n in names])
        # phi starts at theta (sharing its storage: neither is changed in place) and descends on L_f
        phi = [params[n].detach().requires_grad_(True) for n in names]
        for _ in range(cfg.inner_steps):
            grads = model.grad(forget_loss(dict(zip(names, phi, strict=True))), phi)
            with torch.no_grad():
                phi = [p.requires_grad_(True) for p in torch._foreach_add(phi, grads, alpha=-cfg.inner_lr)]
        with torch.no_grad():
            value_g = float(loss_f.detach() - forget_loss(dict(zip(names, phi, strict=True))))

        loss_r = term_losses([retain], model, [batch_r], gen)["retain"]
        grad_r = model.grad(loss_r, [params[n] for n in names])
        dots = GradientDots(_flat(grad_r), _flat(grad_f))
        lam = lambda_from_dots(dots, cfg.lambda_mode, cfg.eta_a, cfg.lambda_fixed)
        # the update direction grad_r + lambda grad_f, tensor by tensor (out of place: autograd may hand
        # two inputs one shared gradient tensor)
        # .grad holds loss-scaled gradients, as a backward pass under fp16 would leave them (1: no-op)
        scale = model.loss_scale
        for n, direction in zip(names, torch._foreach_add(grad_r, grad_f, alpha=lam), strict=True):
            params[n].grad = direction if scale == 1.0 else direction * scale
        cos_retain, cos_forget = dots.update_cosines(lam)
        loss_r, loss_f = float(loss_r.detach()), float(loss_f.detach())
        return {"loss": loss_r + lam * loss_f, "loss_retain": loss_r, "loss_forget": loss_f,
                "g": value_g, "lambda_t": float(lam), "cos_update_retain": cos_retain,
                "cos_update_forget": cos_forget}


class GradientDots:
    """The inner products of grad L_r and grad g that lambda_t and the logged cosines need, so
    the update direction grad_r + lambda grad_g is never materialised as one flat vector:
    d.r = rr + lambda rg, d.g = rg + lambda gg, ||d||^2 = rr + 2 lambda rg + lambda^2 gg."""

    def __init__(self, grad_r: torch.Tensor, grad_g: torch.Tensor):
        self.rr, self.gg, self.rg = float(grad_r @ grad_r), float(grad_g @ grad_g), float(grad_r @ grad_g)

    def cos_r_g(self) -> float:
        return _cos_from(self.rg, self.rr, self.gg)

    def update_cosines(self, lam: float) -> tuple[float, float]:
        """cos(d, grad_r) and cos(d, grad_g) for d = grad_r + lam * grad_g ([004] Fig. 2)."""
        dd = max(0.0, self.rr + 2 * lam * self.rg + lam * lam * self.gg)
        return _cos_from(self.rr + lam * self.rg, dd, self.rr), _cos_from(self.rg + lam * self.gg, dd, self.gg)


def lambda_t(grad_r: torch.Tensor, grad_g: torch.Tensor, mode: str, eta_a: float, fixed: float = 0.1) -> float:
    """EraseDiff's multiplier for grad g in the update direction ([004] Alg. 1 and its code)."""
    return lambda_from_dots(GradientDots(grad_r, grad_g), mode, eta_a, fixed)


def lambda_from_dots(dots: GradientDots, mode: str, eta_a: float, fixed: float = 0.1) -> float:
    if mode == "fixed":
        return fixed
    if mode == "cos":
        return max(0.0, eta_a - dots.cos_r_g())
    if dots.gg == 0.0:
        return 0.0
    a_t = eta_a * dots.gg
    return max(0.0, (a_t - dots.rg) / dots.gg)


def _flat(grads) -> torch.Tensor:
    import torch

    return torch.cat([g.reshape(-1) for g in grads])


def _cos_from(dot: float, norm_sq_a: float, norm_sq_b: float) -> float:
    """a.b / max(||a|| ||b||, 1e-12), from the inner products (torch's cosine_similarity, eps 1e-12)."""
    return dot / max((norm_sq_a * norm_sq_b) ** 0.5, 1e-12)
