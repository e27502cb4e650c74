"""Benchmark grids that really run (tiny model, tiny evaluators): the `quick` recipe's grid
through the worker in-process, then its results and report (default suite); slow: the local
executor killed with SIGKILL mid-grid and rerun, a local Ray cluster, submitit's local
executor (each starts a Python process per run, a minute or more on 2 busy cores), and `quick`
itself on the testbed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from bench_helpers import TINY_ERASE, InlineExecutor, tiny_recipe
from conftest import TINY_EVAL
from typer.testing import CliRunner

from diffunlearn.bench import load_recipe, run_bench
from diffunlearn.bench.store import Store
from diffunlearn.cli import app

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SRC, env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _check_complete(root: Path, recipe, nodes: int) -> list[dict]:
    name = load_recipe(recipe).name if isinstance(recipe, Path) else recipe.name
    store = Store(root / "results.sqlite")
    rows = store.runs(name)
    assert len(rows) == nodes and len({r["node"] for r in rows}) == nodes  # no duplicate, none missing
    assert {r["status"] for r in rows} == {"complete"}, [(r["node"], r["status"], r["error"]) for r in rows]
    with_metrics = {m["node"] for m in store.metrics(name)}
    assert with_metrics == {r["node"] for r in rows}
    return rows


def test_quick_recipe_grid_results_and_report_on_the_tiny_model(tmp_path, tiny_model_dir, tiny_evaluator_dir):
    """The `quick` path end to end, fast: the shipped recipe (its groups, attacks and claims) on
    the tiny model with two training steps, one seed, every node a real erase / evaluate /
    attack run through the worker; then the results, the claims' verdicts and the report."""
    import diffunlearn
    from diffunlearn.bench import Recipe, expand, run_grid
    from diffunlearn.bench.claims import FAILS, HOLDS, INCONCLUSIVE, evaluate_claims

    data = load_recipe("quick").model_dump()
    data["model"] = str(tiny_model_dir)
    data["seeds"] = [0]
    data["protocols"] = {"fast": [*TINY_EVAL, f"eval.evaluator=canvas:{tiny_evaluator_dir}"]}
    for group in data["groups"]:
        group["overrides"] += TINY_ERASE
        for step in group["attacks"]:
            step["overrides"] += ["attack.steps=2", "attack.eval_every=2", "attack.batch_size=2",
                                  "attack.checkpoint_every=1"]
    recipe = Recipe.model_validate(data)
    root = tmp_path / "root"
    nodes = expand(recipe, root)
    assert sorted(n.kind for n in nodes) == ["attack"] * 2 + ["erase"] * 3 + ["evaluate"]
    result = run_grid(nodes, InlineExecutor(), root, threads=1, report=lambda line: None)
    assert result.ok and len(result.done) == len(nodes), result
    _check_complete(root, recipe, len(nodes))

    frame = diffunlearn.results(recipe, root)
    attacks = frame["kind"] == "attack"
    assert (frame["status"] == "complete").all() and frame.loc[~attacks, "UA"].notna().all()
    assert frame.loc[attacks, "AR_DiMRA_top1"].notna().all()
    erased = frame[frame["kind"] == "erase"].iloc[0]
    assert erased["train_seconds"] > 0 and erased["erase_FID"] >= 0  # [003]'s paired figures of each erase run
    verdicts = {c.claim.id: c.verdict for c in evaluate_claims(recipe, frame)}
    assert set(verdicts) == {c.id for c in recipe.claims}
    assert set(verdicts.values()) <= {HOLDS, FAILS, INCONCLUSIVE}  # one seed: data for every claim
    html = diffunlearn.bench_report(recipe, tmp_path / "report.html", root).read_text()
    assert all(claim_id in html for claim_id in verdicts) and 'class="verdict nodata"' not in html
    assert html.count('class="verdict inconclusive"') >= len(verdicts)  # a verdict per claim (and slice) shown
    evaluated = frame[~attacks]  # erase and evaluate runs record the generations behind their AR too
    assert (evaluated["AR_resolution"] == 100 / evaluated["forget_images"]).all()

    # a record made before an upgrade of the extraction: `bench --refresh` re-reads it, times kept
    from diffunlearn.bench.worker import record_path

    node = next(n for n in nodes if n.kind == "erase")
    spec = node.spec(root, None, {})
    record = json.loads(record_path(spec).read_text())
    seconds = record["metrics"]["seconds"]
    record["metrics"] = {k: v for k, v in record["metrics"].items() if k not in ("forget_images", "UA")}
    Store(root / "results.sqlite").record(record)
    record_path(spec).write_text(json.dumps(record))
    assert diffunlearn.results(recipe, root).set_index("node").loc[node.node, ["UA", "forget_images"]].isna().all()
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    refreshed = CliRunner().invoke(app, ["bench", str(recipe_file), "--root", str(root), "--refresh"])
    assert refreshed.exit_code == 0 and f"figures of {len(nodes)} finished runs" in refreshed.output, refreshed.output
    row = diffunlearn.results(recipe, root).set_index("node").loc[node.node]
    assert row["UA"] == frame.set_index("node").loc[node.node, "UA"] and row["forget_images"] > 0
    assert row["seconds"] == seconds


