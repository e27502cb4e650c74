"""Classifier-based unlearning metrics as pure functions of probabilities (METHODS.md "Metrics").

Nothing here samples or classifies: callers pass the evaluator's softmax outputs (N, C) and
the intended labels as class indices, so every figure can be checked by hand and reused for
any classifier (testbed CNNs, UnlearnCanvas' style classifier, CLIP zero-shot).

Conventions: rates (UA, accuracies, AR_*) are percentages on a 0-100 scale; `P(y=c_f)` is a
probability in [0, 1]; entropy is in nats ([004] §5 uses log_e). Each rate has a per-image
form (one value per generated image) so that the same values feed the mean, the per-concept
breakdown and the bootstrap confidence interval.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
import torch

Labels = int | Sequence[int] | torch.Tensor
"""One class index for all images, or one per image."""


# ---- helpers -------------------------------------------------------------------------------

def _probs(probs: torch.Tensor | np.ndarray) -> torch.Tensor:
    p = torch.as_tensor(probs, dtype=torch.float64)
    if p.dim() != 2:
        raise ValueError(f"probabilities must be (N, C), got shape {tuple(p.shape)}")
    return p


def _targets(labels: Labels, n: int) -> torch.Tensor:
    t = torch.as_tensor(labels, dtype=torch.long)
    if t.dim() == 0:
        return t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"expected {n} labels, got {tuple(t.shape)}")
    return t


def _percent(hits: torch.Tensor) -> float:
    """Mean of 0/1 hits as a percentage; NaN for an empty set (no images, no figure)."""
    return float(hits.double().mean() * 100) if hits.numel() else float("nan")


# ---- per-image values ------------------------------------------------------------------------

def top1(probs: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Predicted class per image (ties go to the lower index, as argmax does)."""
    return _probs(probs).argmax(-1)


def correct(probs: torch.Tensor | np.ndarray, targets: Labels) -> torch.Tensor:
    """Per-image 0/1: the top-1 prediction equals the target."""
    p = _probs(probs)
    return (p.argmax(-1) == _targets(targets, len(p))).double()


def in_topk(probs: torch.Tensor | np.ndarray, targets: Labels, k: int = 1) -> torch.Tensor:
    """Per-image 0/1: the target is among the k most probable classes ([002] counts top-3)."""
    p = _probs(probs)
    k = min(k, p.shape[1])
    top = p.topk(k, dim=-1).indices
    return (top == _targets(targets, len(p))[:, None]).any(-1).double()


def in_sets(probs: torch.Tensor | np.ndarray, allowed: Sequence[int | Sequence[int]]) -> torch.Tensor:
    """Per-image 0/1: the top-1 prediction is in that image's allowed set (one index or several)."""
    pred = top1(probs)
    if len(allowed) != len(pred):
        raise ValueError(f"expected {len(pred)} alternative sets, got {len(allowed)}")
    sets = [{a} if isinstance(a, int) else set(a) for a in allowed]
    return torch.tensor([float(int(c) in s) for c, s in zip(pred.tolist(), sets, strict=True)],
                        dtype=torch.float64)


def class_probability(probs: torch.Tensor | np.ndarray, classes: Labels) -> torch.Tensor:
    """Per-image probability the classifier gives to `classes` (e.g. the forget concept)."""
    p = _probs(probs)
    return p.gather(1, _targets(classes, len(p))[:, None]).squeeze(1)


def entropy(probs: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Per-image entropy of the output distribution in nats; 0 log 0 is taken as 0."""
    p = _probs(probs)
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)


# ---- summaries -------------------------------------------------------------------------------

def unlearning_accuracy(probs: torch.Tensor | np.ndarray, forget_classes: Labels) -> float:
    """UA ([001] §4.1): % of forget-prompt images NOT classified as their forget concept."""
    return _percent(1 - correct(probs, forget_classes))


def accuracy(probs: torch.Tensor | np.ndarray, targets: Labels) -> float:
    """Top-1 accuracy in %, the definition of IRA and CRA on retain prompts."""
    return _percent(correct(probs, targets))


def topk_rate(probs: torch.Tensor | np.ndarray, classes: Labels, k: int = 1) -> float:
    """AR_MU / AR_DiMRA ([002] §VI): % of images whose top-k includes the given class."""
    return _percent(in_topk(probs, classes, k))


def alternative_rate(probs: torch.Tensor | np.ndarray, allowed: Sequence[int | Sequence[int]]) -> float:
    """AR_CL ([002] §VI): % of images classified (top-1) as their alternative concept."""
    return _percent(in_sets(probs, allowed))


def mean_class_probability(probs: torch.Tensor | np.ndarray, classes: Labels) -> float:
    """Mean P(y = c_f) ([004] §5), in [0, 1]."""
    values = class_probability(probs, classes)
    return float(values.mean()) if values.numel() else float("nan")


def mean_entropy(probs: torch.Tensor | np.ndarray) -> float:
    """Mean entropy (nats) of the classifier's output; high means the concept is not recognised."""
    values = entropy(probs)
    return float(values.mean()) if values.numel() else float("nan")


def per_group(values: torch.Tensor | np.ndarray | Sequence[float], labels: Sequence[Hashable]
              ) -> dict[Hashable, float]:
    """Mean of per-image values for each label, in order of first appearance.

    Per-concept breakdowns are what show *which* neighbour an erasure damaged; the mean of a
    metric alone hides it.
    """
    v = np.asarray(torch.as_tensor(values, dtype=torch.float64))
    if len(v) != len(labels):
        raise ValueError(f"{len(v)} values but {len(labels)} labels")
    groups: dict[Hashable, list[float]] = {}
    for value, label in zip(v.tolist(), labels, strict=True):
        groups.setdefault(label, []).append(value)
    return {label: float(np.mean(vals)) for label, vals in groups.items()}


def bootstrap_ci(values: torch.Tensor | np.ndarray | Sequence[float], resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean over images resampled with replacement.

    An image is one (prompt, seed) draw, so this is the bootstrap over prompts x seeds that
    METHODS.md asks for beside every mean. Deterministic for a given seed.
    """
    v = np.asarray(torch.as_tensor(values, dtype=torch.float64))
    if v.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(resamples, len(v)))].mean(axis=1)
    alpha = (1 - level) / 2 * 100
    low, high = np.percentile(means, [alpha, 100 - alpha])
    return float(low), float(high)


# ---- CORE's aggregate scores ----------------------------------------------------------------

def sfid(fid_original: float, fid_model: float) -> float:
    """SFID = min(100 * FID_0 / FID_M, 100) ([001] App. B): 100 when quality is not worse.

    A model with FID 0 (identical to the reference) scores the maximum, 100.
    """
    if fid_model <= 0:
        return 100.0
    return float(min(100.0 * max(fid_original, 0.0) / fid_model, 100.0))


def total(ua: float, ira: float, cra: float, sfid_score: float) -> float:
    """Total = UA + IRA + CRA + SFID ([001] App. B), on a 0-400 scale."""
    return float(ua + ira + cra + sfid_score)
