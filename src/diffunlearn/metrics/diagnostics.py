"""Diagnostics: how far training moved the weights from the original ([002] §IV, [000] §4)."""

from __future__ import annotations

from collections.abc import Mapping

import torch


@torch.no_grad()
def weight_distance(original: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """L2 distance ||theta - theta*|| over the trained group and its change relative to ||theta*||."""
    names = [n for n in current if n in original]
    if not names:
        return {"l2": 0.0, "relative": 0.0, "tensors": 0}
    diff = torch.sqrt(sum(((current[n].detach().float() - original[n].float()) ** 2).sum() for n in names))
    norm = torch.sqrt(sum((original[n].float() ** 2).sum() for n in names))
    return {"l2": float(diff), "relative": float(diff / norm.clamp_min(1e-12)), "tensors": len(names)}
