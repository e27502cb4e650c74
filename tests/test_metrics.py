"""Metrics: hand-computed classifier figures, FID/KID/precision-recall, the evaluation plan,
an end-to-end evaluation on the tiny untrained model, and the sample grid."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffunlearn.config import EvalConfig
from diffunlearn.data import canvas
from diffunlearn.data.concepts import ConceptSet
from diffunlearn.metrics import accuracy as acc
from diffunlearn.metrics.classifier import EvaluatorFeatures
from diffunlearn.metrics.evaluate import ROLES, Evaluation, build_prompt_sets, evaluate_model, prompt_seed_offset
from diffunlearn.metrics.fid import distribution_metrics, extract_features, fid_kid, frechet_distance, precision_recall
from diffunlearn.metrics.grid import save_grid

CANVAS = ConceptSet.builtin("canvas")
TINY_EVAL = {"images_per_prompt": 1, "partial_images": 2, "steps": 2, "bootstrap": 20,
             "fid_reference_per_pair": 1, "batch_size": 64}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# Three classes, four images: top-1 = [0, 1, 2, 0]; top-2 = [{0,1}, {1,2}, {2,0}, {0,2}].
PROBS = torch.tensor([
    [0.6, 0.3, 0.1],
    [0.2, 0.5, 0.3],
    [0.3, 0.1, 0.6],
    [0.5, 0.1, 0.4],
])


# ---- accuracy.py -----------------------------------------------------------------------------

def test_unlearning_accuracy_and_accuracy_by_hand():
    assert acc.unlearning_accuracy(PROBS, 0) == pytest.approx(50.0)  # images 1, 2 not class 0
    assert acc.unlearning_accuracy(PROBS, [0, 1, 2, 2]) == pytest.approx(25.0)
    assert acc.accuracy(PROBS, [0, 1, 2, 2]) == pytest.approx(75.0)
    assert acc.accuracy(PROBS, [1, 1, 1, 1]) == pytest.approx(25.0)


def test_topk_and_alternative_rates_by_hand():
    assert acc.topk_rate(PROBS, 0, k=1) == pytest.approx(50.0)
    assert acc.topk_rate(PROBS, 0, k=2) == pytest.approx(75.0)  # all but image 1
    assert acc.topk_rate(PROBS, 1, k=2) == pytest.approx(50.0)  # images 0 and 1
    assert acc.topk_rate(PROBS, 1, k=10) == pytest.approx(100.0)  # k capped at the class count
    # per-image alternatives, a single index or a set
    assert acc.alternative_rate(PROBS, [1, 1, 2, 2]) == pytest.approx(50.0)
    assert acc.alternative_rate(PROBS, [[0, 1], 1, [1], [2, 0]]) == pytest.approx(75.0)


def test_probability_and_entropy_by_hand():
    assert acc.mean_class_probability(PROBS, 0) == pytest.approx((0.6 + 0.2 + 0.3 + 0.5) / 4)
    uniform = torch.full((2, 4), 0.25)
    assert acc.mean_entropy(uniform) == pytest.approx(math.log(4))
    one_hot = torch.tensor([[1.0, 0.0, 0.0]])
    assert acc.mean_entropy(one_hot) == pytest.approx(0.0)
    expected = -(0.6 * math.log(0.6) + 0.3 * math.log(0.3) + 0.1 * math.log(0.1))
    assert float(acc.entropy(PROBS)[0]) == pytest.approx(expected)


def test_per_group_means_in_first_appearance_order():
    groups = acc.per_group([100, 0, 100, 100], ["b", "a", "b", "a"])
    assert list(groups) == ["b", "a"]
    assert groups == {"b": 100.0, "a": 50.0}
    with pytest.raises(ValueError):
        acc.per_group([1, 2], ["a"])


def test_bootstrap_ci_contains_mean_and_is_deterministic():
    values = torch.tensor([0.0, 100.0] * 20 + [100.0] * 10)
    low, high = acc.bootstrap_ci(values, resamples=200, seed=3)
    assert 0 <= low <= float(values.mean()) <= high <= 100
    assert low < high
    assert acc.bootstrap_ci(values, 200, 3) == (low, high)
    assert acc.bootstrap_ci([5.0, 5.0, 5.0], 50, 0) == (5.0, 5.0)
    with pytest.raises(ValueError):
        acc.bootstrap_ci([], 10, 0)


def test_sfid_and_total():
    assert acc.sfid(10.0, 20.0) == pytest.approx(50.0)
    assert acc.sfid(10.0, 5.0) == 100.0  # clipped: quality better than the original
    assert acc.sfid(10.0, 0.0) == 100.0
    assert acc.sfid(0.0, 0.0) == 100.0
    assert acc.total(90.0, 80.0, 70.0, 50.0) == pytest.approx(290.0)


# ---- fid.py ---------------------------------------------------------------------------------

def _random_images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_fid_self_is_zero_and_shift_is_larger(tiny_evaluators):
    feature = EvaluatorFeatures(tiny_evaluators)
    real = _random_images(48, 0)
    same = fid_kid(real, real, feature, subset_size=100, subsets=5)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6)
    assert same["n_real"] == same["n_fake"] == 48
    assert same["feature_dim"] == feature.num_features
    shifted = fid_kid(real, (real * 0.3 + 0.6).clamp(-1, 1), feature, subset_size=100, subsets=5)
    assert shifted["fid"] > 100 * max(same["fid"], 1e-9)
    assert shifted["kid_mean"] > same["kid_mean"]
    # the cached-feature formula agrees with torchmetrics
    a, b = extract_features(feature, real), extract_features(feature, (real * 0.3 + 0.6).clamp(-1, 1))
    assert frechet_distance(a, b) == pytest.approx(shifted["fid"], rel=1e-5)


def test_fid_kid_deterministic_and_too_few_samples(tiny_evaluators):
    feature = EvaluatorFeatures(tiny_evaluators)
    real, fake = _random_images(20, 1), _random_images(12, 2)
    first = fid_kid(real, fake, feature, subset_size=8, subsets=4, seed=5)
    assert first == fid_kid(real, fake, feature, subset_size=8, subsets=4, seed=5)
    assert fid_kid(real, fake[:1], feature)["fid"] is None


def test_precision_recall_knn_manifolds():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(40, 4, generator=g)
    assert precision_recall(real, real) == (1.0, 1.0)
    far = real + 100.0
    assert precision_recall(real, far) == (0.0, 0.0)
    # generations on a quarter of the real manifold: faithful (precision) but not diverse (recall)
    collapsed = real[:1] + 0.01 * torch.randn(40, 4, generator=g)
    precision, recall = precision_recall(real, collapsed)
    assert precision == 1.0 and recall < 0.5
    assert precision_recall(real[:1], real) == (None, None)


def test_distribution_metrics_keys(tiny_evaluators):
    out = distribution_metrics(_random_images(10, 0), _random_images(10, 1), EvaluatorFeatures(tiny_evaluators))
    assert set(out) == {"fid", "kid_mean", "kid_std", "precision", "recall", "n_real", "n_fake", "feature_dim"}


# ---- the evaluation plan ---------------------------------------------------------------------

def test_plan_rules_single_style():
    cfg = EvalConfig(images_per_prompt=2, partial_images=3)
    plan = build_prompt_sets(CANVAS, ["striped"], cfg)
    full = [it for it in plan if it.role == "forget-full"]
    partial = [it for it in plan if it.role == "forget-partial"]
    retain = [it for it in plan if it.role == "retain"]
    assert len(full) == 2 * len(canvas.OBJECTS)
    assert {it.label("object") for it in full} == set(canvas.OBJECTS)  # erasable only: no `none`
    assert all(it.forget == "striped" and it.label("style") == "striped" for it in full)
    assert [it.prompt for it in partial] == [canvas.style_prompt("striped")] * 3
    assert all(it.label("object") is None for it in partial)
    assert len(retain) == 2 * (len(canvas.STYLES) - 1) * len(canvas.OBJECTS)
    assert all(it.label("style") != "striped" and it.forget is None for it in retain)
    assert {it.label("style") for it in retain} <= set(canvas.STYLES)  # no `plain`
    assert {it.role for it in plan} == set(ROLES)


def test_forget_images_per_prompt_sizes_the_forget_prompts_alone():
    """More images on the full forget prompts (AR's denominator) leave the retain grid and the
    partial prompts as they were; the torch-free cost model counts the same plan."""
    from diffunlearn.bench.costs import evaluation_images

    cfg = EvalConfig(images_per_prompt=2, partial_images=3, forget_images_per_prompt=7)
    plan = build_prompt_sets(CANVAS, ["striped"], cfg)
    roles = [it.role for it in plan]
    assert roles.count("forget-full") == 7 * len(canvas.OBJECTS)
    assert roles.count("forget-partial") == 3
    assert roles.count("retain") == 2 * (len(canvas.STYLES) - 1) * len(canvas.OBJECTS)
    assert [it.index for it in plan if it.role == "forget-full"][:7] == list(range(7))
    assert evaluation_images(CANVAS, ["striped"], cfg) == len(plan)
    assert EvalConfig(images_per_prompt=2).forget_images == 2  # default: the same count as every prompt


def test_plan_rules_both_domains_and_alternatives():
    cfg = EvalConfig(images_per_prompt=1, partial_images=2)
    forget = ["striped", "circle", "square"]
    plan = build_prompt_sets(CANVAS, forget, cfg, alternatives={"circle": ["ring"]})
    retain = [it for it in plan if it.role == "retain"]
    assert not any(c in forget for it in retain for c in (it.label("style"), it.label("object")))
    assert len(retain) == (len(canvas.STYLES) - 1) * (len(canvas.OBJECTS) - 2)
    full = [it for it in plan if it.role == "forget-full"]
    # no full prompt holds two forget concepts
    assert all(sum(c in forget for c in (it.label("style"), it.label("object"))) == 1 for it in full)
    assert len([it for it in full if it.forget == "circle"]) == len(canvas.STYLES) - 1
    assert len([it for it in full if it.forget == "striped"]) == len(canvas.OBJECTS) - 2
    partial_prompts = {it.prompt for it in plan if it.role == "forget-partial"}
    assert partial_prompts == {canvas.style_prompt("striped"), canvas.object_prompt("circle"),
                               canvas.object_prompt("square")}
    assert all(it.alternatives == ("ring",) for it in plan if it.forget == "circle")
    assert all(it.alternatives == () for it in plan if it.forget == "striped")


def test_plan_seeds_fixed_per_prompt():
    cfg = EvalConfig(images_per_prompt=3, partial_images=2, seed=7)
    first, second = build_prompt_sets(CANVAS, ["dotted"], cfg), build_prompt_sets(CANVAS, ["dotted"], cfg)
    assert first == second
    # a prompt's seeds do not depend on what else is in the plan
    other = build_prompt_sets(CANVAS, ["circle"], cfg)
    seeds = {(it.prompt, it.index): it.seed for it in other}
    shared = [it for it in first if (it.prompt, it.index) in seeds]
    assert shared and all(seeds[(it.prompt, it.index)] == it.seed for it in shared)
    item = first[0]
    assert item.seed == 7 + prompt_seed_offset(item.prompt) + item.index
    assert len({it.seed for it in first}) == len(first)


@pytest.mark.parametrize("forget, alternatives", [
    ([], None), (["plain"], None), (["nosuch"], None),
    (["circle"], {"striped": ["dotted"]}),  # not a forget concept
    (["circle"], {"circle": ["dotted"]}),  # other domain
])
def test_plan_rejects_bad_input(forget, alternatives):
    with pytest.raises(ValueError):
        build_prompt_sets(CANVAS, forget, EvalConfig(), alternatives)


# ---- end to end ------------------------------------------------------------------------------

PERCENT_KEYS = ("UA", "UA_partial", "IRA", "CRA", "AR_MU_top1", "AR_MU_top3", "AR_CL", "SFID")


def test_evaluate_model_end_to_end(tiny_model, tiny_canvas_evaluator):
    cfg = EvalConfig(**TINY_EVAL)
    result = evaluate_model(tiny_model, tiny_canvas_evaluator, ["striped"], cfg, alternatives={"striped": ["barred"]},
                            reference_fid=0.5, progress=False)
    assert isinstance(result, Evaluation)
    m = result.metrics
    expected = {"UA", "UA_partial", "IRA", "CRA", "AR_MU_top1", "AR_MU_top3", "AR_CL", "p_forget", "entropy"}
    assert expected | {f"{k}_ci" for k in expected} | {
        "FID", "FID_original", "SFID", "Total", "KID", "KID_std", "precision", "recall", "per_concept", "counts",
        "evaluator", "not_computed", "notes",
    } == set(m)
    for key in PERCENT_KEYS:
        assert 0 <= m[key] <= 100, key
    for key in expected:
        low, high = m[f"{key}_ci"]
        assert low <= m[key] + 1e-9 and m[key] <= high + 1e-9, key
    assert m["AR_MU_top1"] == pytest.approx(100 - m["UA"])
    assert m["AR_MU_top1"] <= m["AR_MU_top3"]
    assert 0 <= m["p_forget"] <= 1 and 0 <= m["entropy"] <= math.log(len(canvas.ALL_STYLES)) + 1e-9
    assert m["FID"] >= 0 and 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
    assert m["Total"] == pytest.approx(m["UA"] + m["IRA"] + m["CRA"] + m["SFID"])
    assert set(m["per_concept"]["UA"]) == {"striped"}
    assert set(m["per_concept"]["IRA"]) == set(canvas.STYLES) - {"striped"}
    assert set(m["per_concept"]["CRA"]) == set(canvas.OBJECTS)

    counts = m["counts"]
    n_obj, n_sty = len(canvas.OBJECTS), len(canvas.STYLES)
    assert counts["forget-full"] == n_obj and counts["forget-partial"] == 2
    assert counts["retain"] == (n_sty - 1) * n_obj == counts["reference"]
    # every retain image is judged in the forget's domain (IRA) and the other (CRA): the Wilson floor's trials
    assert counts["judged"] == {"IRA": counts["retain"], "CRA": counts["retain"]}
    assert counts["steps"] == 2 and counts["guidance"] == tiny_model.meta["guidance_scale"]
    assert result.images.shape == (len(result.plan), *tiny_model.image_shape)
    assert result.images.abs().max() <= 1
    json.dumps(m, allow_nan=False)  # JSON-able, no NaN
    rows = result.by_prompt(role="forget-full", limit=1)
    assert len(rows) == n_obj and all(images.shape[0] == 1 for images in rows.values())
    assert set(result.by_prompt()) == {it.prompt for it in result.plan}
    # a plan cached as JSON comes back as dicts and is restored
    cached = Evaluation(m, result.images, json.loads(json.dumps([it.to_dict() for it in result.plan])))
    assert cached.plan == result.plan

    again = evaluate_model(tiny_model, tiny_canvas_evaluator, ["striped"], cfg, alternatives={"striped": ["barred"]},
                           reference_fid=0.5, progress=False)
    assert again.metrics == m
    assert torch.equal(again.images, result.images)


def test_evaluate_without_alternatives_or_reference(tiny_model, tiny_canvas_evaluator):
    cfg = EvalConfig(**{**TINY_EVAL, "bootstrap": 0, "partial_images": 0})
    m = evaluate_model(tiny_model, tiny_canvas_evaluator, ["hourglass"], cfg, progress=False).metrics
    assert m["AR_CL"] is None and m["SFID"] is None and m["Total"] is None
    assert m["UA_partial"] is None and m["UA_ci"] is None
    assert 0 <= m["UA"] <= 100
    assert set(m["per_concept"]["CRA"]) == set(canvas.STYLES)


# ---- grid.py ---------------------------------------------------------------------------------

def test_save_grid_writes_labelled_png(tmp_path):
    from PIL import Image

    rows = [("before", _random_images(3, 0)), ("after: an image of circle", _random_images(2, 1))]
    path = save_grid(tmp_path / "sub" / "grid.png", rows, scale=2)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width > 3 * 32 and image.height >= 2 * 32
        # the label column is to the left of the images, so the left edge holds text pixels
        assert image.crop((0, 0, 20, image.height)).convert("L").getextrema()[0] < 128
    with pytest.raises(ValueError):
        save_grid(tmp_path / "empty.png", [])


def test_plan_items_saved_before_concept_sets_load():
    """Evaluations cached before labels became {domain: concept} stored style/object fields."""
    from diffunlearn.metrics.evaluate import PlanItem

    old = {"prompt": "an image of ring in dotted style", "seed": 5, "role": "forget-full", "style": "dotted",
           "object": "ring", "forget": "dotted", "alternatives": ["grid"], "index": 0}
    item = PlanItem.from_dict(old)
    assert item.label("style") == "dotted" and item.label("object") == "ring" and item.alternatives == ("grid",)
    partial = PlanItem.from_dict({**old, "object": None, "role": "forget-partial"})
    assert partial.labels == (("style", "dotted"),)
    assert PlanItem.from_dict(item.to_dict()) == item


def test_plan_accepts_alternatives_among_forget_concepts():
    """CORE's derangement maps forget concepts onto each other: AR_CL must still be reported."""
    plan = build_prompt_sets(CANVAS, ["circle", "ring"], EvalConfig(images_per_prompt=1, partial_images=1),
                             {"circle": ["ring"], "ring": ["circle"]})
    assert {it.alternatives for it in plan if it.forget == "circle"} == {("ring",)}
