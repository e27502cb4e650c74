"""Procedural style x object images: the testbed's "canvas" world (TESTBED.md).

A style is a background texture plus a palette; an object is an anti-aliased shape
filled with its own material colour (or the style's object colour where that would not
stand out from the background). Every sample is a pure function of
(seed, style, object, index), so any image can be regenerated without storing it.
Indices below HELDOUT_OFFSET form the training split, indices from it on the held-out split.

Names are single lowercase words, distinct across the two domains, so the word-level
tokenizer maps each concept to exactly one token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OBJECTS: tuple[str, ...] = (
    "circle", "ring", "square", "bar", "diamond", "triangle", "cross", "arrow", "crescent", "hourglass",
)
STYLES: tuple[str, ...] = (
    "striped", "barred", "diagonal", "checkered", "dotted", "grid",
    "wavy", "zigzag", "gradient", "speckled", "solid",
)
NEUTRAL_STYLE = "plain"
NEUTRAL_OBJECT = "none"
ALL_STYLES: tuple[str, ...] = (*STYLES, NEUTRAL_STYLE)
ALL_OBJECTS: tuple[str, ...] = (*OBJECTS, NEUTRAL_OBJECT)
GENERIC_STYLE = "pattern"
GENERIC_OBJECT = "shape"
DOMAINS = ("style", "object")
HELDOUT_OFFSET = 1_000_000

# Deliberately similar pairs share a palette (striped/barred differ only in orientation,
# wavy/zigzag only in the wave form) so that retaining a neighbour is hard.
_PALETTES: dict[str, tuple[tuple[float, float, float], ...]] = {
    # background a, background b, object colour (RGB in [0, 1])
    "striped": ((0.95, 0.85, 0.2), (0.75, 0.15, 0.1), (0.1, 0.2, 0.7)),
    "barred": ((0.95, 0.85, 0.2), (0.75, 0.15, 0.1), (0.1, 0.2, 0.7)),
    "diagonal": ((0.2, 0.7, 0.3), (0.95, 0.95, 0.9), (0.7, 0.1, 0.6)),
    "checkered": ((0.05, 0.05, 0.05), (0.9, 0.9, 0.9), (0.9, 0.2, 0.2)),
    "dotted": ((0.95, 0.6, 0.75), (0.3, 0.1, 0.4), (0.1, 0.55, 0.55)),
    "grid": ((0.85, 0.95, 1.0), (0.1, 0.3, 0.8), (0.9, 0.5, 0.0)),
    "wavy": ((0.1, 0.6, 0.9), (0.9, 0.95, 1.0), (0.9, 0.1, 0.3)),
    "zigzag": ((0.1, 0.6, 0.9), (0.9, 0.95, 1.0), (0.9, 0.1, 0.3)),
    "gradient": ((0.1, 0.05, 0.4), (1.0, 0.55, 0.1), (0.95, 0.95, 0.95)),
    "speckled": ((0.55, 0.45, 0.3), (0.15, 0.1, 0.05), (0.3, 0.9, 0.3)),
    "solid": ((0.05, 0.1, 0.3), (0.05, 0.1, 0.3), (1.0, 0.9, 0.1)),
    "plain": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), (1.0, 1.0, 1.0)),
}


# An object's own material colour: object identity is shape *and* colour, as for real objects,
# so it is a global cue that a small model learns as quickly as a style. The deliberately
# similar circle/ring pair shares one colour, so only the shape tells them apart. Where the
# colour would not stand out from a style's background, the style's object colour is used.
_OBJECT_COLOURS: dict[str, tuple[float, float, float]] = {
    "circle": (0.0, 0.35, 1.0),
    "ring": (0.0, 0.35, 1.0),
    "square": (1.0, 0.1, 0.1),
    "bar": (0.1, 0.8, 0.1),
    "diamond": (1.0, 0.9, 0.0),
    "triangle": (0.6, 0.0, 0.8),
    "cross": (0.0, 0.85, 0.85),
    "arrow": (1.0, 0.5, 0.0),
    "crescent": (1.0, 1.0, 1.0),
    "hourglass": (0.05, 0.05, 0.05),
}
MIN_CONTRAST = 0.45  # Euclidean RGB distance to both background colours


def object_colour(style: str, obj: str) -> tuple[float, float, float]:
    """The fill colour of `obj` drawn in `style` (before per-sample jitter)."""
    bg_a, bg_b, style_fg = _PALETTES[style]
    own = _OBJECT_COLOURS.get(obj, style_fg)
    distance = min(float(np.linalg.norm(np.subtract(own, bg))) for bg in (bg_a, bg_b))
    return own if distance >= MIN_CONTRAST else style_fg


def concept_domain(name: str) -> str:
    """'style' or 'object' for any concept name (neutral ones included); KeyError otherwise."""
    if name in ALL_STYLES:
        return "style"
    if name in ALL_OBJECTS:
        return "object"
    raise KeyError(name)


def erasable_concepts() -> list[str]:
    """Concepts that may be forgotten (the neutral ones never are)."""
    return [*STYLES, *OBJECTS]


@dataclass(frozen=True)
class Sample:
    image: np.ndarray  # (3, H, W) float32 in [-1, 1]
    mask: np.ndarray  # (H, W) float32 in [0, 1], the object's coverage
    style: str
    object: str


def _rng(seed: int, style: str, obj: str, index: int) -> np.random.Generator:
    key = [seed, ALL_STYLES.index(style), ALL_OBJECTS.index(obj), index]
    return np.random.default_rng(np.random.SeedSequence(key))


def _shape_inside(obj: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean coverage of `obj` in unit coordinates (u right, v down, radius ~1)."""
    rho = np.sqrt(u * u + v * v)
    if obj == "circle":
        return rho <= 1.0
    if obj == "ring":
        return (rho <= 1.0) & (rho >= 0.5)
    if obj == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if obj == "bar":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.38)
    if obj == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if obj == "triangle":
        return (v <= 0.75) & (np.abs(u) <= 0.6 * (v + 1.0))
    if obj == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1.0))
    if obj == "arrow":
        shaft = (np.abs(v) <= 0.25) & (u >= -1.0) & (u <= 0.2)
        head = (u >= 0.05) & (u <= 1.0) & (np.abs(v) <= 0.95 * (1.0 - u))
        return shaft | head
    if obj == "crescent":
        bite = (u - 0.5) ** 2 + (v + 0.25) ** 2 <= 0.8**2
        return (rho <= 1.0) & ~bite
    if obj == "hourglass":
        return (np.abs(v) <= 0.9) & (np.abs(u) <= 0.95 * np.abs(v) + 0.08)
    if obj == NEUTRAL_OBJECT:
        return np.zeros_like(u, dtype=bool)
    raise KeyError(obj)


