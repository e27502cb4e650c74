"""CORE's Concept-Erasing / Image-Relabeling framework ([001] §3.2) as composable terms.

Almost every fine-tuning unlearning method is a weighted sum of
`lambda * E || eps_theta(x_t, t, c) - y ||` where each term chooses
(a) where images come from: D_f (concept erasing), D_r, the anchor concept's images
    paired with forget prompts (image relabelling, DiMUM's D_u'), or no images at all:
    x_t generated from the forget prompts and stopped at a random step (ESD data-free, SDD);
(b) the prompt that conditions the trainable model;
(c) the target y: Gaussian eps, uniform noise, the frozen teacher eps_star(x_t, c'), the
    trainable model under stop-gradient, or ESD's guided target
    eps_star(x_t, "") - eta * (eps_star(x_t, c_f) - eps_star(x_t, ""));
(d) the sign and weight lambda.

"eps" stands for the model's own prediction space (its scheduler's prediction_type): a noise
target is stated there by `backend.noise_target` (for a v-prediction model the Gaussian target
is v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0); model outputs (teacher, stop-gradient) already
are, and ESD's guided target is an affine combination of them with weights summing to one,
which is the same guidance in eps, v or x0 space.

All trainable forwards of a step run as one batched forward, and all frozen ones as
another (DESIGN.md rule 6). The module imports torch lazily so method configs can be
validated without it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from diffunlearn.data.tasks import UnlearningTask

if TYPE_CHECKING:
    import torch

    from diffunlearn.backends.base import Backend

ImageSource = Literal["forget", "retain", "anchor", "generated"]
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
    generation_steps: int = 50  # images="generated": DDIM steps of the sampler (ESD: 50)
    generation_guidance: float = 3.0  # images="generated": its guidance scale (ESD: 3)
    # images="generated": x_t is the state after k DDIM steps, k uniform in [first_stop, generation_steps - 1],
    # trained at that state's timestep. 0 as the official ESD code (esd_sd.py: run_till_timestep =
    # random.randint(0, 49)), where k = 0 trains on the initial noise at the first DDIM timestep.
    first_stop: int = 0
    # images="generated": draw each sample's training timestep uniformly from the DDPM steps of
    # the DDIM interval it stopped in, [t_stop, t_stop + stride), as SDD's train_sdd.py does;
    # off: t = t_stop, the exact level of x_t (ESD's esd_sd.py)
    timestep_jitter: bool = False


@dataclass
class TermBatch:
    """A term's sampled images, prompts and noise for one step."""

    x0: torch.Tensor | None
    noise: torch.Tensor | None
    t: torch.Tensor
    prompts: dict[str, list[str]]  # prompt kind -> one prompt per image
    x_t: torch.Tensor | None = None  # set for generated batches, which have no x0 or noise
    # data-parallel: the rows of the global batch this process holds, out of `full` (engine/distributed.py)
    rows: slice | None = None
    full: int | None = None

    def noisy(self, backend: Backend) -> torch.Tensor:
        return self.x_t if self.x_t is not None else backend.add_noise(self.x0, self.noise, self.t)

    def shard(self, rows: slice | None) -> TermBatch:
        """This process's rows of the batch (itself with one process)."""
        if rows is None:
            return self

        def cut(x):
            return None if x is None else x[rows]

        return TermBatch(cut(self.x0), cut(self.noise), self.t[rows], {k: v[rows] for k, v in self.prompts.items()},
                         x_t=cut(self.x_t), rows=rows, full=len(self.t))


