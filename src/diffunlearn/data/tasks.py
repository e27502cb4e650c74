"""The one definition of D_f, D_r and the anchor map, used by every method and attack.

D_f = the first n images (default 3, as CORE) of every style-object pair containing a forget
concept; D_r = the first n images of every other pair that shows a retain concept. Images
come from a per-(seed, n, size) cache under the user cache directory; the anchor map
(`anchor_scheme`, METHODS.md) is seeded and recorded in every run's config.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffunlearn.data import canvas

ANCHOR_SCHEMES = ("next", "fixed:NAME", "one-to-one", "all-to-one", "five-to-one", "one-to-all", "one-to-five")


class TaskError(ValueError):
    """An unlearning task the user asked for that cannot exist (unknown concept, overlap...)."""


def cache_dir() -> Path:
    root = os.environ.get("DIFFUNLEARN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "diffunlearn")
    return Path(root)


def validate_concepts(forget: list[str], retain: list[str] | None) -> None:
    """Raise TaskError naming the problem and the valid choices; torch-free."""
    valid = canvas.erasable_concepts()
    if not forget:
        raise TaskError(f"no forget concept given; valid concepts: {', '.join(valid)}")
    for name in [*forget, *(retain or [])]:
        if name not in valid:
            import difflib

            close = difflib.get_close_matches(name, valid, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            neutral = " (neutral concepts are never erased)" if name in (canvas.NEUTRAL_STYLE,
                                                                          canvas.NEUTRAL_OBJECT) else ""
            raise TaskError(f"unknown concept '{name}'{hint}{neutral}; valid concepts: {', '.join(valid)}")
    both = sorted(set(forget) & set(retain or []))
    if both:
        raise TaskError(f"concept(s) in both forget and retain: {', '.join(both)}")
    if len(set(forget)) != len(forget):
        raise TaskError("a forget concept is listed twice")


def validate_anchor_scheme(scheme: str) -> None:
    if scheme.startswith("fixed:"):
        name = scheme.split(":", 1)[1]
        if name not in (*canvas.ALL_STYLES, *canvas.ALL_OBJECTS):
            raise TaskError(f"anchor_scheme fixed:{name}: unknown concept; valid: "
                            f"{', '.join([*canvas.ALL_STYLES, *canvas.ALL_OBJECTS])}")
        return
    if scheme not in ANCHOR_SCHEMES:
        raise TaskError(f"unknown anchor_scheme '{scheme}'; valid: {', '.join(ANCHOR_SCHEMES)}")


def domain_concepts(domain: str) -> list[str]:
    return list(canvas.STYLES if domain == "style" else canvas.OBJECTS)


def build_anchor_map(forget: list[str], retain: list[str], scheme: str, seed: int) -> dict[str, list[str]]:
    """Map each forget concept to its anchor candidate(s) in the same domain.

    A single candidate is used as is; several (one-to-all, one-to-five) are resampled at
    every step by the method. `one-to-one` is a seeded bijection onto retain concepts, or a
    derangement among the forget concepts when they outnumber the retain set (CORE).
    """
    validate_anchor_scheme(scheme)
    rng = random.Random(seed)
    out: dict[str, list[str]] = {}
    for domain in canvas.DOMAINS:
        forget_d = [f for f in forget if canvas.concept_domain(f) == domain]
        if not forget_d:
            continue
        retain_d = [r for r in retain if canvas.concept_domain(r) == domain]
        if scheme.startswith("fixed:"):
            out.update({f: [scheme.split(":", 1)[1]] for f in forget_d})
        elif scheme == "next":
            order = domain_concepts(domain)
            for f in forget_d:
                i = order.index(f)
                following = [order[(i + k) % len(order)] for k in range(1, len(order))]
                out[f] = [next((c for c in following if c not in forget), following[0])]
        elif scheme == "one-to-one":
            out.update(_one_to_one(forget_d, retain_d, rng))
        elif not retain_d:
            raise TaskError(f"anchor_scheme {scheme} needs retain concepts in the {domain} domain")
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
        raise TaskError("one-to-one anchors need a retain concept or a second forget concept")
    while True:  # rejection sampling of a derangement: expected e tries
        perm = rng.sample(forget, len(forget))
        if all(a != f for a, f in zip(perm, forget, strict=True)):
            return {f: [a] for f, a in zip(forget, perm, strict=True)}


def swap_concept(style: str, obj: str, old: str, new: str) -> tuple[str, str]:
    return (new if style == old else style, new if obj == old else obj)


@dataclass
class UnlearningTask:
    """Forget/retain concepts, their image sets and anchor map, on the canvas testbed."""

    forget: list[str]
    retain: list[str]
    images_per_pair: int = 3
    seed: int = 0
    anchor_scheme: str = "one-to-one"
    image_size: int = 16
    anchor_map: dict[str, list[str]] = field(default_factory=dict)
    _images: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def create(cls, forget: list[str], retain: list[str] | None = None, images_per_pair: int = 3,
               seed: int = 0, anchor_scheme: str = "one-to-one", image_size: int = 16) -> UnlearningTask:
        validate_concepts(forget, retain)
        retain = list(retain) if retain is not None else [c for c in canvas.erasable_concepts() if c not in forget]
        task = cls(list(forget), retain, images_per_pair, seed, anchor_scheme, image_size)
        task.anchor_map = build_anchor_map(task.forget, task.retain, anchor_scheme, seed)
        return task

    # ---- pairs ---------------------------------------------------------------------------
    @property
    def all_pairs(self) -> list[tuple[str, str]]:
        return [(s, o) for s in canvas.ALL_STYLES for o in canvas.ALL_OBJECTS]

    def forget_pairs(self) -> list[tuple[str, str]]:
        return [(s, o) for s, o in self.all_pairs if s in self.forget or o in self.forget]

    def retain_pairs(self) -> list[tuple[str, str]]:
        keep = set(self.retain)
        neutral = {canvas.NEUTRAL_STYLE, canvas.NEUTRAL_OBJECT}
        return [(s, o) for s, o in self.all_pairs if s not in self.forget and o not in self.forget
                and (s in keep or o in keep or {s, o} <= neutral)]

    def forget_concept_of(self, pair: tuple[str, str]) -> str:
        return pair[0] if pair[0] in self.forget else pair[1]

    # ---- images ------------------------------------------------------------------------
    def images(self) -> np.ndarray:
        """(pairs, n, 3, H, W) for every pair of the canvas, from the user cache."""
        if self._images is None:
            self._images = cached_canvas_images(self.seed, self.images_per_pair, self.image_size)
        return self._images

    def pair_images(self, pair: tuple[str, str]) -> np.ndarray:
        return self.images()[self.all_pairs.index(pair)]

    def items(self, pairs: list[tuple[str, str]]) -> list[tuple[tuple[str, str], int]]:
        return [(p, i) for p in pairs for i in range(self.images_per_pair)]

    def to_dict(self) -> dict:
        return {"forget": self.forget, "retain": self.retain, "images_per_pair": self.images_per_pair,
                "seed": self.seed, "anchor_scheme": self.anchor_scheme, "anchor_map": self.anchor_map,
                "forget_pairs": len(self.forget_pairs()), "retain_pairs": len(self.retain_pairs())}


def cached_canvas_images(seed: int, per_pair: int, size: int) -> np.ndarray:
    """Render (or read back) the first `per_pair` training images of every pair.

    Stored as .npy (read with allow_pickle=False); written to a temporary name and renamed.
    """
    path = cache_dir() / "tasks" / f"canvas-seed{seed}-n{per_pair}-{size}px.npy"
    pairs = [(s, o) for s in canvas.ALL_STYLES for o in canvas.ALL_OBJECTS]
    shape = (len(pairs), per_pair, 3, size, size)
    if path.exists():
        try:
            data = np.load(path, allow_pickle=False)
            if data.shape == shape:
                return data
        except (OSError, ValueError):
            pass  # a corrupt cache entry is regenerated
    flat, _ = canvas.render_batch([p for p in pairs for _ in range(per_pair)],
                                  [i for _ in pairs for i in range(per_pair)], seed=seed, size=size)
    data = flat.reshape(shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, data, allow_pickle=False)
    os.replace(tmp, path)
    return data
