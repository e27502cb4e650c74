"""`classifier:PATH`: an image classifier from local disk, judging one domain of the concept set.

PATH is a transformers image-classification folder (config.json with `id2label`, loaded with
`AutoModelForImageClassification`), or a timm ViT state dict (.pth/.pt through
`torch.load(weights_only=True)`, or .safetensors) converted to transformers' ViT (`timm_vit.py`;
timm itself needs torchvision, which is never installed here). Beside it, `label_map.json`:

    {"domain": "style", "labels": ["Abstractionism", ...], "num_heads": 16, "image_size": 224,
     "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}

`labels` (class names in output order, a list or {"0": name}) is required for a checkpoint and
overrides `id2label` for a folder; `domain` is the concept-set domain the classifier judges
(default: the domain whose concept names most labels match); the rest is optional
preprocessing. Labels match concept names loosely (case, '_' and '-' do not matter).

Top-1 is taken over all of the classifier's outputs, as UnlearnCanvas' accuracy.py and ESD's
`evalscripts/imageclassify.py` do: labels that are no concept of the set still compete for the
prediction (an image classified as one of them is correct for no concept) but are never a
target; they are recorded in `notes`, as are the set's concepts the classifier lacks (those
cannot be judged, and metrics leave them out).

Preprocessing follows the folder's preprocessor_config.json (resize to `size` {height, width}
or its `shortest_edge` then `crop_size`, Pillow resampling `resample`, rescale, normalise);
for a checkpoint it is UnlearnCanvas' transform: Resize((224, 224)) bilinear, Normalize(0.5, 0.5).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffunlearn.data.concepts import ConceptSet
from diffunlearn.metrics.evaluators.base import Evaluator, EvaluatorError, normalise_name, to_uint8_hwc
from diffunlearn.metrics.evaluators.spec import classifier_files


@dataclass
class Preprocess:
    """Resize (to (height, width), or shortest edge then center crop), rescale, normalise."""

    size: tuple[int, int] | None = (224, 224)
    shortest_edge: int | None = None
    crop: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    resample: int = 2  # PIL.Image.BILINEAR, torchvision's Resize default

    @classmethod
    def from_config(cls, cfg: dict, default: Preprocess) -> Preprocess:
        size, crop, shortest = default.size, default.crop, default.shortest_edge
        raw = cfg.get("size")
        if isinstance(raw, int):
            size, shortest = (raw, raw), None
        elif isinstance(raw, dict) and "height" in raw:
            size, shortest = (int(raw["height"]), int(raw["width"])), None
        elif isinstance(raw, dict) and "shortest_edge" in raw:
            size, shortest = None, int(raw["shortest_edge"])
        if cfg.get("do_center_crop") and cfg.get("crop_size"):
            c = cfg["crop_size"]
            crop = (c, c) if isinstance(c, int) else (int(c["height"]), int(c["width"]))
        return cls(size, shortest, crop, tuple(cfg.get("image_mean", cfg.get("mean", default.mean))),
                   tuple(cfg.get("image_std", cfg.get("std", default.std))), int(cfg.get("resample", default.resample)))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        from PIL import Image

        out = []
        for array in to_uint8_hwc(images):
            image = Image.fromarray(array)
            if self.shortest_edge is not None:
                scale = self.shortest_edge / min(image.size)
                image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                     self.resample)
            elif self.size is not None:
                image = image.resize((self.size[1], self.size[0]), self.resample)
            if self.crop is not None:
                h, w = self.crop
                left, top = (image.width - w) // 2, (image.height - h) // 2
                image = image.crop((left, top, left + w, top + h))
            x = np.asarray(image, dtype=np.float32) / 255.0
            out.append((x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32))
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def read_label_map(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise EvaluatorError(f"cannot read label map {path}: {err}") from None
    if not isinstance(data, dict):
        raise EvaluatorError(f"label map {path} must be a JSON object with 'labels' (and 'domain')")
    return data


def _labels(raw, where: str) -> list[str]:
    if isinstance(raw, list):
        return [str(x) for x in raw]
    if isinstance(raw, dict):
        try:
            return [str(raw[k]) for k in sorted(raw, key=int)]
        except ValueError:
            raise EvaluatorError(f"{where}: label indices must be integers") from None
    raise EvaluatorError(f"{where}: 'labels' must be a list or an index -> name mapping")


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a pickle read with weights_only=True
    (`model_state_dict` / `state_dict` entries and DataParallel's `module.` prefix unwrapped)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (any unpickling failure is the user's file)
        raise EvaluatorError(f"cannot read checkpoint {path} with weights_only=True: "
                             f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    for key in ("model_state_dict", "state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise EvaluatorError(f"checkpoint {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in data.items()}


class FolderClassifier(Evaluator):
    name = "classifier"

    def __init__(self, concept_set: ConceptSet, path: Path | None = None, batch_size: int = 32):
        super().__init__(concept_set, path)
        kind, location, label_map_path = classifier_files(Path(path) if path else None)
        label_map = read_label_map(label_map_path)
        self.batch_size = batch_size
        if kind == "transformers":
            from transformers import AutoModelForImageClassification

            try:
                self.model = AutoModelForImageClassification.from_pretrained(str(location), local_files_only=True)
            except (OSError, ValueError, KeyError) as err:
                raise EvaluatorError(f"cannot load an image classifier from {location}: "
                                     f"{str(err).splitlines()[0]}") from None
            id2label = self.model.config.id2label
            labels = _labels(label_map["labels"], str(label_map_path)) if "labels" in label_map else [
                str(id2label[i]) for i in range(len(id2label))]
            processor = location / "preprocessor_config.json"
            pre_cfg = json.loads(processor.read_text()) if processor.is_file() else {}
            self.preprocess = Preprocess.from_config({**pre_cfg, **label_map}, Preprocess())
        else:
            from diffunlearn.metrics.evaluators.timm_vit import is_timm_vit, load_timm_vit

            state = load_checkpoint(location)
            if not is_timm_vit(state):
                raise EvaluatorError(f"{location}: only timm ViT checkpoints are supported (or a transformers folder)")
            self.model = load_timm_vit(state, label_map.get("num_heads"))
            if "labels" not in label_map:
                raise EvaluatorError(f"{label_map_path}: needs 'labels' (class names in output order)")
            labels = _labels(label_map["labels"], str(label_map_path))
            side = int(label_map.get("image_size", self.model.config.image_size))
            self.preprocess = Preprocess.from_config(label_map, Preprocess(size=(side, side)))
        self.model = self.model.eval().requires_grad_(False)
        outputs = int(self.model.config.num_labels)
        if len(labels) != outputs:
            raise EvaluatorError(f"{label_map_path or location}: {len(labels)} labels for {outputs} classifier outputs")
        self.domain = self._domain(label_map.get("domain"), labels)
        self._classes = self._match(labels)

    def _domain(self, given: str | None, labels: list[str]) -> str:
        cset = self.concept_set
        if given is not None:
            if given not in cset.domains:
                raise EvaluatorError(f"label map domain '{given}' is not a domain of concept set {cset.name} "
                                     f"({', '.join(cset.domains)})")
            return given
        wanted = {normalise_name(label) for label in labels}
        scores = {d: sum(normalise_name(c.name) in wanted or normalise_name(c.text) in wanted for c in entry.all)
                  for d, entry in cset.domains.items()}
        best = max(scores, key=scores.get)
        if scores[best] == 0:
            raise EvaluatorError(f"no label of the classifier names a concept of set {cset.name}; "
                                 "give label_map.json with 'domain' and 'labels'")
        return best

    def _match(self, labels: list[str]) -> list[str]:
        """Class names in output order: the concept a label names, else the label itself."""
        concepts = self.concept_set.domains[self.domain].all
        by_name: dict[str, str] = {}
        for c in concepts:
            by_name.setdefault(normalise_name(c.name), c.name)
            by_name.setdefault(normalise_name(c.text), c.name)
        classes, used = [], set()
        for label in labels:
            name = by_name.get(normalise_name(label))
            name = name if name is not None and name not in used else label
            used.add(name)
            classes.append(name)
        others = [label for label, name in zip(labels, classes, strict=True) if name not in by_name.values()]
        if others:
            self.notes.append(f"classifier labels that are no concept of the set (they compete in top-1, never a "
                              f"target): {', '.join(others[:10])}{', ...' if len(others) > 10 else ''}")
        lacking = [c.name for c in concepts if c.name not in classes]
        if lacking:
            self.notes.append(f"concepts of domain '{self.domain}' the classifier cannot judge: {', '.join(lacking)}")
        return classes

    def classes(self, domain: str) -> list[str] | None:
        return list(self._classes) if domain == self.domain else None

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor, domain: str) -> torch.Tensor:
        if domain != self.domain:
            raise EvaluatorError(f"the classifier judges domain '{self.domain}', not '{domain}'")
        out = [self.model(pixel_values=self.preprocess(images[i : i + self.batch_size])).logits.float().softmax(-1)
               for i in range(0, len(images), self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0, len(self._classes))
