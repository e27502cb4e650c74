"""The command line: listings, and one clear line + exit 2 + nothing written for bad input."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from diffunlearn.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_ls_lists_methods_concepts_and_metrics():
    methods = invoke("ls", "methods")
    assert methods.exit_code == 0
    for name in ("finetune", "neggrad", "esd", "esd-x", "esd-u", "esd-all", "esd-x-strict", "core", "dimum"):
        assert name in methods.stdout
    concepts = invoke("ls", "concepts").stdout
    assert "style:" in concepts and "dotted" in concepts and "circle" in concepts and "plain" in concepts
    assert "UA" in invoke("ls", "metrics").stdout
    assert invoke("ls", "nothing").exit_code == 2


def _assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_unknown_method(empty_cwd, tiny_model_dir):
    result = invoke("erase", "cor", "--forget", "dotted", "--model", tiny_model_dir)
    _assert_one_line_error(result, "unknown method 'cor'", "did you mean 'core'", "valid methods:")
    assert not any(empty_cwd.iterdir())


def test_unknown_concept(empty_cwd, tiny_model_dir):
    result = invoke("erase", "core", "--forget", "doted", "--model", tiny_model_dir)
    _assert_one_line_error(result, "unknown concept 'doted'", "did you mean 'dotted'", "valid concepts (canvas):")
    assert not any(empty_cwd.iterdir())


def test_concept_in_forget_and_retain(empty_cwd, tiny_model_dir):
    result = invoke("erase", "core", "--forget", "dotted", "--retain", "dotted,grid", "--model", tiny_model_dir)
    _assert_one_line_error(result, "both forget and retain", "dotted")
    assert not any(empty_cwd.iterdir())


def test_malformed_yaml(empty_cwd, tiny_model_dir):
    bad = empty_cwd / "bad.yaml"
    bad.write_text("method:\n  lr: [1e-5\n")
    result = invoke("erase", "core", "--forget", "dotted", "--config", bad, "--model", tiny_model_dir)
    _assert_one_line_error(result, "malformed YAML", "bad.yaml")
    assert sorted(p.name for p in empty_cwd.iterdir()) == ["bad.yaml"]


def test_unknown_config_key_and_bad_value(empty_cwd, tiny_model_dir):
    _assert_one_line_error(invoke("erase", "core", "--forget", "dotted", "--model", tiny_model_dir,
                                  "method.alpah=2"), "unknown config key 'method.alpah'")
    _assert_one_line_error(invoke("erase", "core", "--forget", "dotted", "--model", tiny_model_dir,
                                  "eval.images_per_prompt=zero"), "eval.images_per_prompt")
    assert not any(empty_cwd.iterdir())


def test_missing_and_corrupt_model_folder(empty_cwd, tiny_model_dir):
    import shutil

    _assert_one_line_error(invoke("erase", "core", "--forget", "dotted", "--model", empty_cwd / "nowhere"),
                           "model folder not found")
    corrupt = empty_cwd / "corrupt"
    shutil.copytree(tiny_model_dir, corrupt)
    weights = corrupt / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    before = sorted(p.relative_to(empty_cwd) for p in empty_cwd.rglob("*"))
    _assert_one_line_error(invoke("erase", "core", "--forget", "dotted", "--model", corrupt), "corrupt safetensors")
    assert sorted(p.relative_to(empty_cwd) for p in empty_cwd.rglob("*")) == before


def test_output_directory_holding_another_run(empty_cwd, tiny_model_dir):
    out = empty_cwd / "out"
    out.mkdir()
    (out / "run.json").write_text('{"run_id": "someotherrun", "kind": "erase", "status": "complete"}')
    (out / "keep.txt").write_text("precious")
    result = invoke("erase", "core", "--forget", "dotted", "--model", tiny_model_dir, "--out", out)
    _assert_one_line_error(result, "already holds a different run")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "run.json"]
    other = empty_cwd / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    _assert_one_line_error(invoke("erase", "core", "--forget", "dotted", "--model", tiny_model_dir, "--out", other),
                           "not empty")


def test_validate_command(empty_cwd, tiny_model_dir):
    good = empty_cwd / "good.yaml"
    good.write_text(f"method: {{name: core, lr: 1.0e-4}}\ntask: {{forget: [dotted]}}\nmodel: {tiny_model_dir}\n")
    result = invoke("validate", good)
    assert result.exit_code == 0 and "ok: core" in result.stdout
    bad = empty_cwd / "bad.yaml"
    bad.write_text("method: {name: core}\ntask: {forget: [dotted]}\nbogus: 1\n")
    _assert_one_line_error(invoke("validate", bad), "unknown config key 'bogus'")


def test_bad_input_fails_fast_without_importing_torch(tiny_model_dir, tmp_path):
    _assert_exit_2_without_importing_torch([["erase", "nope", "--forget", "dotted"],
                                            ["erase", "core", "--forget", "doted", "--model", str(tiny_model_dir)],
                                            ["validate", str(tmp_path / "missing.yaml")]])


def _assert_exit_2_without_importing_torch(commands: list[list[str]]) -> None:
    """Each command exits 2 in a fresh interpreter that never imports torch."""
    script = textwrap.dedent(f"""
        import sys
        from typer.testing import CliRunner
        from diffunlearn.cli import app
        for args in {commands!r}:
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 2, result.output
        assert "torch" not in sys.modules, "torch was imported before validation finished"
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_attack_bad_input_is_one_line_and_writes_nothing(empty_cwd, tiny_model_dir):
    listing = invoke("ls", "attacks")
    assert listing.exit_code == 0 and "relearn" in listing.stdout and "attack.data" in listing.stdout
    _assert_one_line_error(invoke("attack", "relearn", "--model", tiny_model_dir, "--forget", "dotted",
                                  "attack.dat=retain"), "unknown config key 'attack.dat'")
    _assert_one_line_error(invoke("attack", "relearn", "--model", tiny_model_dir, "--forget", "dotted",
                                  "attack.data=test"), "bad value for 'attack.data'")
    _assert_one_line_error(invoke("attack", "resurgence", "--model", tiny_model_dir, "--forget", "dottd"),
                           "unknown concept 'dottd'", "did you mean 'dotted'")
    _assert_one_line_error(invoke("attack", "relearn", "--model", tiny_model_dir), "--forget")
    _assert_one_line_error(invoke("attack", "relearn", "--model", empty_cwd / "nowhere", "--forget", "dotted"),
                           "model folder not found")
    assert not any(empty_cwd.iterdir())
    assert invoke("attack", "relern", "--forget", "dotted").exit_code == 2


