"""`mace`: Mass Concept Erasure (Lu et al. 2024; [000] eq. 1 and §2), as the official code
Shilin-LU/MACE does it (`training.py` runs `src/cfr_lora_training.py` then
`src/fuse_lora_close_form.py`; helpers in `src/cfr_utils.py`, `src/dataset.py`).

1. Closed-form refinement (CFR) of every attn2 to_k / to_v weight W (`cfr_utils.closed_form_refinement`):
       W' = (lamb W + sum_i (W e_i^gen) (e_i^co)^T + lambda1 sum_j (W0 p_j) p_j^T)
            (lamb I + sum_i e_i^co (e_i^co)^T + lambda1 sum_j p_j p_j^T)^-1
   i.e. min_W' sum_i ||W' e_i^co - W e_i^gen||^2 + lambda1 sum_j ||W' p_j - W0 p_j||^2 + lamb ||W' - W||^2.
   Token sets (`cfr_utils.find_matching_indices` and `prepare_k_v` with all_words=False): each
   prompt naming the concept is paired with the same prompt naming the mapping concept instead
   (`MACEDataset`: the same template filled with either). Their token ids (BOS ... EOS, unpadded)
   share a prefix and a suffix:
   - prefix positions (BOS and the words before the concept) pair with themselves; the causal
     text encoder makes both embeddings equal there, so these are identity constraints W' e = W e;
   - the concept's own tokens (and the mapping's) are dropped;
   - the suffix (the later words and EOS) pairs position by position, aligned from the end;
   - every position after EOS up to the context length (the padding, which the encoder fills
     with the prompt's trace and the UNet attends to) pairs with the position the same distance
     after the mapped prompt's EOS, as far as both lie inside the context.
   e^co are the prompt's embeddings at its positions, e^gen the mapped prompt's at theirs.
   The prior p_j: every position, padding included, of the retain concepts' prompts with the
   original weights W0 as targets (the official prior cache, `src/cache_coco.py`, uses
   all_words=True on the original model); the object configs set its weight, train_preserve_scale,
   to 0. Mapping concepts: 'ground' for objects, none for celebrities; testbed: the generic
   words `shape` / `pattern`.
2. One rank-r LoRA per concept on the attn2 K/V projections, through peft, trained on the
   shared loop with AdamW (betas 0.9/0.999, weight decay 0.01), gradient clipping at norm 1 and a
   constant lr (`cfr_lora_training.main`), to suppress the concept's cross-attention inside its
   mask. Loss (`cfr_utils.AttnController`, called from `mace_lora_atten_processor.AttnProcessor`
   on every cross-attention layer): in each layer, the attention probabilities of all heads at the
   pixels inside the mask (the mask resized to the layer's resolution by nearest neighbour and
   kept where > 0.5) and at the concept positions (`MACEDataset.__getitem__`: every occurrence of
   the concept's tokens, and with `use_pooler` every position holding the end-of-text token:
   EOS, plus every padding position on SD v1.x, whose CLIP tokenizer pads with <|endoftext|>);
   the loss is the sum over layers of the (unsquared) Frobenius norm of that selection. The
   official code trains one image per step; with a batch, the loss is that per-image value
   averaged over the batch. Masks come from `mask_source`: `source`, the image source's masks
   of the concept where it has them (the canvas renderer's object masks), else the whole image, as
   the official code does without a Grounded-SAM mask; `full`, always the whole image.
3. Closed-form fusion of all LoRAs (`fuse_lora_close_form.main`: `prepare_k_v` with
   all_words=True, prepare_k_v_for_lora=True): every position (padding included) of every
   concept prompt, targets (W + dW_c) e, ridge lamb towards the refined W, prior as in step 1
   weighted lambda2 (fuse_preserve_scale); then the adapters are removed: the result is a plain model.
LoRA timesteps: `timesteps=cfis` is MACE's concept-focal importance sampling (MACE eq. 5,
official `importance_sampling_fn`): p(t) proportional to sigmoid(g (t - t1)) - sigmoid(g (t - t2))
with t1 = 200, t2 = 400, g = 0.05 for 1000 training timesteps, scaled to the model's count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from diffunlearn.data.concepts import ConceptSet, Item
from diffunlearn.methods.base import Method, MethodConfig

if TYPE_CHECKING:
    import torch

    from diffunlearn.engine.loop import LoopConfig


class MACEConfig(MethodConfig):
    lamb: float = Field(1e3, ge=0, description="ridge weight keeping W' near W (refinement and fusion)")
    lambda1: float = Field(0.0, ge=0, description="refinement: weight keeping retain prompts' projections "
                           "(official train_preserve_scale; [000]'s lambda1)")
    lambda2: float = Field(0.0, ge=0, description="fusion: weight keeping retain prompts' projections "
                           "(official fuse_preserve_scale)")
    mapping: str | None = Field(None, description="text every erased concept is mapped to; default: its domain's "
                                "generic word in the concept set (the canvas: pattern / shape)")
    lora_rank: int = Field(1, ge=1)
    mask_source: Literal["source", "full"] = Field(
        "source", description="concept masks: the image source's (whole image where it has none), or the whole image")
    use_pooler: bool = Field(True, description="the LoRA loss also suppresses attention to the end-of-text "
                             "token(s), as the official use_pooler")
    timesteps: Literal["uniform", "cfis"] = Field(
        "uniform", description="LoRA training timesteps: uniform, or MACE's concept-focal importance sampling")


class MACE(Method):
    Config = MACEConfig
    paper = "Lu et al. 2024; [000] eq. 1"
    trains = "attn2 to_k / to_v (closed form + fused LoRAs)"
    closed_form = True
    profiles = {
        # configs/object/erase_ship.yaml with cfr_lora_training.py's optimizer: AdamW (weight decay
        # 0.01), max_grad_norm 1, constant lr 1e-5, 50 steps of batch 1, rank 1, lamb 1e3,
        # train/fuse preserve scales 0, use_pooler, importance sampling
        "paper": {"lr": 1e-5, "steps": 50, "batch_size": 1, "optimizer": "adamw", "weight_decay": 0.01,
                  "grad_clip": 1.0, "schedule": "constant", "lora_rank": 1, "lamb": 1e3, "lambda1": 0.0,
                  "lambda2": 0.0, "use_pooler": True, "timesteps": "cfis", "param_group": "xattn-kv"},
        # measured forgetting `dotted` (fast evaluation) with the official token sets, loss and AdamW
        # (weight decay 0.01), batch 8, 50 steps, CFIS timesteps; UA / IRA / CRA / SFID:
        # lr 1e-3: lamb 1: 100 / 99.5 / 98 / 36; lamb 10: 100 / 99.5 / 98.5 / 92.5 (chosen);
        # lamb 10 without use_pooler: 100 / 99.5 / 98.5 / 83; lamb 100: 100 / 99.5 / 99 / 70;
        # lamb 1000: 35 / 100 / 99 / 100 (the weak refinement leaves the concept); lr 5e-4, lamb 10:
        # 100 / 99 / 99 / 57.5; lr 1e-4, lamb 100: 90 / 99.5 / 99 / 76; lr 3e-3, lamb 100: 100 / 97 / 65.5 / 2
        # (2026-11-23). Before the fidelity fix (concept + later tokens to EOS, squared soft-mask loss,
        # Adam) lr 1e-3, lamb 100 measured 90 / 99.5 / 99.5 / 100.
        "testbed": {"lr": 1e-3, "steps": 50, "batch_size": 8, "optimizer": "adamw", "weight_decay": 0.01,
                    "lamb": 10.0, "timesteps": "cfis", "param_group": "xattn-kv"},
    }

    def param_group(self) -> str:
        return "xattn-kv"

    def mapping(self, concept: str) -> str:
        if self.cfg.mapping is not None:
            return self.cfg.mapping
        cset = self.task.concept_set
        return cset.domains[cset.domain_of(concept)].generic

    def training_items(self, concept: str) -> list[Item]:
        """The forget set's prompts that show `concept` (the LoRA's images and prompts)."""
        return [i for i in self.task.forget_items() if concept in i.concepts]

    def concept_items(self, concept: str) -> list[Item]:
        """Every prompt of the concept (the official dataset's prompts): its training prompts and
        the prompts naming it alone."""
        full = self.training_items(concept)
        return full + [i for i in self.task.concept_set.alone_items(concept, evaluation=True) if i not in full]

    def concept_prompts(self, concept: str) -> list[str]:
        return [self.task.prompt(i) for i in self.concept_items(concept)]

    def setup(self) -> None:
        self._original = {n: p.detach().clone() for n, p in self.backend.param_group(self.param_group()).items()}

    def apply_closed_form(self) -> dict[str, float]:
        self.refine()
        deltas = {c: self.train_lora(c) for c in self.task.forget}
        self.fuse(deltas)
        return {"loss": 0.0, "concepts": float(len(deltas))}

    # ---- step 1: closed-form refinement ----------------------------------------------------------
    def refine(self) -> None:
        import torch

        co, gen = [], []
        for concept in self.task.forget:
            for item in self.concept_items(concept):
                mapped = mapped_prompt(self.task.concept_set, item, concept, self.mapping(concept))
                c, g = co_occurring_embeddings(self.backend, self.task.prompt(item), mapped)
                co.append(c)
                gen.append(g)
        e_co, e_gen = torch.cat(co), torch.cat(gen)
        cset = self.task.concept_set
        prior = retain_embeddings(self.backend, cset, self.task.retain) if self.cfg.lambda1 > 0 else None
        with torch.no_grad():
            for _, to_k, to_v in self.backend.xattn_kv_layers():
                for linear in (to_k, to_v):
                    weight = linear.weight  # still the original here: it is also the prior's target
                    linear.weight.copy_(closed_form_edit(weight, e_co, e_gen @ weight.T, self.cfg.lamb,
                                                         prior, weight, self.cfg.lambda1))

    # ---- step 2: one LoRA per concept -----------------------------------------------------------
    def lora_loop_config(self, concept: str) -> LoopConfig:
        """The shared loop's settings for one concept's LoRA: the method's optimizer, weight
        decay, clipping and schedule (the paper profile: the official AdamW recipe)."""
        from diffunlearn.engine.loop import LoopConfig

        c = self.cfg
        return LoopConfig(steps=c.steps, lr=c.lr, optimizer=c.optimizer, weight_decay=c.weight_decay,
                          grad_clip=c.grad_clip, warmup=c.warmup, schedule=c.schedule, seed=self.task.seed,
                          progress=False, description=f"mace lora ({concept})", log_every=max(1, c.steps))

    def train_lora(self, concept: str) -> dict[str, torch.Tensor]:
        """Train a rank-r LoRA that suppresses the concept's attention inside its mask; return
        each adapted weight's delta (B A * scaling) and remove the adapter."""
        from diffunlearn.engine.loop import run_loop

        params = self.add_concept_lora(concept)
        try:
            run_loop(params, lambda k, gen: self.attention_step(concept, gen), self.lora_loop_config(concept),
                     loss_scaler=self.backend.loss_scaler)
            return self.backend.lora_deltas(f"mace-{concept}")
        finally:
            self.backend.remove_lora()
            self.backend.set_trainable(self.param_group())  # names are plain again; refresh grads
            self.backend.snapshot_teacher(self._original)

    def add_concept_lora(self, concept: str) -> dict[str, torch.nn.Parameter]:
        """Attach the concept's LoRA (adapter `mace-{concept}`) to the attn2 K/V projections and
        return its parameters, the only trainable ones."""
        # peft's 'gaussian' init is the official LoRALinearLayer's: A ~ N(0, 1/r), B = 0
        return self.backend.add_lora(f"mace-{concept}", self.backend.attention_projections("xattn-kv"),
                                     self.cfg.lora_rank, init="gaussian")

    def attention_step(self, concept: str, gen: torch.Generator) -> dict[str, float]:
        import torch

        pool, n = self.training_items(concept), self.task.images_per_prompt
        pick = torch.randint(0, len(pool) * n, (self.cfg.batch_size,), generator=gen).tolist()
        items, indices = [pool[i // n] for i in pick], [i % n for i in pick]
        x0 = self.task.model_space(self.backend, items, indices, gen)
        masks = concept_masks(self.task, items, indices, concept, self.cfg.mask_source)
        noise = torch.randn(x0.shape, generator=gen).to(x0.device)
        t = self.lora_timesteps(len(items), gen).to(x0.device)
        prompts = [self.task.prompt(i) for i in items]
        positions = [attended_positions(self.backend.tokenizer, pr, concept, self.cfg.use_pooler) for pr in prompts]
        with self.backend.capture_attention() as store:
            self.backend.eps(self.backend.add_noise(x0, noise, t), t, self.backend.encode(prompts))
        loss = attention_in_mask(store, masks.to(x0.device), positions)
        self.backend.backward(loss)
        return {"loss": float(loss.detach())}

    def lora_timesteps(self, n: int, gen: torch.Generator) -> torch.Tensor:
        import torch

        total = self.backend.num_train_timesteps
        if self.cfg.timesteps == "uniform":
            return torch.randint(0, total, (n,), generator=gen)
        return torch.multinomial(cfis_probabilities(total), n, replacement=True, generator=gen)

    # ---- step 3: fusion --------------------------------------------------------------------------
    def fuse(self, deltas: dict[str, dict[str, torch.Tensor]]) -> None:
        import torch

        # every position of every concept prompt, padding included
        embeds = {c: self.backend.encode(self.concept_prompts(c)).flatten(0, 1) for c in deltas}
        cset = self.task.concept_set
        prior = retain_embeddings(self.backend, cset, self.task.retain) if self.cfg.lambda2 > 0 else None
        modules = dict(self.backend.unet.named_modules())
        with torch.no_grad():
            for name, _, _ in self.backend.xattn_kv_layers():
                for proj in ("to_k", "to_v"):
                    linear = modules[f"{name}.{proj}"]
                    weight = linear.weight
                    contexts = torch.cat([embeds[c] for c in deltas])
                    values = torch.cat([embeds[c] @ (weight + deltas[c][f"{name}.{proj}"]).T for c in deltas])
                    original = self._original[f"{name}.{proj}.weight"]  # the prior keeps the original model's outputs
                    linear.weight.copy_(closed_form_edit(weight, contexts, values, self.cfg.lamb, prior, original,
                                                         self.cfg.lambda2))


def cfis_probabilities(total: int) -> torch.Tensor:
    """MACE's concept-focal sampling distribution over `total` timesteps: most mass on the
    band [0.2, 0.4] * total, where the official code (1000 steps) puts t1 = 200, t2 = 400."""
    import torch

    scale = total / 1000
    t = torch.arange(total, dtype=torch.float64)
    gamma = 0.05 / scale
    weight = torch.sigmoid(gamma * (t - 200 * scale)) - torch.sigmoid(gamma * (t - 400 * scale))
    return (weight / weight.sum()).float()


def closed_form_edit(weight: torch.Tensor, contexts: torch.Tensor, values: torch.Tensor, lamb: float,
                     prior: torch.Tensor | None = None, prior_weight: torch.Tensor | None = None,
                     preserve_scale: float = 0.0) -> torch.Tensor:
    """`cfr_utils.closed_form_refinement`: the W' (out x d) minimising
    sum_i ||W' c_i - v_i||^2 + preserve_scale sum_j ||W' p_j - W_p p_j||^2 + lamb ||W' - W||^2, i.e.
    W' = (lamb W + V^T C + s (P W_p^T)^T P) (lamb I + C^T C + s P^T P)^-1,
    with contexts C (n x d), values V (n x out) as rows, prior P (m x d) and its weight W_p."""
    import torch

    w = weight.double()
    c, v = contexts.double(), values.double()
    left = lamb * w + v.T @ c
    right = lamb * torch.eye(w.shape[1], dtype=w.dtype, device=w.device) + c.T @ c
    if prior is not None and len(prior) and preserve_scale > 0:
        p = prior.double()
        left = left + preserve_scale * (p @ prior_weight.double().T).T @ p
        right = right + preserve_scale * p.T @ p
    return torch.linalg.solve(right, left.T).T.to(weight.dtype)  # right is symmetric: W' = left @ right^-1


def mapped_prompt(concept_set: ConceptSet, item: Item, concept: str, mapping: str) -> str:
    """The item's prompt with the concept replaced by the mapping text, as the official dataset
    fills the same template with either; an empty mapping removes the concept."""
    return " ".join(concept_set.render(item.swapped(concept, mapping)).split())


def matching_positions(old: Sequence[int], new: Sequence[int]) -> tuple[list[int], list[int]]:
    """`cfr_utils.find_matching_indices`: the positions of the common prefix and the common
    suffix of two token sequences, in each; the differing middle (the concept) is left out."""
    prefix = 0
    while prefix < min(len(old), len(new)) and old[prefix] == new[prefix]:
        prefix += 1
    end_old, end_new = len(old) - 1, len(new) - 1
    while end_old >= prefix and end_new >= prefix and old[end_old] == new[end_new]:
        end_old -= 1
        end_new -= 1
    return ([*range(prefix), *range(end_old + 1, len(old))],
            [*range(prefix), *range(end_new + 1, len(new))])


def refinement_positions(old: Sequence[int], new: Sequence[int], context_length: int) -> tuple[list[int], list[int]]:
    """`cfr_utils.prepare_k_v` (all_words=False): the matching positions of the two unpadded
    token sequences, extended past their last token (EOS) into the padding: position last + k
    of one pairs with last + k of the other, for every k keeping both inside the context."""
    old_pos, new_pos = matching_positions(old, new)
    if not old_pos:
        return [], []
    old_last, new_last = old_pos[-1], new_pos[-1]
    after = range(1, context_length - max(old_last, new_last))
    return [*old_pos, *(old_last + k for k in after)], [*new_pos, *(new_last + k for k in after)]


def co_occurring_embeddings(backend, prompt: str, mapped: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(e^co, e^gen): the prompt's text-encoder outputs at its refinement positions and the mapped
    prompt's at the paired positions (see the module docstring, step 1)."""
    length = backend.tokenizer.max_length
    old_pos, new_pos = refinement_positions(backend.tokenizer.ids(prompt)[:length],
                                            backend.tokenizer.ids(mapped)[:length], length)
    hidden = backend.encode([prompt, mapped])
    return hidden[0, old_pos], hidden[1, new_pos]


def retain_embeddings(backend, concept_set: ConceptSet, concepts: list[str]):
    """Every position, padding included, of the prompts naming each retain concept alone (the
    prior set; the canvas: its partial prompts)."""
    if not concepts:
        return None
    prompts = [concept_set.render(i) for c in concepts for i in concept_set.alone_items(c, evaluation=True)]
    return backend.encode(prompts).flatten(0, 1)


def attended_positions(tokenizer, prompt: str, concept: str, use_pooler: bool) -> list[int]:
    """`MACEDataset.__getitem__`'s concept positions in the padded prompt: every occurrence of the
    concept's token ids and, with `use_pooler`, every position holding the end-of-text id."""
    ids = tokenizer([prompt])[0].tolist()
    sub = tokenizer.ids(concept, special=False)
    end_id = tokenizer.ids("")[-1]  # every encoded prompt ends with the end-of-text token
    marked = set()
    for i in range(len(ids)):
        if sub and ids[i : i + len(sub)] == sub:
            marked.update(range(i, i + len(sub)))
        if use_pooler and ids[i] == end_id:
            marked.add(i)
    return sorted(marked)


def concept_masks(task, items: list[Item], indices: list[int], concept: str, source: str):
    """(B, H, W): where `concept` is in each image: the image source's mask of it, or the whole
    image (a source without masks of this concept, a style, or `source="full"`)."""
    import torch

    size = task.image_size
    masks = task.masks(items, indices, concept) if source == "source" else None
    if masks is None:
        return torch.ones(len(items), size, size)
    return torch.from_numpy(masks).float()


def attention_in_mask(store: dict[str, list[torch.Tensor]], masks: torch.Tensor, positions: list[list[int]]):
    """`cfr_utils.AttnController.loss` per image, averaged over the batch: the sum over layers of
    the Frobenius norm of the attention probabilities (all heads) at the pixels inside the mask
    (resized by nearest neighbour, kept where > 0.5) and the concept's token positions.
    `store`: layer -> [(B, heads, pixels, tokens)]; `masks`: (B, H, W); `positions`: per image."""
    import torch
    import torch.nn.functional as F

    per_layer = []
    for probs_list in store.values():
        for probs in probs_list:
            batch, _, pixels, tokens = probs.shape
            side = round(pixels ** 0.5)
            inside = F.interpolate(masks[:, None].float(), size=(side, side), mode="nearest").flatten(1) > 0.5
            chosen = torch.zeros(batch, tokens, dtype=torch.bool, device=probs.device)
            for b, pos in enumerate(positions):
                chosen[b, pos] = True
            selected = probs * (inside[:, None, :, None] & chosen[:, None, None, :])
            # vector_norm's gradient at a zero selection is 0 (an empty mask at a coarse layer)
            per_layer.append(torch.linalg.vector_norm(selected, dim=(1, 2, 3)))
    return torch.stack(per_layer).sum(0).mean()
