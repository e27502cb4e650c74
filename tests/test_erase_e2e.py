"""End to end on a tiny model: erase -> evaluate, the run directory, resume, skip."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import TINY_EVAL

import diffunlearn
from diffunlearn.data import canvas
from diffunlearn.methods.core import Core


def test_erase_then_evaluate_writes_a_complete_run(tiny_model_dir, tiny_evaluator_dir, tmp_path):
    out = tmp_path / "run"
    overrides = ["method.epochs=null", "method.steps=4", "method.batch_size=2", "method.checkpoint_every=2",
                 "task.images_per_prompt=1", f"eval.evaluator=canvas:{tiny_evaluator_dir}", *TINY_EVAL]
    run = diffunlearn.erase("core", ["dotted"], model=tiny_model_dir, out=out, overrides=overrides, progress=False)

    for name in ("config.yaml", "run.json", "metrics.json", "curves.csv", "samples.png", "log.txt",
                 "model/diffunlearn.json", "model/unet/diffusion_pytorch_model.safetensors"):
        assert (out / name).exists(), name
    assert not (out / "checkpoint").exists()
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["method"]["profile"] == "testbed" and config["resolved"]["steps"] == 4
    anchor = config["resolved"]["anchor_map"]["dotted"][0]
    assert anchor != "dotted" and canvas.concept_domain(anchor) == "style"
    metrics = json.loads((out / "metrics.json").read_text())
    for phase in ("before", "after"):
        for key in ("UA", "IRA", "CRA", "FID", "AR_MU_top1", "AR_CL"):
            assert key in metrics[phase]
        assert 0 <= metrics[phase]["UA"] <= 100
    assert metrics["after"]["SFID"] is not None
    assert metrics["diagnostics"]["weight_distance"]["l2"] > 0
    assert metrics["cost"]["steps"] == 4
    # CORE: one trainable forward (forget + retain batched) and one frozen forward per step
    assert metrics["cost"]["unet_backward"] == 4 and metrics["cost"]["unet_forward"] == 8
    assert metrics["cost"]["unet_forward_images"] == 4 * 2 * (2 + 2)
    assert metrics["cost"]["peak_rss_mb"] > 0

    # only the trained group was saved, and the run folder loads as a model anywhere
    model_meta = json.loads((out / "model" / "diffunlearn.json").read_text())
    assert all(".attn2." in n for n in model_meta["changed_params"])
    evaluation = diffunlearn.evaluate(out, ["dotted"], overrides=[f"eval.evaluator=canvas:{tiny_evaluator_dir}",
                                                                   *TINY_EVAL], progress=False)
    assert evaluation["UA"] == metrics["after"]["UA"]  # same seeds, same model

    again = diffunlearn.erase("core", ["dotted"], model=tiny_model_dir, out=out, overrides=overrides, progress=False)
    assert again.skipped and again.run_id == run.run_id


def test_interrupted_erase_resumes_to_the_same_weights(tiny_model_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    overrides = ["method.epochs=null", "method.steps=6", "method.batch_size=2", "method.checkpoint_every=2",
                 "task.images_per_prompt=1", "eval.enabled=false"]
    diffunlearn.erase("core", ["grid"], model=tiny_model_dir, out=tmp_path / "a", overrides=overrides, progress=False)

    original_step = Core.step

    def crashing_step(self, step, gen):
        if step == 3:
            raise KeyboardInterrupt
        return original_step(self, step, gen)

    monkeypatch.setattr(Core, "step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        diffunlearn.erase("core", ["grid"], model=tiny_model_dir, out=tmp_path / "b", overrides=overrides,
                          progress=False)
    assert json.loads((tmp_path / "b" / "run.json").read_text())["status"] == "running"
    monkeypatch.setattr(Core, "step", original_step)
    run = diffunlearn.erase("core", ["grid"], model=tiny_model_dir, out=tmp_path / "b", overrides=overrides,
                            progress=False)
    assert run.metrics["cost"]["resumed_from_step"] == 2
    a = load_file(str(tmp_path / "a" / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_run_id_ignores_output_path_and_threads(tiny_model_dir):
    from diffunlearn.runs.resolve import resolve_erase

    first = resolve_erase("core", ["dotted"], model=tiny_model_dir)
    second = resolve_erase("core", ["dotted"], model=tiny_model_dir)
    changed = resolve_erase("core", ["dotted"], model=tiny_model_dir, overrides=["method.lr=0.5"])
    assert first.run_id == second.run_id != changed.run_id


def test_an_eval_setting_added_later_keeps_run_ids_while_unset(tiny_model_dir):
    """eval.forget_images_per_prompt came after runs existed: unset, the run id is the hash of the
    config as it was without the field (finished runs and caches keep their ids); set, it differs."""
    from diffunlearn.config import config_hash
    from diffunlearn.runs.resolve import resolve_attack, resolve_erase

    unset = resolve_erase("core", ["dotted"], model=tiny_model_dir)
    data = unset.as_dict()
    assert data["eval"].pop("forget_images_per_prompt") is None  # recorded in config.yaml all the same
    data["model"] = {"hash": unset.model_hash}
    data["method"].pop("gradient_checkpointing")  # a resource setting, never hashed
    assert unset.run_id == config_hash({"config": data, "versions": unset.versions})
    same_count = resolve_erase("core", ["dotted"], model=tiny_model_dir,
                               overrides=["eval.forget_images_per_prompt=3"])
    assert same_count.run_id != unset.run_id  # explicit is hashed, even where it equals the default
    attack = resolve_attack("relearn", tiny_model_dir, forget=["dotted"])
    larger = resolve_attack("relearn", tiny_model_dir, forget=["dotted"], overrides=["eval.forget_images_per_prompt=9"])
    assert attack.run_id != larger.run_id


def test_erase_without_evaluator_still_erases_saves_and_says_what_it_could_not(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from diffunlearn.cli import app

    out = tmp_path / "run"
    args = ["erase", "core", "--forget", "dotted", "--model", str(tiny_model_dir), "--out", str(out),
            "method.epochs=null", "method.steps=1", "method.batch_size=2", "task.images_per_prompt=1",
            "eval.evaluator=none", *TINY_EVAL]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for name in ("samples.png", "metrics.json", "model/unet/diffusion_pytorch_model.safetensors"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["after"]["UA"] is None and metrics["after"]["evaluator"] is None
    lines = [line for line in result.stdout.splitlines() if line.startswith("not computed: ")]
    assert len(lines) == 1 and "UA" in lines[0] and "IRA" in lines[0] and "FID" in lines[0]
