"""The shipped testbeds: files match their manifest and recipe, and meet TESTBED.md's quality bars."""

from __future__ import annotations

import json

import pytest
import torch

from diffunlearn.backends.model_dir import hash_files
from diffunlearn.config import (
    CONFIG_DIR,
    PretrainEvaluatorConfig,
    PretrainModelConfig,
    PretrainSDModelConfig,
    load_yaml,
)
from diffunlearn.data import canvas
from diffunlearn.runs.resolve import ASSETS

pytestmark = pytest.mark.skipif(not (ASSETS / "MANIFEST.json").exists(), reason="no shipped assets")

# each shipped model: its committed recipe and that recipe's config class
RECIPES = {"testbed": ("pretrain-model.yaml", PretrainModelConfig),
           "testbed-sd": ("pretrain-model-sd.yaml", PretrainSDModelConfig)}


def shipped_models() -> list[str]:
    manifest = json.loads((ASSETS / "MANIFEST.json").read_text()) if (ASSETS / "MANIFEST.json").exists() else {}
    return [name for name in RECIPES if name in manifest]


def test_shipped_files_match_their_manifest():
    manifest = json.loads((ASSETS / "MANIFEST.json").read_text())
    assert {"testbed", "evaluators"} <= set(manifest) <= {*RECIPES, "evaluators"}
    for folder, files in manifest.items():
        on_disk = {str(p.relative_to(ASSETS / folder)) for p in (ASSETS / folder).rglob("*") if p.is_file()}
        assert on_disk == set(files), folder
        for name, digest in files.items():
            assert hash_files([ASSETS / folder / name]) == digest, f"{folder}/{name} changed since it was shipped"
    for folder in manifest:  # issue 10: each shipped model stays small (<= 20 MB)
        assert sum(p.stat().st_size for p in (ASSETS / folder).rglob("*") if p.is_file()) <= 20 * 2**20, folder


@pytest.mark.parametrize("name", shipped_models())
def test_shipped_models_were_produced_by_the_committed_recipes(name):
    recipe_file, config_class = RECIPES[name]
    recipe = config_class(**load_yaml(CONFIG_DIR / recipe_file))
    assert config_class(**load_yaml(ASSETS / name / "pretrain-config.yaml")) == recipe
    meta = json.loads((ASSETS / name / "diffunlearn.json").read_text())
    assert meta["trained_steps"] == recipe.train.steps
    assert meta.get("kind", "testbed") == name


def test_shipped_evaluators_were_produced_by_the_committed_recipe():
    evaluator_recipe = PretrainEvaluatorConfig(**load_yaml(CONFIG_DIR / "pretrain-evaluators.yaml"))
    recorded = json.loads((ASSETS / "evaluators" / "config.json").read_text())
    assert {k: recorded[k] for k in evaluator_recipe.model_dump()} == evaluator_recipe.model_dump()


@pytest.mark.skipif("testbed-sd" not in shipped_models(), reason="testbed-sd is not shipped")
def test_shipped_testbed_sd_loads_with_stable_diffusion_pipeline_untouched():
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    pipe = StableDiffusionPipeline.from_pretrained(str(ASSETS / "testbed-sd"), local_files_only=True)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and pipe.tokenizer.model_max_length == 77
    pipe.set_progress_bar_config(disable=True)
    out = pipe("an image of circle in dotted style", num_inference_steps=2, guidance_scale=3.0,
               generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, 16, 16, 3)


@pytest.fixture(scope="module")
def evaluators():
    from diffunlearn.metrics.classifier import Evaluators

    torch.set_num_threads(2)
    return Evaluators.load()


def test_evaluators_classify_held_out_real_images(evaluators):
    from diffunlearn.metrics.classifier import accuracy

    pairs = [(s, o) for s in canvas.ALL_STYLES for o in canvas.ALL_OBJECTS]
    flat = [p for p in pairs for _ in range(5)]
    images, _ = canvas.render_batch(flat, [canvas.HELDOUT_OFFSET + 500 + i % 5 for i in range(len(flat))])
    images = torch.from_numpy(images)
    assert accuracy(evaluators, images, [s for s, _ in flat], "style") >= 0.98
    assert accuracy(evaluators, images, [o for _, o in flat], "object") >= 0.98


@pytest.mark.slow  # samples a shipped model over the whole canvas: minutes on 2 cores
@pytest.mark.parametrize("name", shipped_models())
def test_pretrained_generations_meet_the_quality_bar(name, evaluators):
    """>= 90% of generations correct per domain on average, no concept below 70% (TESTBED.md)."""
    from diffunlearn.backends.diffusers_t2i import T2IModel
    from diffunlearn.pretrain import generation_quality

    model = T2IModel.from_pretrained(ASSETS / name)
    for domain, (mean, per_concept) in generation_quality(model, evaluators, per_pair=2).items():
        assert mean >= 0.90, (domain, mean, per_concept)
        assert min(per_concept.values()) >= 0.70, (domain, per_concept)