def sample_items(task: UnlearningTask, source: ImageSource, n: int, gen: torch.Generator):
    """Images and their prompts of every kind for `n` items drawn from `source`.

    `anchor` shows, under the forget prompt, the anchor concept's image (the item with its
    forget concept swapped, DiMUM's D_u' and CA's anchor images); an empty anchor (no concept
    to steer to) is the item without the concept, prompted by the empty prompt.
    """
    import torch

    items = task.forget_items() if source in ("forget", "anchor") else task.retain_items()
    if not items:
        raise ValueError(f"the task has no {source} images")
    per_item = task.images_per_prompt
    pick = torch.randint(0, len(items) * per_item, (n,), generator=gen).tolist()
    shown, indices, prompts = [], [], {"forget": [], "anchor": [], "retain": [], "empty": []}
    for flat in pick:
        item, index = items[flat // per_item], flat % per_item
        own = task.prompt(item)
        anchor_item, anchor_prompt = item, own
        if source != "retain":
            concept = task.forget_concept_of(item)
            options = task.anchor_map.get(concept, [concept]) or [None]
            anchor = options[int(torch.randint(0, len(options), (1,), generator=gen))]
            anchor_item = item.swapped(concept, anchor) if anchor else item.without(concept)
            anchor_prompt = task.anchor_prompt(item, concept, anchor)
        shown.append(anchor_item if source == "anchor" else item)
        indices.append(index)
        prompts["forget"].append(own)
        prompts["retain"].append(own)
        prompts["anchor"].append(anchor_prompt)
        prompts["empty"].append("")
    return shown, indices, prompts


def draw_batch(backend: Backend, task: UnlearningTask, source: ImageSource, n: int,
               gen: torch.Generator) -> TermBatch:
    import torch

    items, indices, prompts = sample_items(task, source, n, gen)
    x0 = task.model_space(backend, items, indices, gen)
    noise = torch.randn(x0.shape, generator=gen).to(x0.device)
    t = torch.randint(0, backend.num_train_timesteps, (n,), generator=gen).to(x0.device)
    return TermBatch(x0, noise, t, prompts)


def generate_batch(backend: Backend, term: Term, task: UnlearningTask, n: int, gen: torch.Generator) -> TermBatch:
    """x_t sampled from the forget prompts and stopped after a random number of DDIM steps
    (`term.first_stop` to `generation_steps - 1`, one draw per batch), by the teacher weights: the
    frozen original for ESD (data-free, as the official esd_sd.py), the EMA for SDD (a ParamsView's
    teacher, as train_sdd.py)."""
    import torch

    _, _, prompts = sample_items(task, "forget", n, gen)
    timesteps = backend.ddim_timesteps(term.generation_steps)
    if not 0 <= term.first_stop < len(timesteps):
        raise ValueError(f"term '{term.name}': first_stop {term.first_stop} must lie in [0, {len(timesteps) - 1}]")
    t_stop = timesteps[int(torch.randint(term.first_stop, len(timesteps), (1,), generator=gen))]
    seeds = torch.randint(0, 2**31 - 1, (n,), generator=gen).tolist()
    x_t = backend.sample(prompts["forget"], seeds, steps=term.generation_steps, guidance=term.generation_guidance,
                         stop_at=t_stop, params=backend.teacher_params() or None)
    t = torch.full((n,), t_stop, dtype=torch.long)
    if term.timestep_jitter:
        stride = timesteps[0] - timesteps[1]
        t = t + torch.randint(0, stride, (n,), generator=gen)
    return TermBatch(None, None, t.to(x_t.device), prompts, x_t=x_t)


def make_batch(backend: Backend, task: UnlearningTask, term: Term, n: int, gen: torch.Generator) -> TermBatch:
    if term.images == "generated":
        return generate_batch(backend, term, task, n, gen)
    return draw_batch(backend, task, term.images, n, gen)


def term_losses(terms: list[Term], backend: Backend, batches: list[TermBatch],
                gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Each term's unweighted loss, with one trainable and one frozen batched forward."""
    import torch

    x_ts = [b.noisy(backend) for b in batches]
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
        if term.target in ("gaussian", "uniform"):
            if b.x0 is None:
                raise ValueError(f"term '{term.name}': a {term.target} noise target needs images, not generated x_t")
            # the noise (the Gaussian that made x_t, or U(0, I) in its place) as the model's own
            # prediction space states it: the noise itself for eps, sqrt(abar) u - sqrt(1 - abar) x0 for v
            noise = b.noise if term.target == "gaussian" else _uniform(pred, b, gen)
            target = backend.noise_target(b.x0, noise, b.t)
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


def _uniform(pred: torch.Tensor, batch: TermBatch, gen: torch.Generator) -> torch.Tensor:
    """U(0, I) noise for a batch: drawn for the whole global batch, so a data-parallel process
    holds the rows one process would have drawn for them."""
    import torch

    if batch.rows is None:
        return torch.rand(pred.shape, generator=gen).to(pred.device)
    return torch.rand((batch.full, *pred.shape[1:]), generator=gen)[batch.rows].to(pred.device)


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
    from diffunlearn.engine.distributed import shard_rows

    rows = shard_rows(batch_size)  # every process draws the global batch and keeps its rows
    batches = [make_batch(backend, task, term, batch_size, gen).shard(rows) for term in terms]
    losses = term_losses(terms, backend, batches, gen)
    total = sum(term.weight * losses[term.name] for term in terms)
    logs = {f"loss_{name}": float(v.detach()) for name, v in losses.items()}
    logs["loss"] = float(total.detach())
    return total, logs


def denoising_loss(backend: Backend, x0: torch.Tensor, prompts: list[str], gen: torch.Generator) -> torch.Tensor:
    """The plain DDPM loss E ||eps - eps_theta(x_t, t, c)||^2 on given images and captions (its
    target in the model's prediction space, `backend.noise_target`): the relearning attack's loss
    ([002] eq. 7) and benign fine-tuning's ([000] §3)."""
    import torch

    noise = torch.randn(x0.shape, generator=gen).to(x0.device)
    t = torch.randint(0, backend.num_train_timesteps, (len(x0),), generator=gen).to(x0.device)
    pred = backend.eps(backend.add_noise(x0, noise, t), t, backend.encode(prompts))
    return (pred.float() - backend.noise_target(x0, noise, t)).pow(2).mean()


def forget_gradients(backend: Backend, task: UnlearningTask, batch_size: int, batches: int, seed: int,
                     guidance: float = 0.0) -> Iterator[dict[str, torch.Tensor]]:
    """Yield, for each of `batches` forget batches, the gradient per trainable weight of

        E_{D_f} || eps - [(1 + w) eps_theta(x_t, c_f) - w eps_theta(x_t, "")] ||^2,   w = `guidance`

    (w = 0: the plain conditional denoising loss). SalUn's saliency and Scissorhands' connection
    sensitivity are built from these, each combining the batches as its official code does.
    Batch k is drawn with its own generator (seed, -1 - k), so the scores do not depend on the
    training steps' randomness; the gradients are left cleared."""
    import torch

    from diffunlearn.engine.loop import step_generator

    params = dict(backend.named_trainable())
    try:
        for k in range(batches):
            for p in params.values():
                p.grad = None
            batch = draw_batch(backend, task, "forget", batch_size, step_generator(seed, -1 - k))
            x_t = batch.noisy(backend)
            requests = [(x_t, batch.t, batch.prompts["forget"])]
            if guidance:  # cond and uncond in one forward (DESIGN.md rule 6)
                requests.append((x_t, batch.t, batch.prompts["empty"]))
            eps = _batched(backend.eps, requests, backend)
            pred = eps[0] if not guidance else (1 + guidance) * eps[0] - guidance * eps[1]
            backend.backward((pred - backend.noise_target(batch.x0, batch.noise, batch.t)).pow(2).mean())
            # fresh tensors each batch (p.grad was None), so the caller may keep them; unscaled under fp16
            scale = backend.loss_scale
            yield {n: (p.grad if scale == 1.0 else p.grad / scale) if p.grad is not None else torch.zeros_like(p)
                   for n, p in params.items()}
    finally:
        for p in params.values():
            p.grad = None


class ParamsView:
    """The backend with named parameters replaced: `student` in trainable forwards (EraseDiff's
    phi), `teacher` in frozen forwards and in the sampler of generated x_t (SDD's EMA, which
    both samples x_t and is the model SDD delivers). Everything else is the backend's."""

    def __init__(self, backend: Backend, student=None, teacher=None):
        self._backend, self._student, self._teacher = backend, student, teacher

    def eps(self, x_t, t, cond, params=None):
        return self._backend.eps(x_t, t, cond, params=self._student if params is None else params)

    def teacher_eps(self, x_t, t, cond):
        if self._teacher is None:
            return self._backend.teacher_eps(x_t, t, cond)
        import torch

        with torch.no_grad():
            return self._backend.eps(x_t, t, cond, params=self._teacher)

    def teacher_params(self) -> dict[str, torch.Tensor]:
        return self._backend.teacher_params() if self._teacher is None else self._teacher

    def __getattr__(self, name):
        return getattr(self._backend, name)
