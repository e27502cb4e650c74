"""The evaluator protocol: what every evaluator answers, in the terms of the run's concept set.

Images are the toolkit's (N, 3, H, W) float tensors in [-1, 1]. An evaluator may
- classify: `classes(domain)` names the concepts of that domain it tells apart (None: it cannot
  classify that domain), `probabilities(images, domain)` is (N, K) over them (rows sum to 1);
- detect: `presence(images, concept)` is (N,) in [0, 1], the probability or 0/1 indicator that
  the concept is shown (an image shows it at >= 0.5), or None for a concept it does not detect;
- embed: `feature_extractor()` is an nn.Module for torchmetrics' FID/KID (input: float images in
  [0, 1], torchmetrics' normalize=True convention), or None;
- add its own figures: `extra(images, prompts, roles)` (CLIP score, NudeNet exposed-part counts).
`metrics/evaluate.py` turns these answers into UA/IRA/CRA/AR_*; what an evaluator cannot answer
becomes a None metric and a reason in the run's one-line 'not computed' message.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffunlearn.config import ConfigError
from diffunlearn.data.concepts import ConceptSet


class EvaluatorError(ConfigError):
    """An evaluator that cannot be built from what the user gave; the message is one line."""


class Evaluator:
    """Base class: answers nothing; each evaluator overrides what it can answer."""

    name = "evaluator"

    def __init__(self, concept_set: ConceptSet, path: Path | None = None):
        self.concept_set = concept_set
        self.path = path
        self.spec = name_with_path(self.name, path)
        self.notes: list[str] = []  # what a user should know (e.g. labels absent from the set)

    def classes(self, domain: str) -> list[str] | None:
        return None

    def probabilities(self, images: torch.Tensor, domain: str) -> torch.Tensor:
        raise NotImplementedError(f"evaluator {self.name} does not classify domain {domain}")

    def presence(self, images: torch.Tensor, concept: str) -> torch.Tensor | None:
        return None

    def feature_extractor(self) -> nn.Module | None:
        return None

    def extra(self, images: torch.Tensor, prompts: Sequence[str], roles: Sequence[str]) -> dict[str, Any]:
        return {}

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor | None:
        """(N, D) float64 features of [-1, 1] images, or None without a feature space."""
        from diffunlearn.metrics.fid import extract_features

        extractor = self.feature_extractor()
        return None if extractor is None else extract_features(extractor, images)

    def describe(self) -> dict[str, Any]:
        domains = {d: self.classes(d) for d in self.concept_set.domains}
        return {"evaluator": self.spec, "classes": {d: c for d, c in domains.items() if c is not None},
                "notes": list(self.notes)}


def name_with_path(name: str, path: Path | None) -> str:
    return f"{name}:{path}" if path else name


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] (N, 3, H, W) -> (N, H, W, 3) uint8 RGB, as the images would be saved to disk."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def normalise_name(text: str) -> str:
    """Loose match of class labels to concept names: case, '_' and '-' do not matter."""
    return " ".join(text.replace("_", " ").replace("-", " ").lower().split())


class ImageCache:
    """Per-image results keyed by the image's bytes, so that several questions about the same
    images (probabilities per domain, presence, extra figures) run the model once per image."""

    def __init__(self, limit: int = 100_000):
        self.limit = limit
        self._store: dict[bytes, Any] = {}

    def get_many(self, images: torch.Tensor, compute) -> list[Any]:
        import hashlib

        keys = [hashlib.sha1(img.detach().float().cpu().contiguous().numpy().tobytes()).digest() for img in images]
        missing = [k for k, key in enumerate(keys) if key not in self._store]
        if missing:
            if len(self._store) + len(missing) > self.limit:
                self._store.clear()
            for k, value in zip(missing, compute(images[missing]), strict=True):
                self._store[keys[k]] = value
        return [self._store[key] for key in keys]