@pytest.mark.slow
def test_killed_runner_then_rerun_finishes_without_duplicates(tmp_path, tiny_model_dir, tiny_evaluator_dir):
    path = tiny_recipe(tmp_path, tiny_model_dir, tiny_evaluator_dir, seeds=(0, 1))
    root = tmp_path / "root"
    command = [sys.executable, "-m", "diffunlearn.cli", "bench", str(path), "--root", str(root), "--jobs", "2"]
    runner = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    store_path = root / "results.sqlite"
    deadline = time.time() + 600
    while time.time() < deadline:  # kill once one run has finished and others are under way
        if store_path.exists():
            statuses = [r["status"] for r in Store(store_path).runs("tiny")]
            if statuses.count("complete") >= 1 and "running" in statuses:
                break
        assert runner.poll() is None, runner.stdout.read()
        time.sleep(0.2)
    runner.send_signal(signal.SIGKILL)
    runner.wait(timeout=30)
    statuses = [r["status"] for r in Store(store_path).runs("tiny")]
    assert "pending" in statuses or "running" in statuses  # killed mid-grid
    # the workers died with the runner: every run's lock is free again within seconds
    import fcntl

    for lock in root.rglob("*.lock"):
        for _ in range(50):
            with open(lock) as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    time.sleep(0.2)
        else:
            pytest.fail(f"{lock} still held after the runner died")

    again = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already done" in again.stdout
    rows = _check_complete(root, path, 4)
    records = list((root / "tiny" / "records").glob("*.json"))
    assert len(records) == 4 and all(json.loads(p.read_text())["status"] == "complete" for p in records)
    # a third run skips everything
    third = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert "0 run, 4 already done" in third.stdout
    assert len(rows) == 4


@pytest.mark.slow
def test_local_ray_cluster_runs_a_two_run_grid(tmp_path, tiny_model_dir, tiny_evaluator_dir):
    ray = pytest.importorskip("ray", reason="the 'ray' extra is not installed (pip install 'diffunlearn[ray]')")
    path = tiny_recipe(tmp_path, tiny_model_dir, tiny_evaluator_dir)
    root = tmp_path / "root"
    try:
        result = run_bench(path, jobs=2, executor="ray", root=root, threads=1, report=lambda line: None)
    finally:
        ray.shutdown()
    assert result.ok and len(result.done) == 2
    rows = _check_complete(root, path, 2)
    assert {r["kind"] for r in rows} == {"erase", "attack"}


@pytest.mark.slow
def test_submitit_local_executor_runs_the_same_grid(tmp_path, tiny_model_dir, tiny_evaluator_dir, monkeypatch):
    pytest.importorskip("submitit", reason="the 'slurm' extra is not installed (pip install 'diffunlearn[slurm]')")
    monkeypatch.setenv("PYTHONPATH", _env()["PYTHONPATH"])
    path = tiny_recipe(tmp_path, tiny_model_dir, tiny_evaluator_dir)
    root = tmp_path / "root"
    result = run_bench(path, jobs=2, executor="slurm", cluster="local", root=root, threads=1,
                       report=lambda line: None)
    assert result.ok and len(result.done) == 2
    _check_complete(root, path, 2)
    assert list((root / "tiny" / "submitit").glob("*_result.pkl"))  # submitit ran the jobs


@pytest.mark.slow
def test_quick_recipe_end_to_end(tmp_path):
    """The README's quick benchmark: the grid, then the report with a verdict for every claim."""
    root = tmp_path / "bench"
    env = _env()
    env.pop("OMP_NUM_THREADS")
    start = time.time()
    run = subprocess.run([sys.executable, "-m", "diffunlearn.cli", "bench", "quick", "--root", str(root)], env=env,
                         capture_output=True, text=True, timeout=3600)
    assert run.returncode == 0, run.stdout + run.stderr
    report = tmp_path / "report.html"
    made = subprocess.run([sys.executable, "-m", "diffunlearn.cli", "report", "quick", "--root", str(root),
                           "--out", str(report)], env=env, capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr
    html = report.read_text()
    for claim in load_recipe("quick").claims:
        assert claim.id in html
    assert 'class="verdict nodata"' not in html  # (the legend names `no data`; no verdict says it)
    print(f"quick: {time.time() - start:.0f} s")
