"""Shared pieces of the bench tests: a tiny recipe on the tiny model, fake records."""

from __future__ import annotations

import textwrap
from pathlib import Path

from conftest import TINY_EVAL

TINY_ERASE = ["method.epochs=null", "method.steps=2", "method.batch_size=2", "method.checkpoint_every=1",
              "task.images_per_pair=1"]


def tiny_recipe(folder: Path, model_dir: Path, evaluator_dir: Path, name: str = "tiny", seeds=(0,),
                methods=("core",), attacks: bool = True, forget_name: str = "dotted", claims: str = "") -> Path:
    """A recipe file whose runs take seconds: the tiny model, tiny evaluators, two steps."""
    fast = [*TINY_EVAL, f"eval.evaluators={evaluator_dir}"]
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
