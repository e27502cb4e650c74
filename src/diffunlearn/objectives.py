"""CORE's Concept-Erasing / Image-Relabeling framework ([001] §3.2) as composable terms.

Almost every fine-tuning unlearning method is a weighted sum of
`lambda * E || eps_theta(x_t, t, c) - y ||` where each term chooses
(a) where images come from: D_f (concept erasing), D_r, or the anchor concept's images
    paired with forget prompts (image relabelling, DiMUM's D_u');
(b) the prompt that conditions the trainable model;
(c) the target y: Gaussian eps, uniform noise, the frozen teacher eps_star(x_t, c'), the
    trainable model under stop-gradient, or ESD's guided target
    eps_star(x_t, "") - eta * (eps_star(x_t, c_f) - eps_star(x_t, ""));
(d) the sign and weight lambda.

All trainable forwards of a step run as one batched forward, and all frozen ones as
another (DESIGN.md rule 6). The module imports torch lazily so method configs can be
validated without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from diffunlearn.data import canvas
from diffunlearn.data.tasks import UnlearningTask, swap_concept

if TYPE_CHECKING:
    import torch

    from diffunlearn.backends.base import Backend

ImageSource = Literal["forget", "retain", "anchor"]
PromptKind = Literal["forget", "anchor", "retain", "empty"]
TargetKind = Literal["gaussian", "uniform", "teacher", "student-sg", "esd"]


@dataclass(frozen=True)
class Term:
    """One `weight * || eps_theta(x_t, prompt) - target ||` term of an unlearning loss."""

    name: str
    images: ImageSource
    prompt: PromptKind
    target: TargetKind
    target_prompt: PromptKind | None = None
    weight: float = 1.0
    eta: float = 1.0  # ESD's negative guidance (the official code's g = eta + 1)
    norm: Literal["squared", "l2"] = "squared"  # l2: unsquared per-sample norm (AdvAnchor, [001] eq. 11)


@dataclass
class TermBatch:
    """A term's sampled images, prompts and noise for one step."""

    x0: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    prompts: dict[str, list[str]]  # prompt kind -> one prompt per image


def sample_items(task: UnlearningTask, source: ImageSource, n: int, gen: torch.Generator):
    """Images and their prompts of every kind for `n` items drawn from `source`."""
    import torch

    pairs = task.forget_pairs() if source in ("forget", "anchor") else task.retain_pairs()
    if not pairs:
        raise ValueError(f"the task has no {source} images")
    pick = torch.randint(0, len(pairs) * task.images_per_pair, (n,), generator=gen).tolist()
    images, prompts = [], {"forget": [], "anchor": [], "retain": [], "empty": []}
    for flat in pick:
        pair, index = pairs[flat // task.images_per_pair], flat % task.images_per_pair
        own = canvas.full_prompt(*pair)
        if source == "retain":
            anchor_pair = pair
        else:
            concept = task.forget_concept_of(pair)
            options = task.anchor_map.get(concept) or [concept]
            anchor = options[int(torch.randint(0, len(options), (1,), generator=gen))]
            anchor_pair = swap_concept(*pair, concept, anchor)
        shown = anchor_pair if source == "anchor" else pair
        images.append(torch.from_numpy(task.pair_images(shown)[index]))
        prompts["forget"].append(own)
        prompts["retain"].append(own)
        prompts["anchor"].append(canvas.full_prompt(*anchor_pair))
        prompts["empty"].append("")
    return torch.stack(images), prompts


def draw_batch(backend: Backend, task: UnlearningTask, source: ImageSource, n: int,
               gen: torch.Generator) -> TermBatch:
    import torch

    images, prompts = sample_items(task, source, n, gen)
    x0 = backend.to_model_space(images.to(backend.device))
    noise = torch.randn(x0.shape, generator=gen).to(x0.device)
    t = torch.randint(0, backend.num_train_timesteps, (n,), generator=gen).to(x0.device)
    return TermBatch(x0, noise, t, prompts)


def term_losses(terms: list[Term], backend: Backend, batches: list[TermBatch],
                gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Each term's unweighted loss, with one trainable and one frozen batched forward."""
    import torch

    x_ts = [backend.add_noise(b.x0, b.noise, b.t) for b in batches]
    student = _batched(backend.eps, [(x, b.t, b.prompts[term.prompt]) for term, x, b in zip(terms, x_ts, batches,
                                                                                              strict=True)], backend)
    frozen_requests, sg_requests = [], []
    for term, x, b in zip(terms, x_ts, batches, strict=True):
        if term.target == "teacher":
            frozen_requests.append((x, b.t, b.prompts[term.target_prompt or term.prompt]))
        elif term.target == "esd":
            frozen_requests += [(x, b.t, b.prompts["forget"]), (x, b.t, b.prompts["empty"])]
        elif term.target == "student-sg":
            sg_requests.append((x, b.t, b.prompts[term.target_prompt or term.prompt]))
    frozen = iter(_batched(backend.teacher_eps, frozen_requests, backend)) if frozen_requests else iter(())
    with torch.no_grad():
        sg = iter(_batched(backend.eps, sg_requests, backend)) if sg_requests else iter(())

    losses = {}
    for term, pred, b in zip(terms, student, batches, strict=True):
        if term.target == "gaussian":
            target = b.noise
        elif term.target == "uniform":
            target = torch.rand(b.noise.shape, generator=gen).to(b.noise.device)
        elif term.target == "teacher":
            target = next(frozen)
        elif term.target == "esd":
            e_f, e_0 = next(frozen), next(frozen)
            target = e_0 - term.eta * (e_f - e_0)
        else:
            target = next(sg).detach()
        diff = pred - target
        losses[term.name] = diff.pow(2).mean() if term.norm == "squared" else diff.flatten(1).norm(dim=1).mean()
    return losses


def _batched(fn, requests: list[tuple[torch.Tensor, torch.Tensor, list[str]]], backend: Backend):
    """Run `fn(x_t, t, cond)` once over the concatenation of requests; split the result."""
    import torch

    x = torch.cat([r[0] for r in requests])
    t = torch.cat([r[1] for r in requests])
    cond = backend.encode([p for r in requests for p in r[2]])
    out = fn(x, t, cond)
    return list(out.split([len(r[0]) for r in requests]))


def compute_loss(terms: list[Term], backend: Backend, task: UnlearningTask, batch_size: int,
                 gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted sum of `terms` on freshly drawn batches, and each term's value for the curves."""
    batches = [draw_batch(backend, task, term.images, batch_size, gen) for term in terms]
    losses = term_losses(terms, backend, batches, gen)
    total = sum(term.weight * losses[term.name] for term in terms)
    logs = {f"loss_{name}": float(v.detach()) for name, v in losses.items()}
    logs["loss"] = float(total.detach())
    return total, logs
