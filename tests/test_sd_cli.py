"""The command line on a Stable Diffusion folder as a user brings one (tiny, random weights, SD 1.4's
configs): a free-text multi-token concept, the `paper` profiles cut to two steps, and outputs that
diffusers' StableDiffusionPipeline loads untouched."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from diffunlearn.backends.model_dir import CHANGED_UNET_WEIGHTS, UNET_WEIGHTS
from diffunlearn.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")

# two steps of each method, and of the data they need, on the tiny pipeline
FAST = {"esd-x": ["method.generation_steps=4"], "mace": [], "uce": [], "core": [],
        "advanchor": ["method.max_iters=2"]}


def erase(method: str, model, out, *extra: str):
    steps = [] if method == "uce" else ["method.steps=2"]
    args = ["erase", method, "--model", str(model), "--forget", "van gogh", "--retain", "claude monet",
            "--domain", "style", "--out", str(out), "eval.enabled=false", "task.images_per_prompt=1",
            "method.batch_size=1", *steps, *FAST.get(method, []), *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr[-2000:] + str(result.exception)
    return out


def assert_pipeline_loads_our_weights(model_dir, base_dir) -> None:
    """StableDiffusionPipeline loads the run's model/ untouched and generates; its UNet holds the
    changed tensors of unet_changed.safetensors and the base model's weights everywhere else."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a painting by van gogh", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
    assert image.shape == (1, 16, 16, 3)
    changed = load_file(str(model_dir / CHANGED_UNET_WEIGHTS))
    base = load_file(str(base_dir / UNET_WEIGHTS))
    loaded = pipe.unet.state_dict()
    assert changed and set(changed) <= set(loaded)
    assert any(not torch.equal(changed[n], base[n]) for n in changed), "nothing was erased"
    for name, value in loaded.items():
        assert torch.equal(value, changed.get(name, base[name])), name


@pytest.mark.parametrize("method", sorted(FAST))
def test_erase_a_free_text_concept_from_a_stable_diffusion_folder(method, sd_pipeline_dir, tmp_path):
    out = erase(method, sd_pipeline_dir, tmp_path / method)
    config = json.loads(json.dumps(__import__("yaml").safe_load((out / "config.yaml").read_text())))
    assert config["method"]["profile"] == "paper"  # a user's model gets the paper settings
    assert_pipeline_loads_our_weights(out / "model", sd_pipeline_dir)
    meta = json.loads((out / "model" / "diffunlearn.json").read_text())
    assert meta["forget"] == ["van gogh"] and meta["base"]["path"] == str(sd_pipeline_dir.resolve())


def test_both_attacks_run_on_one_erased_stable_diffusion_model(sd_pipeline_dir, tmp_path):
    erased = erase("esd-x", sd_pipeline_dir, tmp_path / "esd-x")
    for attack in ("relearn", "resurgence"):
        out = tmp_path / attack
        args = ["attack", attack, "--model", str(erased), "--out", str(out), "eval.enabled=false", "attack.steps=2",
                "attack.batch_size=1", "attack.generation_steps=2"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.stderr[-2000:] + str(result.exception)
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["summary"]["steps"] == 2
        assert_pipeline_loads_our_weights(out / "model", sd_pipeline_dir)


@pytest.mark.parametrize("method", ["salun", "erasediff"])
def test_erase_from_a_v_prediction_folder(method, sd_v_pipeline_dir, tmp_path):
    """SD 2.x's layout (v-prediction, a DDIM config, linear projections): SalUn's saliency and
    retain terms and EraseDiff's uniform target run in v space, and the output loads."""
    extra = {"salun": ["method.mask_batches=1"], "erasediff": ["method.inner_steps=1"]}[method]
    out = erase(method, sd_v_pipeline_dir, tmp_path / method, *extra)
    assert_pipeline_loads_our_weights(out / "model", sd_v_pipeline_dir)
