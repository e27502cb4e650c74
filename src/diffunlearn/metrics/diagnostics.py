"""Diagnostics: how far training moved the weights from the original ([002] §IV, [000] §4), and
how much of an erased concept's text conditioning a fine-tuning set's captions reach."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from diffunlearn.metrics import DISTANCE_GROUPS


@torch.no_grad()
def weight_distance(original: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """L2 distance ||theta - theta*|| over the trained group and its change relative to ||theta*||."""
    names = [n for n in current if n in original]
    if not names:
        return {"l2": 0.0, "relative": 0.0, "tensors": 0}
    diff = torch.sqrt(sum(((current[n].detach().float() - original[n].float()) ** 2).sum() for n in names))
    norm = torch.sqrt(sum((original[n].float() ** 2).sum() for n in names))
    return {"l2": float(diff), "relative": float(diff / norm.clamp_min(1e-12)), "tensors": len(names)}


REACH_ENERGY = 0.99  # the captions' subspace: the principal directions holding this share of their energy


@torch.no_grad()
def text_reach(caption_states: torch.Tensor, concept_vectors: torch.Tensor, energy: float = REACH_ENERGY) -> float:
    """How much of an erased concept's text conditioning fine-tuning on these captions can move.

    A cross-attention key/value weight W receives gradients sum_i g_i h_i^T from the caption token
    states h_i it sees, so the image of a concept vector e under W changes only through e's
    component in the span of those states. `caption_states` (N x D: every token state of every
    caption) define that span as their principal directions holding `energy` of their squared
    norm; the reach is the share of each concept vector's squared norm inside it (1: the captions'
    conditioning covers the concept's, 0: orthogonal to it), averaged over `concept_vectors` (C x D).
    """
    states = caption_states.float().reshape(-1, caption_states.shape[-1])
    _, singular, directions = torch.linalg.svd(states, full_matrices=False)
    share = (singular**2).cumsum(0) / (singular**2).sum().clamp_min(1e-30)
    kept = directions[: int((share < energy).sum()) + 1]
    vectors = concept_vectors.float().reshape(-1, states.shape[-1])
    inside = (vectors @ kept.T).pow(2).sum(1) / vectors.pow(2).sum(1).clamp_min(1e-30)
    return float(inside.mean())


def weight_groups(name: str, unlearned: bool = False) -> tuple[str, ...]:
    """The diagnostic groups a UNet weight belongs to: xattn and noxattn partition full;
    `unlearned` holds the weights that differ from the original at the start of the run (what
    an unlearning changed), where the way back toward the original is measured."""
    return ("xattn" if ".attn2." in name else "noxattn", "full", *(("unlearned",) if unlearned else ()))


class DistanceTracker:
    """||theta_t - theta*|| and its change relative to ||theta*|| per parameter group over a run,
    and ||theta_t - theta_0|| (how far this run moved the weights).

    Only the `trained` weights are copied; every other weight keeps its start value, so its
    contribution is computed once. An attack on an unlearned model then shows the distance
    travelled back toward the original weights: dist_unlearned(0) - dist_unlearned(t), and its
    direction of travel ([002] §IV's mechanism): toward_g = cos(theta_t - theta_0, theta* - theta_0)
    on group g, +1 straight back to the original, 0 orthogonal (the run went elsewhere), -1 straight
    away; 0 where either vector is zero (no move, or a group the start shares with the original).
    """

    def __init__(self, original: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor],
                 trained: list[str]):
        self.trained = [n for n in trained if n in original]
        keep = set(self.trained)
        with torch.no_grad():
            self.original = {n: original[n].detach().float().clone() for n in self.trained}
            self.start = {n: start[n].detach().float().clone() for n in self.trained}
            self.groups: dict[str, tuple[str, ...]] = {}
            self.norm2 = dict.fromkeys(DISTANCE_GROUPS, 0.0)
            self.fixed2 = dict.fromkeys(DISTANCE_GROUPS, 0.0)
            self.back2 = dict.fromkeys(DISTANCE_GROUPS, 0.0)  # ||theta* - theta_0||^2 per group
            for n, value in original.items():
                value = value.detach().float()
                gap = float((start[n].detach().float() - value).pow(2).sum())
                self.groups[n] = weight_groups(n, unlearned=gap > 0)
                square = float(value.pow(2).sum())
                for g in self.groups[n]:
                    self.norm2[g] += square
                    self.back2[g] += gap
                    self.fixed2[g] += 0.0 if n in keep else gap

    @torch.no_grad()
    def __call__(self, current: Mapping[str, torch.Tensor]) -> dict[str, float]:
        to_original = dict(self.fixed2)
        moved = dict.fromkeys(DISTANCE_GROUPS, 0.0)
        along = dict.fromkeys(DISTANCE_GROUPS, 0.0)  # (theta_t - theta_0) . (theta* - theta_0)
        for n in self.trained:
            value = current[n].detach().float()
            step = value - self.start[n]
            d_orig = float((value - self.original[n]).pow(2).sum())
            d_start = float(step.pow(2).sum())
            dot = float((step * (self.original[n] - self.start[n])).sum())
            for g in self.groups[n]:
                to_original[g] += d_orig
                moved[g] += d_start
                along[g] += dot
        out = {}
        for g in DISTANCE_GROUPS:
            out[f"dist_{g}"] = to_original[g] ** 0.5
            out[f"rel_{g}"] = to_original[g] ** 0.5 / max(self.norm2[g] ** 0.5, 1e-12)
            out[f"moved_{g}"] = moved[g] ** 0.5
            scale = (moved[g] * self.back2[g]) ** 0.5
            out[f"toward_{g}"] = along[g] / scale if scale > 0 else 0.0
        return out