def test_attack_validation_does_not_import_torch(tiny_model_dir):
    model = str(tiny_model_dir)
    _assert_exit_2_without_importing_torch([
        ["attack", "relearn", "--model", model, "--forget", "dotted", "attack.lr=-1"],
        ["attack", "resurgence", "--model", model]])


def test_bad_evaluator_specs_exit_2_with_one_line(empty_cwd, tiny_model_dir):
    for spec, fragment in (("eval.evaluator=clipp:x", "did you mean 'clip'"),
                           ("eval.evaluator=clip", "needs a transformers CLIP folder"),
                           ("eval.evaluator=clip:/no/such/folder", "folder not found"),
                           ("eval.evaluators=/x", "eval.evaluator=canvas:DIR"),
                           ("eval.fid_features=inception:/no/such.pth", "Inception weights not found")):
        result = invoke("erase", "core", "--forget", "dotted", "--model", tiny_model_dir, spec)
        _assert_one_line_error(result, fragment)
    assert not any(empty_cwd.iterdir())
    listing = invoke("ls", "evaluators")
    assert listing.exit_code == 0 and all(n in listing.stdout for n in ("canvas", "clip", "nudenet", "classifier"))


def test_bad_evaluator_fails_without_importing_torch(tiny_model_dir):
    _assert_exit_2_without_importing_torch([
        ["erase", "core", "--forget", "dotted", "--model", str(tiny_model_dir), "eval.evaluator=nope"],
        ["erase", "core", "--forget", "dotted", "--model", str(tiny_model_dir), "eval.evaluator=clip:/nowhere"]])
