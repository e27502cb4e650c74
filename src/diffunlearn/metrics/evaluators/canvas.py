"""`canvas`: the testbeds' style and object CNNs (metrics/classifier.py), the default evaluator
of the canvas concept set. Their classes are the canvas names; their penultimate layers are the
low-dimensional FID/KID feature space of TESTBED.md. `canvas:DIR` loads them from DIR."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from diffunlearn.data.concepts import ConceptSet
from diffunlearn.metrics.classifier import EVALUATOR_DIR, EvaluatorFeatures, Evaluators
from diffunlearn.metrics.evaluators.base import Evaluator


class CanvasEvaluator(Evaluator):
    name = "canvas"

    def __init__(self, concept_set: ConceptSet, path: Path | None = None, cnns: Evaluators | None = None):
        super().__init__(concept_set, path)
        self.cnns = cnns if cnns is not None else Evaluators.load(Path(path) if path else EVALUATOR_DIR)
        names = {"style": self.cnns.style_names, "object": self.cnns.object_names}
        self._classes: dict[str, list[str]] = {}
        for domain in concept_set.domains:
            if domain not in names:
                self.notes.append(f"the canvas evaluator has no classifier for domain '{domain}'")
                continue
            known = [c.name for c in concept_set.domains[domain].all if c.name in names[domain]]
            if not known:
                self.notes.append(f"no concept of domain '{domain}' is a canvas {domain}")
                continue
            self._classes[domain] = list(names[domain])

    def classes(self, domain: str) -> list[str] | None:
        return self._classes.get(domain)

    def probabilities(self, images: torch.Tensor, domain: str) -> torch.Tensor:
        return self.cnns.probabilities(images, domain)

    def feature_extractor(self) -> nn.Module:
        return EvaluatorFeatures(self.cnns)
