"""The canvas metrics must not change when the evaluation protocol is generalised to concept sets.

`data/canvas_metrics_regression.json` was computed by the protocol as it was before concept
sets and pluggable evaluators (commit 681f811, `metrics/evaluate.py` naming the canvas
directly): this is the one place where our own earlier output is the right oracle, because
the refactor's contract is to change nothing for the canvas set with the canvas evaluator.
Cases: the tiny untrained model with tiny random evaluators (the real sampling path), and a
stand-in model that renders canvas images with seed-dependent confusions, judged by the
shipped trained evaluators (confident, non-degenerate UA/IRA/CRA/AR_CL/FID).

The plan and every discrete figure (accuracies, counts) must be identical; continuous figures
agree to 1e-4 relative. Sampling runs in float32, whose last bits depend on the CPU's kernels:
on 2026-12-03 an AMD EPYC gave images that differ from the recording machine's (Zen 5) in their
last bits (so their hash, once compared here, is not portable), FID and KID by < 1e-7 relative and
the entropy of near-certain predictions by up to 3e-5; a change of protocol moves them by far more.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CanvasStandIn, build_tiny_evaluators, build_tiny_model

from diffunlearn.config import EvalConfig
from diffunlearn.data.concepts import ConceptSet
from diffunlearn.metrics.classifier import Evaluators
from diffunlearn.metrics.evaluate import evaluate_model
from diffunlearn.metrics.evaluators.canvas import CanvasEvaluator

EXPECTED = json.loads((Path(__file__).parent / "data" / "canvas_metrics_regression.json").read_text())
for _key in ("eval", "eval_standin"):
    EXPECTED[_key].pop("evaluators")  # the recorded config's evaluator folder (None: the default) is now eval.evaluator


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _same(actual, expected, where: str = "") -> None:
    if isinstance(expected, dict):
        assert set(actual) == set(expected), where
        for key in expected:
            _same(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list | tuple) and len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            _same(a, e, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=1e-4, abs=1e-9), where
    else:
        assert actual == expected, where


def _evaluate(name: str):
    case = EXPECTED["cases"][name]
    if name.startswith("standin"):
        model, evaluators, cfg = CanvasStandIn(), Evaluators.load(), EvalConfig(**EXPECTED["eval_standin"])
    else:
        model, evaluators, cfg = build_tiny_model(), build_tiny_evaluators(), EvalConfig(**EXPECTED["eval"])
    evaluator = CanvasEvaluator(ConceptSet.builtin("canvas"), cnns=evaluators)
    result = evaluate_model(model, evaluator, case["forget"], cfg, alternatives=case["alternatives"],
                            reference_fid=case["reference_fid"], progress=False, data_seed=0)
    return case, result


@pytest.mark.parametrize("name", list(EXPECTED["cases"]))
def test_canvas_metrics_unchanged(name):
    case, result = _evaluate(name)
    plan = [[p.prompt, p.seed, p.role, p.label("style"), p.label("object"), p.forget, list(p.alternatives), p.index]
            for p in result.plan]
    assert plan == case["plan"]
    metrics = json.loads(json.dumps(result.metrics))
    # new, informational keys only: which evaluator answered, that nothing was left out, and the
    # forget prompts' image count (the recorded protocol had no separate one), and the retain
    # images behind IRA and CRA (every one, judged in each domain the canvas evaluator classifies)
    assert metrics.pop("evaluator") == "canvas" and metrics.pop("not_computed") is None
    counts = metrics["counts"]
    assert counts.pop("forget_images_per_prompt") == counts["images_per_prompt"]
    assert counts.pop("judged") == {k: counts["retain"] if metrics[k] is not None else 0 for k in ("IRA", "CRA")}
    assert metrics.pop("notes") == []
    _same(metrics, case["metrics"])
