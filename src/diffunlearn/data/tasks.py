"""The one definition of D_f, D_r and the anchor map, used by every method and attack.

A task reads its world from a concept set (data/concepts.py) and its images from an image
source (data/images.py). D_f = the first n images (default 3, as CORE) of every item (labelled
prompt) that shows a forget concept; D_r = the first n images of every other item that shows a
retain concept (or only neutral ones). The anchor map (`anchor_scheme`, METHODS.md) is seeded
and recorded in every run's config. Training images are cached in memory and, for the canvas,
under the user cache directory.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from diffunlearn.data.concepts import ConceptSet, ConceptSetError, Item

if TYPE_CHECKING:
    from diffunlearn.data.images import ImageSource

ANCHOR_SCHEMES = ("auto", "next", "fixed:NAME", "one-to-one", "all-to-one", "five-to-one", "one-to-all",
                  "one-to-five")


class TaskError(ConceptSetError):
    """An unlearning task the user asked for that cannot exist (unknown concept, overlap...)."""


def cache_dir() -> Path:
    root = os.environ.get("DIFFUNLEARN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "diffunlearn")
    return Path(root)


def validate_anchor_scheme(scheme: str, concept_set: ConceptSet) -> None:
    if scheme.startswith("fixed:"):
        name = scheme.split(":", 1)[1]
        if name not in concept_set:
            raise TaskError(f"anchor_scheme fixed:{name}: unknown concept in concept set {concept_set.name}; valid: "
                            f"{', '.join([c.name for d in concept_set.domains.values() for c in d.all][:40])}")
        return
    if scheme not in ANCHOR_SCHEMES:
        raise TaskError(f"unknown anchor_scheme '{scheme}'; valid: {', '.join(ANCHOR_SCHEMES)}")


def build_anchor_map(forget: list[str], retain: list[str], scheme: str, seed: int,
                     concept_set: ConceptSet | None = None) -> dict[str, list[str]]:
    """Map each forget concept to its anchor candidate(s) in the same domain.

    A single candidate is used as is; several (one-to-all, one-to-five) are resampled at
    every step by the method. `one-to-one` is a seeded bijection onto retain concepts, or a
    derangement among the forget concepts when they outnumber the retain set (CORE). `auto`
    (the default) keeps a concept's own anchor (`--anchor`, or its entry in a concept-set file),
    else maps one-to-one where the domain has retain concepts, else to the empty prompt ([]).
    """
    cset = concept_set or ConceptSet.builtin("canvas")
    validate_anchor_scheme(scheme, cset)
    rng = random.Random(seed)
    out: dict[str, list[str]] = {}
    for domain in cset.domains.values():
        forget_d = [f for f in forget if cset.domain_of(f) == domain.name]
        if not forget_d:
            continue
        retain_d = [r for r in retain if cset.domain_of(r) == domain.name]
        if scheme == "auto":
            own = {f: [cset.concept(f).anchor] for f in forget_d if cset.concept(f).anchor}
            rest = [f for f in forget_d if f not in own]
            out.update(own)
            if rest and (retain_d or len(rest) > 1):
                out.update(_one_to_one(rest, retain_d, rng))
            else:
                out.update({f: [] for f in rest})
        elif scheme.startswith("fixed:"):
            out.update({f: [scheme.split(":", 1)[1]] for f in forget_d})
        elif scheme == "next":
            order = domain.erasable
            for f in forget_d:
                i = order.index(f)
                following = [order[(i + k) % len(order)] for k in range(1, len(order))]
                out[f] = [next((c for c in following if c not in forget), following[0] if following else f)]
        elif scheme == "one-to-one":
            out.update(_one_to_one(forget_d, retain_d, rng))
        elif not retain_d:
            raise TaskError(f"anchor_scheme {scheme} needs retain concepts in the {domain.name} domain")
        elif scheme == "all-to-one":
            anchor = rng.choice(retain_d)
            out.update({f: [anchor] for f in forget_d})
        elif scheme == "five-to-one":
            shuffled = rng.sample(forget_d, len(forget_d))
            for g in range(0, len(shuffled), 5):
                anchor = rng.choice(retain_d)
                out.update({f: [anchor] for f in shuffled[g : g + 5]})
        elif scheme == "one-to-all":
            out.update({f: list(retain_d) for f in forget_d})
        elif scheme == "one-to-five":
            out.update({f: rng.sample(retain_d, min(5, len(retain_d))) for f in forget_d})
    return out


def _one_to_one(forget: list[str], retain: list[str], rng: random.Random) -> dict[str, list[str]]:
    if len(forget) <= len(retain):
        chosen = rng.sample(retain, len(forget))
        return {f: [a] for f, a in zip(forget, chosen, strict=True)}
    if len(forget) < 2:
        raise TaskError("one-to-one anchors need a retain concept or a second forget concept in the same domain "
                        "(or give --anchor TEXT)")
    while True:  # rejection sampling of a derangement: expected e tries
        perm = rng.sample(forget, len(forget))
        if all(a != f for a, f in zip(perm, forget, strict=True)):
            return {f: [a] for f, a in zip(forget, perm, strict=True)}


@dataclass
class UnlearningTask:
    """Forget/retain concepts of a concept set, their image sets and the anchor map."""

    forget: list[str]
    retain: list[str]
    concept_set: ConceptSet
    source: ImageSource
    images_per_prompt: int = 3
    seed: int = 0
    anchor_scheme: str = "auto"
    image_size: int = 16
    anchor_map: dict[str, list[str]] = field(default_factory=dict)
    _images: dict[tuple[Item, int], np.ndarray] = field(default_factory=dict, repr=False)
    _moments: dict[tuple[Item, int], tuple] = field(default_factory=dict, repr=False)

    @classmethod
    def create(cls, forget: list[str], retain: list[str] | None = None, images_per_prompt: int = 3,
               seed: int = 0, anchor_scheme: str = "auto", image_size: int = 16,
               concept_set: ConceptSet | None = None, source: ImageSource | None = None) -> UnlearningTask:
        """Default world: the canvas, rendered with `seed`."""
        cset = concept_set or ConceptSet.builtin("canvas")
        cset.validate(list(forget), retain)
        if source is None:
            from diffunlearn.data.images import CanvasSource

            source = CanvasSource(seed)
        retain = list(retain) if retain is not None else [c for c in cset.erasable() if c not in forget]
        task = cls(list(forget), retain, cset, source, images_per_prompt, seed, anchor_scheme, image_size)
        task.anchor_map = build_anchor_map(task.forget, task.retain, anchor_scheme, seed, cset)
        return task

    # ---- items ---------------------------------------------------------------------------
    def forget_items(self) -> list[Item]:
        forget = set(self.forget)
        return [i for i in self.concept_set.items() if forget & set(i.concepts)]

    def retain_items(self) -> list[Item]:
        keep, forget = set(self.retain), set(self.forget)
        return [i for i in self.concept_set.items() if not forget & set(i.concepts)
                and (keep & set(i.concepts) or all(self.concept_set.is_neutral(c) for c in i.concepts))]

    def forget_concept_of(self, item: Item) -> str:
        return next(c for c in item.concepts if c in self.forget)

    def domain_of(self, concept: str) -> str:
        return self.concept_set.domain_of(concept)

    def prompt(self, item: Item) -> str:
        return self.concept_set.render(item)

    def anchor_prompt(self, item: Item, concept: str, anchor: str | None) -> str:
        return self.concept_set.anchor_prompt(item, concept, anchor)

    # ---- images --------------------------------------------------------------------------
    def item_images(self, item: Item) -> np.ndarray:
        """(n, 3, H, W): the item's first `images_per_prompt` training images."""
        return self.images([item] * self.images_per_prompt, list(range(self.images_per_prompt)))

    def images(self, items: list[Item], indices: list[int]) -> np.ndarray:
        """Images of items at sample indices, from the source, memoised (training images are
        drawn at every step)."""
        missing = [(i, k) for i, k in zip(items, indices, strict=True) if (i, k) not in self._images]
        if missing:
            fresh = self.source.images([i for i, _ in missing], [k for _, k in missing], self.image_size)
            self._images.update({key: image for key, image in zip(missing, fresh, strict=True)})
        return np.stack([self._images[(i, k)] for i, k in zip(items, indices, strict=True)])

    def model_space(self, backend, items: list[Item], indices: list[int], gen):
        """The images in the space the UNet denoises: pixels, or VAE latents sampled with `gen`
        from moments encoded once per image and kept for the run (the unlearning sets are drawn
        from again at every step; encoding them each time would dominate a step)."""
        import torch

        keys = list(zip(items, indices, strict=True))
        missing = list(dict.fromkeys(key for key in keys if key not in self._moments))
        if missing:
            pixels = torch.from_numpy(self.images([i for i, _ in missing], [k for _, k in missing]))
            mean, std = backend.encode_moments(pixels.to(backend.device))
            for n, key in enumerate(missing):
                self._moments[key] = (mean[n], None if std is None else std[n])
        means = torch.stack([self._moments[key][0] for key in keys])
        stds = [self._moments[key][1] for key in keys]
        if stds[0] is None:
            return means
        noise = torch.randn(means.shape, generator=gen).to(means.device)
        return means + torch.stack(stds) * noise

    def prefetch(self) -> None:
        """Load (or generate, with the original model) every training image the task can draw:
        D_f, D_r and the anchor images, before training changes the model."""
        items, indices = [], []
        for item in self.forget_items():
            concept = self.forget_concept_of(item)
            shown = [item, *[item.swapped(concept, a) for a in self.anchor_map.get(concept, [])]]
            if not self.anchor_map.get(concept, [concept]):
                shown.append(item.without(concept))
            for s in shown:
                items += [s] * self.images_per_prompt
                indices += list(range(self.images_per_prompt))
        for item in self.retain_items():
            items += [item] * self.images_per_prompt
            indices += list(range(self.images_per_prompt))
        if items:
            self.images(items, indices)

    def masks(self, items: list[Item], indices: list[int], concept: str) -> np.ndarray | None:
        return self.source.masks(items, indices, self.image_size, concept)

    def to_dict(self) -> dict:
        return {"forget": self.forget, "retain": self.retain, "concept_set": self.concept_set.describe(),
                "images_per_prompt": self.images_per_prompt, "seed": self.seed, "anchor_scheme": self.anchor_scheme,
                "anchor_map": self.anchor_map, "forget_items": len(self.forget_items()),
                "retain_items": len(self.retain_items())}
