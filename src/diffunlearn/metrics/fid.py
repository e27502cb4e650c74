"""Distributional quality of generations: FID, KID, precision/recall on injected features.

FID and KID come from torchmetrics with a custom feature extractor (any `nn.Module`, the
testbed's `EvaluatorFeatures` by default): Inception features need downloaded weights and
299x299 inputs, and FID needs far more samples than feature dimensions, so a small
low-dimensional evaluator layer is the right space for 16x16 images (TESTBED.md).
Precision/recall (Kynkäänniemi et al. 2019, k-NN manifolds) is computed here on the same
features with `torch.cdist`.

Images come in as the toolkit's float tensors in [-1, 1] and are mapped to [0, 1] for
torchmetrics' `normalize=True` convention.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> float [0, 1], the input convention of torchmetrics with normalize=True."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def feature_dim(feature: nn.Module, example: torch.Tensor | None = None) -> int:
    """Output width of a feature extractor (its `num_features`, else measured on an example)."""
    num = getattr(feature, "num_features", None)
    if num is not None:
        return int(num)
    if example is None:
        raise ValueError("feature extractor has no `num_features`; pass an example image")
    with torch.no_grad():
        return int(feature(example[:1]).shape[-1])


@torch.no_grad()
def extract_features(feature: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Features (N, D) in float64 of [-1, 1] images, in batches to bound memory."""
    if len(images) == 0:
        return torch.zeros(0, 0, dtype=torch.float64)
    unit = to_unit(images)
    return torch.cat([feature(unit[i : i + batch_size]).double() for i in range(0, len(unit), batch_size)])


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula).

    Same estimator as torchmetrics (unbiased covariances, eigenvalues of the covariance
    product), for callers that already hold features (paired erase/preserve FID, caches).
    """
    a, b = features_a.double(), features_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    root_trace = torch.linalg.eigvals(cov_a @ cov_b).sqrt().real.sum()
    value = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * root_trace
    return max(float(value), 0.0)


def fid_kid(real: torch.Tensor, fake: torch.Tensor, feature: nn.Module, subset_size: int = 1000,
            subsets: int = 100, seed: int = 0, batch_size: int = 512) -> dict[str, Any]:
    """FID and KID of `fake` against `real` (both (N, 3, H, W) in [-1, 1]) via torchmetrics.

    KID's `subset_size` is capped at half the smaller sample count, so that subsets differ and
    `kid_std` measures a real spread (torchmetrics raises above the counts); its
    random subsets are drawn under a fixed seed without disturbing the global RNG, so the
    figures are reproducible. Returns None for figures that need more samples than given.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    n_real, n_fake = len(real), len(fake)
    out: dict[str, Any] = {"fid": None, "kid_mean": None, "kid_std": None, "n_real": n_real,
                           "n_fake": n_fake, "feature_dim": feature_dim(feature, to_unit(real[:1]))}
    if min(n_real, n_fake) < 2:
        return out
    fid = FrechetInceptionDistance(feature=feature, normalize=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Kernel Inception Distance.*", category=UserWarning)
        kid = KernelInceptionDistance(feature=feature, normalize=True, subsets=subsets,
                                      subset_size=max(2, min(subset_size, n_real // 2, n_fake // 2)))
    for images, is_real in ((real, True), (fake, False)):
        unit = to_unit(images)
        for i in range(0, len(unit), batch_size):
            fid.update(unit[i : i + batch_size], real=is_real)
            kid.update(unit[i : i + batch_size], real=is_real)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    # FID is a squared distance; round-off can push an exact match slightly below zero
    out.update(fid=max(float(fid.compute()), 0.0), kid_mean=float(kid_mean), kid_std=float(kid_std))
    return out


def _kth_neighbour_radii(features: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance of each point to its k-th nearest other point of the same set."""
    return torch.cat([torch.cdist(features[i : i + chunk], features).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(features), chunk)])


def _coverage(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    """Share of queries inside at least one centre's k-NN ball."""
    inside = [(torch.cdist(queries[i : i + chunk], centres) <= radii[None, :]).any(1)
              for i in range(0, len(queries), chunk)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real_features: torch.Tensor, fake_features: torch.Tensor, k: int = 3,
                     chunk: int = 1024) -> tuple[float | None, float | None]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), both in [0, 1].

    Each set's manifold is the union of balls reaching every point's k-th nearest neighbour;
    precision is the share of generations inside the real manifold (fidelity), recall the
    share of real images inside the generated manifold (diversity). FID mixes the two.
    `k` is capped at n - 1; sets of fewer than two points give None.
    """
    real, fake = real_features.double(), fake_features.double()
    if min(len(real), len(fake)) < 2:
        return None, None
    real_radii = _kth_neighbour_radii(real, min(k, len(real) - 1), chunk)
    fake_radii = _kth_neighbour_radii(fake, min(k, len(fake) - 1), chunk)
    return _coverage(fake, real, real_radii, chunk), _coverage(real, fake, fake_radii, chunk)


def distribution_metrics(real: torch.Tensor, fake: torch.Tensor, feature: nn.Module, *, k: int = 3,
                         subset_size: int = 1000, subsets: int = 100, seed: int = 0,
                         batch_size: int = 512) -> dict[str, Any]:
    """FID, KID, precision and recall of `fake` against `real` on one feature extractor.

    Returns {"fid", "kid_mean", "kid_std", "precision", "recall", "n_real", "n_fake",
    "feature_dim"}. No bootstrap interval for FID: the estimator is biased by O(1/N) and
    resampling with replacement (duplicates) moves it further, so percentile intervals need
    not even contain the estimate; KID's spread over subsets (`kid_std`) is the uncertainty.
    """
    out = fid_kid(real, fake, feature, subset_size=subset_size, subsets=subsets, seed=seed,
                  batch_size=batch_size)
    real_f = extract_features(feature, real, batch_size)
    fake_f = extract_features(feature, fake, batch_size)
    out["precision"], out["recall"] = precision_recall(real_f, fake_f, k=k)
    return out


__all__ = [
    "distribution_metrics", "extract_features", "feature_dim", "fid_kid",
    "frechet_distance", "precision_recall", "to_unit",
]
