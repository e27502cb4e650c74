"""The shipped testbed: files match their manifest and recipe, and meet TESTBED.md's quality bars."""

from __future__ import annotations

import json

import pytest
import torch

from diffunlearn.backends.model_dir import hash_files
from diffunlearn.config import CONFIG_DIR, PretrainEvaluatorConfig, PretrainModelConfig, load_yaml
from diffunlearn.data import canvas
from diffunlearn.runs.resolve import ASSETS

pytestmark = pytest.mark.skipif(not (ASSETS / "MANIFEST.json").exists(), reason="no shipped assets")


def test_shipped_files_match_their_manifest():
    manifest = json.loads((ASSETS / "MANIFEST.json").read_text())
    assert set(manifest) == {"testbed", "evaluators"}
    for folder, files in manifest.items():
        on_disk = {str(p.relative_to(ASSETS / folder)) for p in (ASSETS / folder).rglob("*") if p.is_file()}
        assert on_disk == set(files), folder
        for name, digest in files.items():
            assert hash_files([ASSETS / folder / name]) == digest, f"{folder}/{name} changed since it was shipped"
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert total < 20 * 2**20, "shipped assets should stay a few MB"


def test_shipped_files_were_produced_by_the_committed_recipes():
    model_recipe = PretrainModelConfig(**load_yaml(CONFIG_DIR / "pretrain-model.yaml"))
    assert PretrainModelConfig(**load_yaml(ASSETS / "testbed" / "pretrain-config.yaml")) == model_recipe
    evaluator_recipe = PretrainEvaluatorConfig(**load_yaml(CONFIG_DIR / "pretrain-evaluators.yaml"))
    recorded = json.loads((ASSETS / "evaluators" / "config.json").read_text())
    assert {k: recorded[k] for k in evaluator_recipe.model_dump()} == evaluator_recipe.model_dump()
    meta = json.loads((ASSETS / "testbed" / "diffunlearn.json").read_text())
    assert meta["trained_steps"] == model_recipe.train.steps


@pytest.fixture(scope="module")
def shipped():
    from diffunlearn.backends.diffusers_t2i import T2IModel
    from diffunlearn.metrics.classifier import Evaluators

    torch.set_num_threads(2)
    return T2IModel.from_pretrained(ASSETS / "testbed"), Evaluators.load()


def test_evaluators_classify_held_out_real_images(shipped):
    from diffunlearn.metrics.classifier import accuracy

    _, evaluators = shipped
    pairs = [(s, o) for s in canvas.ALL_STYLES for o in canvas.ALL_OBJECTS]
    flat = [p for p in pairs for _ in range(5)]
    images, _ = canvas.render_batch(flat, [canvas.HELDOUT_OFFSET + 500 + i % 5 for i in range(len(flat))])
    images = torch.from_numpy(images)
    assert accuracy(evaluators, images, [s for s, _ in flat], "style") >= 0.98
    assert accuracy(evaluators, images, [o for _, o in flat], "object") >= 0.98


@pytest.mark.slow  # samples the shipped model over the whole canvas: minutes on 2 cores
def test_pretrained_generations_meet_the_quality_bar(shipped):
    """>= 90% of generations correct per domain on average, no concept below 70% (TESTBED.md)."""
    from diffunlearn.pretrain import generation_quality

    model, evaluators = shipped
    for domain, (mean, per_concept) in generation_quality(model, evaluators, per_pair=2).items():
        assert mean >= 0.90, (domain, mean, per_concept)
        assert min(per_concept.values()) >= 0.70, (domain, per_concept)
