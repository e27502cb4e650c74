"""`clip:PATH`: CLIP from a local transformers folder (`CLIPModel`, its tokenizer and
`preprocessor_config.json`; nothing is downloaded).

- Zero-shot classification over the concept set's names: the classes of a domain are its
  concepts, the neutral one included, each prompted with the domain's first template (e.g.
  "a painting in the style of {style}"); the probabilities are the softmax of
  `logit_scale * cos(image, text)` over them (CLIP's own zero-shot rule, as MACE's
  `metrics/evaluate_clip_accuracy.py` applies it with OpenAI CLIP's scale of 100).
- CLIP score of every image with its own prompt: `100 * max(cos(image, prompt), 0)`, the
  per-pair definition torchmetrics documents for `CLIPScore` (its implementation clamps the
  mean instead; per-image values are needed here for intervals and per-role means).
- FID/KID features: CLIP's projected image embeddings (FID_CLIP, Kynkaanniemi et al. 2023).

Images are converted to uint8 as if saved to disk and preprocessed by transformers' PIL image
processor (no torchvision: `CLIPImageProcessorPil` in transformers 5, `CLIPImageProcessor` in 4).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffunlearn.data.concepts import ConceptSet
from diffunlearn.metrics.evaluators.base import Evaluator, EvaluatorError, ImageCache, to_uint8_hwc


def image_processor(path: Path):
    """CLIP's PIL image processor with the folder's settings (CLIP's defaults without the file)."""
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers 4: the PIL processor is the default one
        from transformers import CLIPImageProcessor as Processor
    if (path / "preprocessor_config.json").is_file():
        return Processor.from_pretrained(str(path), local_files_only=True)
    return Processor()


def _pooled(output: Any) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4) or an output with pooler_output (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipEvaluator(Evaluator):
    name = "clip"

    def __init__(self, concept_set: ConceptSet, path: Path | None = None, batch_size: int = 32):
        super().__init__(concept_set, path)
        from transformers import AutoTokenizer, CLIPModel

        path = Path(path)
        try:
            self.model = CLIPModel.from_pretrained(str(path), local_files_only=True).eval().requires_grad_(False)
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.processor = image_processor(path)
        except (OSError, ValueError, KeyError) as err:
            raise EvaluatorError(f"cannot load CLIP from {path}: {str(err).splitlines()[0]}") from None
        self.batch_size = batch_size
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        self._images = ImageCache()
        self._texts: dict[str, torch.Tensor] = {}
        for name, entry in concept_set.domains.items():
            if len(entry.all) < 2:
                self.notes.append(f"CLIP zero-shot needs two concepts or more in domain '{name}' (give retain "
                                  "concepts or a neutral one); it is not classified")

    # ---- embeddings ------------------------------------------------------------------------
    @torch.no_grad()
    def _embed_images(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.processor(images=list(to_uint8_hwc(images[start : start + self.batch_size])),
                                    return_tensors="pt")["pixel_values"]
            out.append(_pooled(self.model.get_image_features(pixel_values=pixels)).float())
        return torch.cat(out)

    def image_embeddings(self, images: torch.Tensor, normalise: bool = True) -> torch.Tensor:
        """(N, D) projected CLIP image embeddings of [-1, 1] images, unit length by default."""
        if len(images) == 0:
            return torch.zeros(0, int(self.model.config.projection_dim))
        raw = torch.stack(self._images.get_many(images, self._embed_images))
        return F.normalize(raw, dim=-1) if normalise else raw

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) unit-length projected CLIP text embeddings (cached per text)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._texts))
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            tokens = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                    return_tensors="pt")
            feats = _pooled(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                         attention_mask=tokens["attention_mask"])).float()
            self._texts.update(zip(chunk, F.normalize(feats, dim=-1), strict=True))
        return torch.stack([self._texts[t] for t in texts])

    # ---- the protocol ----------------------------------------------------------------------
    def classes(self, domain: str) -> list[str] | None:
        entry = self.concept_set.domains.get(domain)
        if entry is None or len(entry.all) < 2:  # a softmax over one class would always name it
            return None
        return [c.name for c in entry.all]

    def class_prompts(self, domain: str) -> list[str]:
        entry = self.concept_set.domains[domain]
        template = entry.templates[0]
        return [template.format(**{domain: c.text}) for c in entry.all]

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor, domain: str) -> torch.Tensor:
        cos = self.image_embeddings(images) @ self.text_embeddings(self.class_prompts(domain)).T
        return (self.model.logit_scale.exp().float() * cos).softmax(-1)

    def clip_scores(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """(N,) 100 * max(cos(image_i, prompt_i), 0)."""
        if len(images) == 0:
            return torch.zeros(0)
        cos = (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)
        return 100 * cos.clamp(min=0)

    def extra(self, images: torch.Tensor, prompts: Sequence[str], roles: Sequence[str]) -> dict[str, Any]:
        scores = self.clip_scores(images, prompts).double()
        out: dict[str, Any] = {}
        for key, role in (("CLIP_score", "retain"), ("CLIP_score_forget", "forget-full"),
                          ("CLIP_score_forget_partial", "forget-partial")):
            idx = [i for i, r in enumerate(roles) if r == role]
            out[key] = float(scores[idx].mean()) if idx else None
        return out

    def feature_extractor(self) -> nn.Module:
        return ClipFeatures(self)


class ClipFeatures(nn.Module):
    """CLIP image embeddings as a torchmetrics FID/KID feature extractor ([0, 1] float input)."""

    def __init__(self, evaluator: ClipEvaluator):
        super().__init__()
        self.evaluator = evaluator
        self.num_features = int(evaluator.model.config.projection_dim)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        x = x / 255.0 if x.max() > 1.5 else x
        return self.evaluator.image_embeddings(x * 2 - 1, normalise=False).double()
