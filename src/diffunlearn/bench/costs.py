"""Expected seconds of each grid node, from measured per-run costs (bench/costs.yaml).

An erase run costs its start-up (imports, model load), its training (the method's measured
`cost.train_seconds` for forgetting one style with its testbed profile, README's methods
table, scaled by the run's resolved steps over the profile's), one evaluation after, and one
before per forget set and evaluation protocol (cached: only the first run pays it). An attack
costs its start-up, its steps and one evaluation every `eval_every` steps plus the one at step
0, each at the attack's own (measured) cost of an evaluation. The estimates feed the progress
display's time left and the recipes' `estimate` block (tests/test_bench.py checks that each
recipe states what this model computes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

COSTS_FILE = Path(__file__).parent / "costs.yaml"


@dataclass
class Costs:
    startup: float
    evaluation: float
    images_reference: int
    parallel_slowdown: float
    train_seconds: dict[str, float]
    train_steps: dict[str, int]
    attack_step_seconds: dict[str, float]
    attack_evaluation: float
    retrain_seconds: float
    retrain_steps: int
    default_seconds: float
    seen_before: set[str] = field(default_factory=set)

    @classmethod
    def load(cls, path: Path = COSTS_FILE) -> Costs:
        data: dict[str, Any] = yaml.safe_load(path.read_text())
        methods = data["methods"]
        return cls(startup=data["startup_seconds"], evaluation=data["evaluation_seconds"],
                   images_reference=data["evaluation_images"], parallel_slowdown=data["parallel_slowdown"],
                   train_seconds={m: v["train_seconds"] for m, v in methods.items()},
                   train_steps={m: v["steps"] for m, v in methods.items()},
                   attack_step_seconds=data["attack_step_seconds"],
                   attack_evaluation=data["attack_evaluation_seconds"], retrain_seconds=data["retrain_seconds"],
                   retrain_steps=data["retrain_steps"],
                   default_seconds=data["default_train_seconds"])

    def _evaluation(self, eval_cfg, concept_set, forget: list[str], seconds: float | None = None) -> float:
        """One evaluation (`seconds` for the reference image count; default: an erase run's):
        proportional to its image count (the protocol's plan on the concept set)."""
        per_reference = self.evaluation if seconds is None else seconds
        return per_reference * evaluation_images(concept_set, forget, eval_cfg) / self.images_reference

    def evaluate_seconds(self, overrides: list[str], concept_set, forget: list[str]) -> float:
        return self.parallel_slowdown * (self.startup + self._evaluation(_eval_config(overrides), concept_set, forget))

    def erase_seconds(self, resolved) -> float:
        method, cfg = resolved.method, resolved.method_config
        evaluation = self._evaluation(resolved.eval, resolved.concept_set, list(resolved.task.forget))
        key = repr((sorted(resolved.task.forget), resolved.eval.model_dump()))
        before = 0.0 if key in self.seen_before else evaluation
        self.seen_before.add(key)
        if method == "retrain":
            train = self._retrain_seconds(resolved)
        else:
            steps, base = resolved_steps(method, cfg, resolved.task, resolved.concept_set), self.train_steps.get(method)
            train = self.train_seconds.get(method, self.default_seconds)
            if steps and base:  # closed forms (steps 0) cost what they cost
                train *= steps / base
        return self.parallel_slowdown * (self.startup + train + before + evaluation)

    def _retrain_seconds(self, resolved) -> float:
        """One pretraining per cache entry (`methods/retrain.py` keys it by forget set, text
        encoder kept or retrained, and the recipe's step count and data size), scaled to its steps;
        later runs of the same entry find it cached."""
        cfg = resolved.method_config
        entry = repr(("retrain", sorted(resolved.task.forget), cfg.train_text_encoder, cfg.pretrain_steps,
                      cfg.pretrain_images_per_pair))
        if entry in self.seen_before:
            return 0.0
        self.seen_before.add(entry)
        return self.retrain_seconds * (cfg.pretrain_steps or self.retrain_steps) / self.retrain_steps

    def attack_seconds(self, name: str, overrides: list[str], concept_set, forget: list[str]) -> float:
        from diffunlearn.attacks import attacks
        from diffunlearn.config import apply_overrides, deep_merge

        data = apply_overrides({}, [o for o in overrides if not o.startswith("seed=")])
        cfg = deep_merge(attacks.get(name).profiles.get("testbed", {}), data.get("attack") or {})
        steps = int(cfg.get("steps", 200))
        every = int(cfg.get("eval_every", 0) or steps)
        evaluations = 1 + math.ceil(steps / every) if steps else 1
        per_step = self.attack_step_seconds.get(name, 0.4) * (int(cfg.get("batch_size", 16)) / 16)
        return self.parallel_slowdown * (self.startup + steps * per_step + evaluations * self._evaluation(
            _eval_config(overrides), concept_set, forget, self.attack_evaluation))


def evaluation_images(concept_set, forget: list[str], eval_cfg) -> int:
    """Images one evaluation generates (metrics/evaluate.py's plan, counted without torch): each
    forget concept's full prompts and partial prompts, then the retain grid."""
    forgotten = set(forget)
    full = sum(len(concept_set.full_items(c, exclude=forgotten)) for c in forget)
    partial = sum(len(concept_set.alone_items(c, evaluation=True)) for c in forget)
    return (full * eval_cfg.forget_images + len(concept_set.retain_grid(forgotten)) * eval_cfg.images_per_prompt
            + partial * eval_cfg.partial_images)


def _eval_config(overrides: list[str]):
    from diffunlearn.config import EvalConfig, apply_overrides

    data = apply_overrides({}, [o for o in overrides if o.startswith("eval.")]).get("eval") or {}
    return EvalConfig(**data)


def resolved_steps(method: str, cfg, task, concept_set) -> int:
    """The steps a method will run (epochs resolve against |D_f|), without building the task's images."""
    from diffunlearn.data.tasks import UnlearningTask
    from diffunlearn.methods import methods

    cls = methods.get(method)
    if cls.closed_form:
        return 0
    retain = list(task.retain) if task.retain is not None else [c for c in concept_set.erasable()
                                                                 if c not in task.forget]
    probe = cls.__new__(cls)
    probe.cfg = cfg
    probe.task = UnlearningTask(list(task.forget), retain, concept_set, None, task.images_per_prompt, task.seed,
                                task.anchor_scheme)
    return int(probe.resolved_steps())


def grid_minutes(nodes, jobs: int = 2) -> float:
    """Wall minutes of a grid on `jobs` parallel runs (cold caches): its nodes' seconds over the jobs."""
    return sum(n.est_seconds for n in nodes) / max(jobs, 1) / 60
