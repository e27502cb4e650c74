"""The evaluator classifiers (style, object) and their feature extractor for FID/KID.

Small CNNs trained on real canvas images (`diffunlearn pretrain evaluators`). Their
low-dimensional penultimate layer is the feature space of FID and KID (TESTBED.md): FID
needs far more samples than feature dimensions, so the features are kept small.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffunlearn.data import canvas

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EVALUATOR_DIR = ASSETS / "evaluators"


class ConceptClassifier(nn.Module):
    """Conv net over 16x16 (or 32x32) images; `features` is the penultimate layer."""

    def __init__(self, num_classes: int, width: int = 32, feature_dim: int = 32):
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]

        self.body = nn.Sequential(
            *block(3, width), *block(width, width), nn.MaxPool2d(2),
            *block(width, 2 * width), *block(2 * width, 2 * width), nn.MaxPool2d(2),
            *block(2 * width, 2 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(2 * width, feature_dim), nn.SiLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@dataclass
class Evaluators:
    """Style and object classifiers with their class names."""

    style: ConceptClassifier
    object: ConceptClassifier
    style_names: tuple[str, ...] = canvas.ALL_STYLES
    object_names: tuple[str, ...] = canvas.ALL_OBJECTS

    def for_domain(self, domain: str) -> tuple[ConceptClassifier, tuple[str, ...]]:
        return (self.style, self.style_names) if domain == "style" else (self.object, self.object_names)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor, domain: str, batch_size: int = 512) -> torch.Tensor:
        model, _ = self.for_domain(domain)
        model.eval()
        return torch.cat([model(images[i : i + batch_size]).softmax(-1) for i in range(0, len(images), batch_size)])

    def save(self, folder: Path, config: dict) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.style.state_dict(), str(folder / "style.safetensors"))
        save_file(self.object.state_dict(), str(folder / "object.safetensors"))
        (folder / "config.json").write_text(json.dumps(
            {**config, "style_names": list(self.style_names), "object_names": list(self.object_names)}, indent=2))

    @classmethod
    def load(cls, folder: Path = EVALUATOR_DIR) -> Evaluators:
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"no evaluators in {folder}; run `diffunlearn pretrain evaluators`")
        cfg = json.loads((folder / "config.json").read_text())
        models = []
        for domain in ("style", "object"):
            names = cfg[f"{domain}_names"]
            model = ConceptClassifier(len(names), cfg["width"], cfg["feature_dim"])
            model.load_state_dict(load_file(str(folder / f"{domain}.safetensors")))
            models.append(model.eval().requires_grad_(False))
        return cls(models[0], models[1], tuple(cfg["style_names"]), tuple(cfg["object_names"]))


class EvaluatorFeatures(nn.Module):
    """Feature extractor for torchmetrics FID/KID: both evaluators' penultimate layers.

    torchmetrics calls it on uint8 images when `normalize=False`; we pass floats in [0, 1]
    with `normalize=True` and map them back to [-1, 1].
    """

    def __init__(self, evaluators: Evaluators):
        super().__init__()
        self.style, self.object = evaluators.style, evaluators.object
        self.num_features = evaluators.style.feature_dim + evaluators.object.feature_dim

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        x = x / 255.0 if x.max() > 1.5 else x
        x = x * 2 - 1
        return torch.cat([self.style.features(x), self.object.features(x)], dim=1).double()


def accuracy(evaluators: Evaluators, images: torch.Tensor, labels: Sequence[str], domain: str) -> float:
    """Share (0-1) of `images` the domain's evaluator assigns to their labels."""
    from diffunlearn.metrics.accuracy import accuracy as percent_correct

    _, names = evaluators.for_domain(domain)
    target = torch.tensor([names.index(n) for n in labels])
    return percent_correct(evaluators.probabilities(images, domain), target) / 100
