"""AdvAnchor's paired figures ([003] §3.1.2): the unlearned model's generations against the
original's from the same prompts and seeds."""

from __future__ import annotations

import pytest
import torch

from diffunlearn.config import EvalConfig
from diffunlearn.data.concepts import ConceptSet
from diffunlearn.metrics.evaluate import Evaluation, build_prompt_sets
from diffunlearn.metrics.fid import extract_features, frechet_distance
from diffunlearn.metrics.paired import paired_metrics


def _evaluation(images, plan, **metrics):
    return Evaluation(metrics=metrics, images=images, plan=plan)


def _plan(forget, **eval_cfg):
    return build_prompt_sets(ConceptSet.builtin("canvas"), forget, EvalConfig(**eval_cfg))


def test_paired_metrics_compare_the_same_prompts_and_seeds(tiny_evaluators):
    from diffunlearn.metrics.classifier import EvaluatorFeatures

    feature = EvaluatorFeatures(tiny_evaluators)  # the canvas evaluator's feature space
    plan = _plan(["dotted"], images_per_prompt=1, partial_images=4)
    torch.manual_seed(0)
    before = torch.rand(len(plan), 3, 16, 16) * 2 - 1
    forget = torch.tensor([p.role != "retain" for p in plan])
    after = before.clone()
    after[forget] = torch.rand(int(forget.sum()), 3, 16, 16) * 2 - 1  # only the forget generations change
    m = paired_metrics(_evaluation(before, plan, AR_MU_top1=90.0, IRA=99.0),
                       _evaluation(after, plan, AR_MU_top1=10.0, IRA=98.0), feature)
    assert m["preserve_FID"] == pytest.approx(0.0, abs=1e-6)  # retain images identical: distance 0
    assert m["erase_FID"] > 0
    assert m["erase_images"] == int(forget.sum()) and m["preserve_images"] == len(plan) - int(forget.sum())
    assert m["erase_ACC"] == 10.0 and m["preserve_ACC"] == 98.0  # [003]'s ACC = AR_MU_top1 / IRA after
    # the erase FID is the Fréchet distance of the two forget sets' evaluator features
    expected = frechet_distance(extract_features(feature, after[forget]), extract_features(feature, before[forget]))
    assert m["erase_FID"] == pytest.approx(expected)
    # no feature space (eval.fid_features=none, or an evaluator without one): no FID, ACC still given
    m = paired_metrics(_evaluation(before, plan, AR_MU_top1=90.0, IRA=99.0),
                       _evaluation(after, plan, AR_MU_top1=10.0, IRA=98.0), None)
    assert m["erase_FID"] is None and m["preserve_FID"] is None and m["erase_ACC"] == 10.0


def test_paired_metrics_refuse_different_plans():
    plan_a = _plan(["dotted"], images_per_prompt=1, partial_images=1)
    plan_b = _plan(["grid"], images_per_prompt=1, partial_images=1)
    images = torch.zeros(len(plan_a), 3, 16, 16)
    with pytest.raises(ValueError, match="same prompts"):
        paired_metrics(_evaluation(images, plan_a), _evaluation(images[: len(plan_b)], plan_b), None)
