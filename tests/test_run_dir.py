"""The life of a run directory (runs/common.py): the lock held for the whole run, the marker
written first, divergence reported as such, and reruns after a kill -9 at any point finishing
with the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import diffunlearn
from diffunlearn.cli import app
from diffunlearn.runs.common import LOCK_FILE, RunLock, claimed_dir, claimed_run_dir, inspect_run_dir
from diffunlearn.runs.resolve import RunDirError

SRC = str(Path(__file__).parents[1] / "src")
# a short erase on the tiny model: 8 steps, a checkpoint every 2, no evaluation
OVERRIDES = ["method.epochs=null", "method.steps=8", "method.batch_size=2", "method.checkpoint_every=2",
             "task.images_per_prompt=1", "eval.enabled=false"]
UNET = Path("model/unet/diffusion_pytorch_model.safetensors")

# Runs one erase in a fresh process, optionally slowed down (seconds per step) and optionally
# killing itself with SIGKILL at a named point: the process dies as from `kill -9`, with no
# Python cleanup at all.
RUNNER = textwrap.dedent("""
    import json, os, signal, sys, time
    point, delay, argv = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3])

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    def kill_on_call(module, name, call=1):
        real, calls = getattr(module, name), [0]
        def wrapper(*args, **kwargs):
            calls[0] += 1
            if calls[0] == call:
                die()
            return real(*args, **kwargs)
        setattr(module, name, wrapper)

    if delay or point.startswith("step-"):
        from diffunlearn.methods.core import Core
        step = Core.step
        def slow_step(self, k, gen):
            time.sleep(delay)
            if point == f"step-{k}":
                die()
            return step(self, k, gen)
        Core.step = slow_step
    if point != "none":
        import diffunlearn.runs.common as common
        import diffunlearn.runs.erase as erase
        if point == "before-lock":          # the directory exists, nothing in it yet
            kill_on_call(common.RunLock, "acquire")
        elif point == "before-marker":      # created and locked, run.json not yet written
            kill_on_call(common, "write_run_marker")
        elif point == "before-config":      # run.json says running, nothing else written
            kill_on_call(erase, "write_config")
        elif point == "mid-checkpoint":     # the second checkpoint's tensors written, its pointer not
            import diffunlearn.engine.checkpoint as checkpoint
            kill_on_call(checkpoint, "atomic_write_text", call=2)
        elif point == "final-save":         # the model's weights written, its metadata not
            from diffunlearn.backends import diffusers_t2i
            kill_on_call(diffusers_t2i, "atomic_write_text", call=1)  # the metadata is its only text file
        elif point == "before-complete":    # model and curves written, metrics.json not
            kill_on_call(erase, "write_json")
        elif point == "after-complete":     # run.json says complete, the checkpoint not yet removed
            kill_on_call(erase, "remove_checkpoint")

    from diffunlearn.cli import main
    sys.argv = ["diffunlearn", *argv]
    main()
