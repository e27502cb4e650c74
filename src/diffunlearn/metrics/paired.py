"""AdvAnchor's paired figures ([003] §3.1.2, Tables 1-2): each generation of the unlearned model
is compared with the original model's generation from the same prompt and seed.

- erase FID: Fréchet distance between the unlearned and the original model's generations of the
  forget prompts (full and partial): 0 for the original itself, higher = more erased.
- preserve FID: the same on the retain prompts: lower = better preserved.
- erase ACC / preserve ACC: [003]'s classifier accuracy on forget / retain generations, which
  are this toolkit's AR_MU_top1 (share classified as the forget concept) and IRA (in-domain
  retain accuracy); they are reported under [003]'s names beside those.
LPIPS is not computed (it needs downloaded network weights). Features: the run's FID/KID
feature space (`eval.fid_features`: by default the evaluator's own, e.g. the canvas evaluator's
penultimate layers; `inception:FILE` for Inception); without one the FIDs are None. The image
counts are recorded, since an FID from fewer images than feature dimensions is biased (compare
runs of one protocol).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from diffunlearn.metrics.evaluate import Evaluation


def paired_metrics(before: Evaluation, after: Evaluation, feature: nn.Module | None) -> dict[str, Any]:
    """erase/preserve FID (in `feature`'s space; None without one) and ACC of `after` against
    `before` (same plan: same prompts and seeds)."""
    from diffunlearn.metrics.fid import extract_features, frechet_distance

    if [(p.prompt, p.seed) for p in before.plan] != [(p.prompt, p.seed) for p in after.plan]:
        raise ValueError("paired metrics need two evaluations of the same prompts and seeds")
    out: dict[str, Any] = {}
    for name, roles in (("erase", ("forget-full", "forget-partial")), ("preserve", ("retain",))):
        index = [i for i, p in enumerate(before.plan) if p.role in roles]
        out[f"{name}_images"] = len(index)
        if len(index) < 2 or feature is None:
            out[f"{name}_FID"] = None
            continue
        a = extract_features(feature, after.images[index])
        b = extract_features(feature, before.images[index])
        out[f"{name}_FID"] = frechet_distance(a, b)
    out["erase_ACC"] = after.metrics.get("AR_MU_top1")
    out["preserve_ACC"] = after.metrics.get("IRA")
    return out
