"""`resurgence`: benign fine-tuning after unlearning ([000] §3, §5, App. C).

Fine-tunes (fully or with a peft LoRA) on images of concepts other than the erased ones, with
the plain denoising loss, and lets the caller measure whether the erased concepts come back.
The fine-tuning set follows [000]'s protocols:
- `random`: concepts of the erased concepts' own domain, chosen at random (paper: 10
  celebrities x 5 prompt templates x 5 images); on the testbed `concepts` is capped by the
  concepts available and the count used is recorded;
- `terciles`: each in-domain candidate's similarity to the erased concepts in the text encoder's
  embedding space (the concept token's output for its partial prompt; the paper uses CLIP),
  taken as the **maximum** over erased concepts and split into three equal-count groups
  (§5.1); `binning=equal-width` is App. C.2's variant (three equal-width bins of the
  **minimum** similarity). `tercile` picks the group;
- `out-of-domain`: concepts of the other domain (objects after erasing a style).
Every concept is shown alone, captioned by its domain's templates in the concept set (the
canvas has five per domain; a style is drawn on the neutral object, an object in the neutral
style, so no other in-domain concept appears); images are fresh held-out samples of the set's
image source, or the original model's generations from the captions (`images=generated`, as
the paper generated its sets).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Literal

from pydantic import Field

from diffunlearn.attacks.base import ATTACK_INDEX_OFFSET, Attack, AttackConfig, AttackData, concept_embedding
from diffunlearn.data.images import HELDOUT_OFFSET
from diffunlearn.data.tasks import TaskError

TERCILES = ("low", "middle", "high")


class ResurgenceConfig(AttackConfig):
    data: Literal["random", "terciles", "out-of-domain"] = Field(
        "random", description="random in-domain concepts | a similarity tercile of them | the other domain")
    tercile: Literal["low", "middle", "high"] = Field("high", description="data=terciles: which group")
    binning: Literal["quantile", "equal-width"] = Field(
        "quantile", description="data=terciles: equal-count groups of the max similarity ([000] §5.1), or "
                                "equal-width bins of the min similarity (App. C.2)")
    concepts: int = Field(10, ge=1, description="concepts in the set (paper: 10; capped by those available)")
    images_per_prompt: int = Field(5, ge=1, description="images per concept and template (paper: 5)")
    images: Literal["source", "generated"] = Field(
        "source", description="fresh held-out samples of the concept set's images, or generations of the original "
                              "model from the captions")
    data_seed: int = Field(0, description="seed of the concept choice")


class Resurgence(Attack):
    Config = ResurgenceConfig
    paper = "[000] §3, §5, App. C"
    profiles = {
        # LoRA is [000]'s primary fine-tuning (§4.3; full fine-tuning is its Fig. 8 comparison); [000] gives no
        # LoRA settings, so rank 4 on the attention projections at lr 1e-4 with gradients clipped at 1.0, the
        # defaults of diffusers' train_text_to_image_lora.py
        "paper": {"steps": 1000, "lr": 1e-4, "batch_size": 4, "mode": "lora", "lora_rank": 4, "grad_clip": 1.0,
                  "eval_every": 250},
        # measured on the ESD run forgetting `dotted` (300 steps, random styles): full fine-tuning wrecks the
        # model on this narrow set (lr 1e-4: retain acc 86 -> 51.5, FID 12 -> 284; lr 2e-5: 86 -> 59.5, FID 175);
        # LoRA, the paper's primary setting, at lr 1e-4: retain acc 86 -> 81.8, FID 12 -> 28.7 (chosen)
        "testbed": {"steps": 300, "lr": 1e-4, "batch_size": 16, "mode": "lora", "eval_every": 50},
    }

    def build_data(self) -> AttackData:
        import torch

        concepts, info = self.choose_concepts()
        cset, per_prompt = self.task.concept_set, self.cfg.images_per_prompt
        items, indices = [], []
        for concept in concepts:
            for k, item in enumerate(cset.alone_items(concept)):
                items += [item] * per_prompt
                indices += [HELDOUT_OFFSET + ATTACK_INDEX_OFFSET + k * per_prompt + i for i in range(per_prompt)]
        prompts = [cset.render(item) for item in items]
        if self.cfg.images == "source":
            images = torch.from_numpy(self.task.source.images(items, indices, self.task.image_size))
        else:
            images = self.original.sample(prompts, indices, steps=self.cfg.generation_steps,
                                          guidance=self.cfg.generation_guidance).float().cpu()
        templates = {c: len(cset.alone_items(c)) for c in concepts}
        info |= {"concepts": concepts, "templates": templates, "images_per_prompt": per_prompt,
                 "images": self.cfg.images}
        return AttackData(images, prompts, info, shown=[item.concepts for item in items])

    def choose_concepts(self) -> tuple[list[str], dict]:
        rng = random.Random(self.cfg.data_seed)
        forget, cset = self.task.forget, self.task.concept_set
        domains = {cset.domain_of(c) for c in forget}
        if self.cfg.data == "out-of-domain":
            if len(domains) > 1:
                raise TaskError("resurgence data=out-of-domain needs forget concepts of one domain")
            candidates = [c for c in cset.erasable() if cset.domain_of(c) not in domains]
            if not candidates:
                raise TaskError(f"resurgence data=out-of-domain: concept set {cset.name} has no other domain")
        else:
            candidates = [c for c in cset.erasable() if cset.domain_of(c) in domains and c not in forget]
        if not candidates:
            raise TaskError(f"resurgence: no {self.cfg.data} concepts to fine-tune on in concept set {cset.name}; "
                            "give retain concepts (--retain) or a concept set with more concepts")
        info: dict = {"data": self.cfg.data, "candidates": len(candidates)}
        if self.cfg.data == "terciles":
            similarity = concept_similarity(self.backend, cset, candidates, forget)
            groups, scores = tercile_groups(similarity, self.cfg.binning)
            candidates = groups[self.cfg.tercile]
            info |= {"tercile": self.cfg.tercile, "binning": self.cfg.binning, "scores": scores,
                     "groups": groups}
            if not candidates:
                raise TaskError(f"the {self.cfg.tercile} similarity bin ({self.cfg.binning}) is empty; "
                                "use binning=quantile or another tercile")
        chosen = sorted(rng.sample(candidates, min(self.cfg.concepts, len(candidates))))
        info["concepts_requested"] = self.cfg.concepts
        return chosen, info


def concept_similarity(backend, cset, candidates: list[str], erased: list[str]) -> dict[str, dict[str, float]]:
    """Cosine similarity of each candidate to each erased concept in the text encoder's output
    space: the mean output at the concept's token(s) of its first evaluation prompt (the
    canvas' partial prompt)."""
    import torch

    erased_vectors = {e: concept_embedding(backend, cset, e) for e in erased}
    return {c: {e: float(torch.nn.functional.cosine_similarity(concept_embedding(backend, cset, c), v, dim=0))
                for e, v in erased_vectors.items()} for c in candidates}