def _texture(style: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Texture in [0, 1] on pixel coordinates; orientation is part of a style's identity."""
    phase = rng.uniform(0, 4)
    if style == "striped":
        return (np.sin(2 * np.pi * (y + phase) / 4) > 0).astype(np.float32)
    if style == "barred":
        return (np.sin(2 * np.pi * (x + phase) / 4) > 0).astype(np.float32)
    if style == "diagonal":
        return (np.sin(2 * np.pi * (x + y + phase) / 4 / np.sqrt(2)) > 0).astype(np.float32)
    if style == "checkered":
        ox, oy = rng.integers(0, 4, size=2)
        return (((x + ox) // 2 + (y + oy) // 2) % 2).astype(np.float32)
    if style == "dotted":
        ox, oy = rng.uniform(0, 4, size=2)
        dx = (x + ox) % 4 - 1.5
        dy = (y + oy) % 4 - 1.5
        return (dx * dx + dy * dy <= 1.1).astype(np.float32)
    if style == "grid":
        ox, oy = rng.integers(0, 4, size=2)
        return (((x + ox) % 4 == 0) | ((y + oy) % 4 == 0)).astype(np.float32)
    if style == "wavy":
        return (np.sin(2 * np.pi * (y + phase + 1.5 * np.sin(2 * np.pi * x / 8)) / 5) > 0).astype(np.float32)
    if style == "zigzag":
        # the wavy texture's transpose with a sharp (triangle) wave: similar, yet distinct
        tri = np.abs(((y / 3) % 2) - 1.0) * 3.0
        return (np.sin(2 * np.pi * (x + phase + tri) / 5) > 0).astype(np.float32)
    if style == "gradient":
        angle = rng.uniform(-0.3, 0.3) + np.pi / 4
        ramp = (np.cos(angle) * x + np.sin(angle) * y) / (x.shape[-1] * 1.4)
        return np.clip(ramp + rng.uniform(-0.1, 0.1), 0, 1).astype(np.float32)
    if style == "speckled":
        return (rng.random(x.shape) < 0.35).astype(np.float32)
    if style in ("solid", NEUTRAL_STYLE):
        return np.zeros_like(x, dtype=np.float32)
    raise KeyError(style)


def render(style: str, obj: str, index: int, seed: int = 0, size: int = 16) -> Sample:
    """Render one sample; a pure function of its arguments."""
    rng = _rng(seed, style, obj, index)
    scale = size / 16.0
    cx, cy = rng.uniform(6.5, 9.5, size=2) * scale
    radius = rng.uniform(4.2, 5.6) * scale  # 8-11 px across: small shapes stay distinct
    theta = rng.uniform(-0.17, 0.17)  # about +-10 degrees: a square must not become a diamond
    ss = 4  # supersampling for anti-aliased edges
    fine = (np.arange(size * ss) + 0.5) / ss - 0.5
    fy, fx = np.meshgrid(fine, fine, indexing="ij")
    du, dv = (fx - cx) / radius, (fy - cy) / radius
    u = np.cos(theta) * du + np.sin(theta) * dv
    v = -np.sin(theta) * du + np.cos(theta) * dv
    inside = _shape_inside(obj, u, v).astype(np.float32)
    mask = inside.reshape(size, ss, size, ss).mean(axis=(1, 3))

    py, px = np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32), indexing="ij")
    tex = _texture(style, px, py, rng)
    bg_a, bg_b, _ = (np.asarray(c, dtype=np.float32) for c in _PALETTES[style])
    fg = np.asarray(object_colour(style, obj), dtype=np.float32)
    jitter = rng.normal(0, 0.04, size=(3, 3)).astype(np.float32)
    bg_a, bg_b, fg = bg_a + jitter[0], bg_b + jitter[1], fg + jitter[2]
    background = bg_a[:, None, None] * (1 - tex) + bg_b[:, None, None] * tex
    image = background * (1 - mask) + fg[:, None, None] * mask
    image = np.clip(image, 0, 1) * 2 - 1
    return Sample(image=image.astype(np.float32), mask=mask.astype(np.float32), style=style, object=obj)


def render_batch(
    pairs: list[tuple[str, str]], indices: list[int], seed: int = 0, size: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, H, W) and masks (N, H, W) for (style, object) pairs and sample indices."""
    samples = [render(s, o, i, seed, size) for (s, o), i in zip(pairs, indices, strict=True)]
    return np.stack([s.image for s in samples]), np.stack([s.mask for s in samples])


# ---- prompts -------------------------------------------------------------------------

def full_prompt(style: str, obj: str) -> str:
    return f"an image of {obj} in {style} style"


def object_prompt(obj: str) -> str:
    return f"an image of {obj}"


def style_prompt(style: str) -> str:
    return f"an image in {style} style"


def partial_prompt(concept: str) -> str:
    """The prompt naming `concept` alone: its style prompt or its object prompt."""
    return style_prompt(concept) if concept_domain(concept) == "style" else object_prompt(concept)


def training_prompt(style: str, obj: str, rng: np.random.Generator, p_empty: float = 0.1) -> str:
    """A caption for a (style, object) image as seen in pretraining.

    Mostly the full template; partial prompts so each concept works alone; generic words
    (`shape`, `pattern`) in place of one concept so mapping concepts exist; the empty prompt
    with probability `p_empty` for classifier-free guidance.
    """
    r = rng.random()
    if r < p_empty:
        return ""
    r = (r - p_empty) / (1 - p_empty)
    if r < 0.6:
        return full_prompt(style, obj)
    if r < 0.75:
        return object_prompt(obj)
    if r < 0.9:
        return style_prompt(style)
    if r < 0.95:
        return full_prompt(GENERIC_STYLE, obj)
    return full_prompt(style, GENERIC_OBJECT)


def vocabulary() -> list[str]:
    """Every word a prompt of the testbed can contain."""
    words = ["an", "image", "of", "in", "style", "a", "the", "and", "art", "ground", "person", "object"]
    return [*words, GENERIC_STYLE, GENERIC_OBJECT, *ALL_STYLES, *ALL_OBJECTS]
