"""Shared pieces of the bench tests: a tiny recipe on the tiny model, fake records."""

from __future__ import annotations

import textwrap
from pathlib import Path

from conftest import TINY_EVAL

TINY_ERASE = ["method.epochs=null", "method.steps=2", "method.batch_size=2", "method.checkpoint_every=1",
              "task.images_per_prompt=1"]


def tiny_recipe(folder: Path, model_dir: Path, evaluator_dir: Path, name: str = "tiny", seeds=(0,),
                methods=("core",), attacks: bool = True, forget_name: str = "dotted", claims: str = "") -> Path:
    """A recipe file whose runs take seconds: the tiny model, tiny evaluators, two steps."""
    fast = [*TINY_EVAL, f"eval.evaluator=canvas:{evaluator_dir}"]
    attack = textwrap.dedent("""\
        attacks:
          - id: relearn-i
            attack: relearn
            overrides: [attack.steps=2, attack.eval_every=1, attack.batch_size=2, attack.checkpoint_every=1]
    """) if attacks else ""
    text = f"""\
name: {name}
description: a tiny grid for tests
paper: tests
model: {model_dir}
seeds: {list(seeds)}
protocols:
  fast: {fast}
forget_sets:
  "{forget_name}": [dotted]
groups:
  - id: g
    methods: {list(methods)}
    forget: ["{forget_name}"]
    overrides: {TINY_ERASE}
{textwrap.indent(attack, '    ')}
{claims}
estimate:
  runs: 1
  minutes: 1
  basis: tests
"""
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


def fake_record(spec: dict, metrics: dict[str, float], curves=()) -> dict:
    """A finished run's record as the worker would write it (no run executed)."""
    return {**{k: v for k, v in spec.items() if k not in ("overrides", "store", "records", "threads")},
            "status": "complete", "host": "test", "started": 1.0, "finished": 2.0, "seconds": 1.0,
            "metrics": metrics, "curves": list(curves)}


class FakeExecutor:
    """Completes each node at once, recording it as the worker would (with `metrics` and
    `curves` of each kind), and fails the nodes asked to."""

    def __init__(self, fail=(), metrics=None, curves=None, diverge=()):
        self.metrics = metrics or (lambda spec: {"UA": 50.0})
        self.curves = curves or (lambda spec: [])
        self.submitted, self.finished, self.fail, self.diverge = [], [], set(fail), set(diverge)
        self.queue = []

    def submit(self, spec):
        from diffunlearn.bench.store import Store
        from diffunlearn.bench.worker import _save_record

        self.submitted.append(spec["node"])
        status = "diverged" if spec["node"] in self.diverge else "failed" if spec["node"] in self.fail else "complete"
        record = fake_record(spec, self.metrics(spec), self.curves(spec))
        if status != "complete":
            record |= {"status": status, "metrics": {}, "error": f"asked to end {status}"}
        _save_record(spec, record)
        Store(spec["store"]).record(record)
        self.queue.append((spec["node"], status))

    def poll(self, timeout=0.0):
        done, self.queue = self.queue[:1], self.queue[1:]
        self.finished += [n for n, _ in done]
        return done

    def shutdown(self):
        pass


class InlineExecutor:
    """Runs each node in this process through the worker's entry point (`run_node`): the real
    runs, without a process start-up per node (the local executor's processes are tested in
    test_bench_run.py's slow tests)."""

    def __init__(self):
        self.finished = []

    def submit(self, spec):
        from diffunlearn.bench.worker import run_node

        self.finished.append((spec["node"], run_node(spec, raise_on_failure=False)["status"]))

    def poll(self, timeout=0.0):
        done, self.finished = self.finished, []
        return done

    def shutdown(self):
        pass