def tercile_groups(similarity: Mapping[str, Mapping[str, float]], binning: str = "quantile"
                   ) -> tuple[dict[str, list[str]], dict[str, float]]:
    """Split candidates into low / middle / high similarity to the erased concepts.

    quantile ([000] §5.1): score = maximum similarity over erased concepts; candidates sorted
    by score (ties by name) and cut into three groups of equal count (sizes differ by at most
    one, the larger groups first). equal-width (App. C.2): score = minimum similarity; three
    bins of equal width between the lowest and highest score (a bin may be empty).
    """
    reduce = max if binning == "quantile" else min
    scores = {c: reduce(sims.values()) for c, sims in similarity.items()}
    ordered = sorted(scores, key=lambda c: (scores[c], c))
    groups: dict[str, list[str]] = {name: [] for name in TERCILES}
    if binning == "quantile":
        size, extra = divmod(len(ordered), 3)
        start = 0
        for g, name in enumerate(TERCILES):
            end = start + size + (1 if g < extra else 0)
            groups[name] = ordered[start:end]
            start = end
    else:
        low, high = (scores[ordered[0]], scores[ordered[-1]]) if ordered else (0.0, 0.0)
        width = (high - low) / 3 or 1.0
        for c in ordered:
            groups[TERCILES[min(2, int((scores[c] - low) / width))]].append(c)
    return groups, scores
