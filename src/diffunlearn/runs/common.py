"""What every run kind shares: the Run object, the start/skip/resume decision, the loop's
settings from a typed config, the run log, JSON and sample-grid writing, cost probes."""

from __future__ import annotations

import json
import logging
import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffunlearn.runs.resolve import prepare_run_dir

log = logging.getLogger("diffunlearn")


@dataclass
class Run:
    """A finished run: its directory, resolved config and metrics."""

    out: Path
    run_id: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    skipped: bool = False

    @property
    def model_dir(self) -> Path:
        return self.out / "model"


def run_or_skip(resolved, out: str | Path | None, kind: str, label: str,
                 notify: Callable[[str], None] | None, execute: Callable[[Path], Run]) -> Run:
    """Run `execute` in the run directory (default: the resolved run's), or load it if finished."""
    out_dir = Path(out) if out else resolved.default_out()
    if start_state(out_dir, resolved.run_id, kind, label, notify) == "done":
        return load_run(out_dir, skipped=True)
    return execute(out_dir)


def start_state(out: Path, run_id: str, kind: str, label: str, notify: Callable[[str], None] | None) -> str:
    """The state of a run directory ('new', 'resume' or 'done'), told to `notify` in one line."""
    state = prepare_run_dir(out, run_id, kind)
    if notify:
        verb = {"done": "is already complete", "resume": "resumes", "new": "starts"}[state]
        notify(f"{label} {verb} in {out}")
    return state


def loop_config(c, steps: int, seed: int, progress: bool, description: str, **extra):
    """The shared loop's settings from a method's or an attack's TrainConfig."""
    from diffunlearn.engine.loop import LoopConfig

    return LoopConfig(steps=steps, lr=c.lr, optimizer=c.optimizer, weight_decay=c.weight_decay,
                      grad_clip=c.grad_clip, warmup=c.warmup, schedule=c.schedule, seed=seed,
                      log_every=c.log_every, checkpoint_every=c.checkpoint_every, progress=progress,
                      description=description, **extra)


@dataclass
class Judging:
    """What a run evaluates with, loaded once: the concept set, the evaluator (None: `none`) and
    the FID/KID feature extractor (None: no FID)."""

    concept_set: Any
    evaluator: Any
    fid_feature: Any

    @property
    def spec(self) -> str | None:
        return self.evaluator.spec if self.evaluator is not None else None


def load_judging(eval_cfg, concept_set) -> Judging:
    """The evaluator `eval.evaluator` names (default: the concept set's) and the FID features
    `eval.fid_features` names, for `concept_set`."""
    from diffunlearn.metrics.evaluators import effective_evaluator, load_evaluator, load_fid_features

    evaluator = load_evaluator(effective_evaluator(eval_cfg, concept_set), concept_set, eval_cfg)
    judging = Judging(concept_set, evaluator, load_fid_features(eval_cfg.fid_features, evaluator))
    if evaluator is None:
        log.info("no evaluator (eval.evaluator=none): samples are generated, metrics are not computed")
    return judging


def save_samples(path: Path, before, after) -> None:
    """Forget and retain prompts, before and after, the same seeds in each column."""
    from diffunlearn.metrics.grid import save_grid

    rows = []
    for role, label in (("forget-full", "forget"), ("forget-partial", "forget (partial)"), ("retain", "retain")):
        idx = [i for i, p in enumerate(before.plan) if p.role == role][:10]
        if idx:
            rows.append((f"{label}: before", before.images[idx]))
            rows.append((f"{label}: after", after.images[idx]))
    save_grid(path, rows)


# ---- small utilities -------------------------------------------------------------------------

def accelerator_peak() -> dict[str, float]:
    import torch

    if torch.cuda.is_available():
        return {"peak_cuda_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
    return {}


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def write_json(path: Path, data: dict) -> None:
    from diffunlearn.io import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, default=_json_default))


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def load_run(out: Path, skipped: bool) -> Run:
    import yaml

    config = yaml.safe_load((out / "config.yaml").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    return Run(out, config.get("run_id", ""), config, metrics, skipped=skipped)


def attach_log(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def detach_log(handler: logging.Handler) -> None:
    log.removeHandler(handler)
    handler.close()


def remove_checkpoint(out: Path) -> None:
    import shutil

    shutil.rmtree(out / "checkpoint", ignore_errors=True)


def make_task(resolved, original, progress: bool):
    """The run's UnlearningTask: its concept set, the set's image source (a generated source
    samples `original`, the model before any training, and caches by its hash), the anchor map."""
    from diffunlearn.data.images import image_source
    from diffunlearn.data.tasks import UnlearningTask, cache_dir

    t = resolved.task
    source = image_source(resolved.concept_set, t.seed, original, cache_dir(), progress)
    return UnlearningTask.create(t.forget, t.retain, t.images_per_prompt, t.seed, t.anchor_scheme,
                                 image_size=original.pixel_size, concept_set=resolved.concept_set, source=source)