""")


def cli_args(model: Path, out: Path, forget: str = "grid") -> list[str]:
    return ["erase", "core", "--forget", forget, "--model", str(model), "--out", str(out), "--threads", "1",
            *OVERRIDES]


def start(model: Path, out: Path, point: str = "none", delay: float = 0.0, forget: str = "grid"):
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.Popen([sys.executable, "-c", RUNNER, point, str(delay),
                             json.dumps(cli_args(model, out, forget))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def erase_in_process(model: Path, out: Path):
    return diffunlearn.erase("core", ["grid"], model=model, out=out, overrides=OVERRIDES, threads=1, progress=False)


def weights(out: Path) -> bytes:
    return (out / UNET).read_bytes()


def assert_finished_like(out: Path, reference: Path) -> None:
    assert weights(out) == weights(reference)
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    assert not (out / "checkpoint").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["forget"] == ["grid"] and metrics["cost"]["steps"] == 8


@pytest.fixture
def reference(tiny_model_dir, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("reference") / "run"
    erase_in_process(tiny_model_dir, out)
    return out


# ---- the lock --------------------------------------------------------------------------------

def test_two_processes_on_one_out(tiny_model_dir, tmp_path, one_thread):
    """A run holds its directory for its whole life: an identical command and a different one
    started meanwhile both exit 2 in one line naming the holder, and the directory ends up
    wholly the first run's (config, marker, metrics and model agree)."""
    out = tmp_path / "out"
    first = start(tiny_model_dir, out, delay=0.75, forget="dotted")
    deadline = time.time() + 120
    while not ((out / "run.json").exists() and str(first.pid) in _read(out / LOCK_FILE)):
        assert first.poll() is None, first.communicate()
        assert time.time() < deadline, "the first run never claimed its directory"
        time.sleep(0.05)
    same, other = start(tiny_model_dir, out, forget="dotted"), start(tiny_model_dir, out, forget="grid")
    for proc in (same, other):
        _, err = proc.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, err
        assert f"in use by pid {first.pid}" in lines[0] and len(lines[0]) < 300, lines[0]
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    config = yaml_load(out / "config.yaml")
    assert config["task"]["forget"] == ["dotted"]
    assert json.loads((out / "metrics.json").read_text())["forget"] == ["dotted"]
    assert json.loads((out / "model" / "diffunlearn.json").read_text())["forget"] == ["dotted"]
    marker = json.loads((out / "run.json").read_text())
    assert marker["status"] == "complete" and marker["run_id"] == config["run_id"]
    # the lock died with the process: the same command now finds the run complete
    again = CliRunner().invoke(app, cli_args(tiny_model_dir, out, "dotted"))
    assert again.exit_code == 0 and "already complete" in again.stderr


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def yaml_load(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_claim_fails_cleanly_when_another_holds_the_lock(tmp_path):
    """Two processes that both found the directory free race for it: the loser leaves it as it was."""
    out = tmp_path / "out"
    out.mkdir()
    holder = RunLock.acquire(out)  # another open file description: flock conflicts as between processes
    try:
        before = sorted(p.name for p in out.iterdir()), (out / LOCK_FILE).read_bytes()
        with pytest.raises(RunDirError, match=f"in use by pid {os.getpid()}"):
            with claimed_run_dir(out, "abc", "erase"):
                pass
        assert (sorted(p.name for p in out.iterdir()), (out / LOCK_FILE).read_bytes()) == before
        with pytest.raises(RunDirError, match="in use"):
            inspect_run_dir(out, "abc", "erase")
    finally:
        holder.release()
    assert inspect_run_dir(out, "abc", "erase") == "new"  # only .lock in it: a fresh directory


def test_claim_that_cannot_create_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "a" / "b" / "out"
    real_open = os.open

    def refuse(path, *args, **kwargs):
        if str(path).endswith(LOCK_FILE):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(RunDirError, match="cannot create output directory .*Permission denied"):
        with claimed_dir(out):
            pass
    assert list(tmp_path.iterdir()) == []


def test_marker_is_written_first(tiny_model_dir, tmp_path, monkeypatch, one_thread):
    """When run.json appears, it is the only file besides the lock: a run killed at any later
    point leaves a directory a rerun recognises."""
    import diffunlearn.runs.common as common

    seen = []
    real = common.write_run_marker

    def record(out, *args, **kwargs):
        seen.append(sorted(p.name for p in out.iterdir()))
        return real(out, *args, **kwargs)

    monkeypatch.setattr(common, "write_run_marker", record)
    erase_in_process(tiny_model_dir, tmp_path / "out")
    assert seen[0] == [LOCK_FILE]


# ---- divergence ------------------------------------------------------------------------------

def test_divergence_stops_the_run(tiny_model_dir, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    args = ["erase", "core", "--forget", "grid", "--model", str(tiny_model_dir), "--out", "out", "--threads", "1",
            *OVERRIDES, "method.lr=1e30"]
    result = CliRunner().invoke(app, args)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert result.exit_code == 3, result.output
    assert len(lines) == 1 and "diverged at step" in lines[0] and len(lines[0]) < 300, result.stderr
    marker = json.loads((tmp_path / "out" / "run.json").read_text())
    assert marker["status"] == "diverged" and marker["step"] >= 1
    assert not (tmp_path / "out" / "model").exists() and not (tmp_path / "out" / "metrics.json").exists()
    if marker["checkpoint_step"]:  # the last good checkpoint is kept, and is finite
        from diffunlearn.engine.checkpoint import load_checkpoint

        tensors, info = load_checkpoint(tmp_path / "out" / "checkpoint")
        assert info["step"] == marker["checkpoint_step"] < marker["step"]
        assert all(bool(t.isfinite().all()) for t in tensors.values())
    again = CliRunner().invoke(app, args)  # the same settings would diverge again
    assert again.exit_code == 2 and "diverged" in again.stderr


# ---- kill -9 and resume ------------------------------------------------------------------------

@pytest.mark.parametrize("point", ["step-5", pytest.param("before-marker", marks=pytest.mark.slow)])
def test_killed_run_resumes_to_identical_weights(tiny_model_dir, tmp_path, reference, point):
    out = tmp_path / "out"
    proc = start(tiny_model_dir, out, point)
    proc.communicate(timeout=300)
    assert proc.returncode == -9
    if point == "step-5":
        assert json.loads((out / "run.json").read_text())["status"] == "running"
        assert json.loads((out / "checkpoint" / "ckpt.json").read_text())["step"] == 4
    else:
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
    run = erase_in_process(tiny_model_dir, out)
    assert run.metrics["cost"]["resumed_from_step"] == (4 if point == "step-5" else 0)
    assert_finished_like(out, reference)


NAMED_POINTS = ["before-lock", "before-marker", "before-config", "step-0", "step-3", "mid-checkpoint", "step-7",
                "final-save", "before-complete", "after-complete"]


@pytest.mark.slow
def test_kill_at_random_points_then_rerun(tiny_model_dir, tmp_path, reference):
    """20 runs killed with SIGKILL: at each named point from before run.json to the final save,
    then at random moments of a slowed run between claiming its directory and its end; every
    rerun finishes with the reference weights."""
    rng = random.Random(0)
    t0 = time.time()
    timing = tmp_path / "timing"
    full = start(tiny_model_dir, timing, delay=0.3)
    while full.poll() is None and not (timing / "run.json").exists():
        time.sleep(0.01)
    claimed = time.time() - t0
    full.communicate(timeout=300)
    assert full.returncode == 0
    duration = time.time() - t0
    trials = NAMED_POINTS + [None] * (20 - len(NAMED_POINTS))
    phases = []
    for i, point in enumerate(trials):
        out = tmp_path / f"trial{i}"
        if point is not None:
            proc = start(tiny_model_dir, out, point)
            proc.communicate(timeout=300)
            assert proc.returncode == -9, point
        else:
            proc = start(tiny_model_dir, out, delay=0.3)
            while proc.poll() is None and not (out / "run.json").exists():
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 1.1 * (duration - claimed)))  # from claiming to just past the end
            proc.kill()
            proc.communicate(timeout=300)
        phases.append(_phase(out))
        run = erase_in_process(tiny_model_dir, out)
        assert run.out == out
        assert_finished_like(out, reference)
    print("killed in phases:", phases)


def _phase(out: Path) -> str:
    """Where a killed run was: nothing yet, only its lock, running (last checkpoint), complete."""
    if not out.exists():
        return "not created"
    if not (out / "run.json").exists():
        return "created, no run.json"
    status = json.loads((out / "run.json").read_text())["status"]
    pointer = out / "checkpoint" / "ckpt.json"
    step = json.loads(pointer.read_text())["step"] if pointer.exists() else 0
    return f"{status} (checkpoint {step})" + (", model saved" if (out / UNET).exists() else "")
