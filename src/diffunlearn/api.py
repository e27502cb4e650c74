"""The Python API: `erase`, `evaluate`, `demo`. The CLI is a thin layer over these.

    import diffunlearn
    run = diffunlearn.erase("core", forget=["dotted"])
    run.metrics["after"]["UA"]

Every run directory holds config.yaml (resolved), run.json (id and status), metrics.json,
curves.csv, model/ (changed weights in diffusers layout with the base model's path and
hash, loadable anywhere a model is accepted), samples.png and log.txt.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffunlearn.runs import (
    ResolvedRun,
    prepare_run_dir,
    resolve_erase,
    write_config,
    write_run_marker,
)

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


def erase(method: str | None, forget: list[str] | None = None, retain: list[str] | None = None,
          model: str | Path | None = None, config: str | Path | None = None, out: str | Path | None = None,
          overrides: list[str] | None = None, threads: int | None = None, progress: bool = True,
          notify: Callable[[str], None] | None = None) -> Run:
    """Erase `forget` from `model` (default: the shipped testbed) with `method`, evaluate before
    and after, and write the run directory. Finished runs are skipped; interrupted ones resume.
    `notify` receives one line saying which of the three happens."""
    resolved = resolve_erase(method, forget, retain, model, config, overrides)
    out_dir = Path(out) if out else resolved.default_out()
    state = prepare_run_dir(out_dir, resolved.run_id, "erase")
    if notify:
        verb = {"done": "is already complete", "resume": "resumes", "new": "starts"}[state]
        notify(f"run {resolved.run_id} ({resolved.method}, profile {resolved.profile}) {verb} in {out_dir}")
    if state == "done":
        return _load_run(out_dir, skipped=True)
    return _execute_erase(resolved, out_dir, threads, progress)


def _execute_erase(resolved: ResolvedRun, out: Path, threads: int | None, progress: bool) -> Run:
    import torch

    from diffunlearn.backends.diffusers_t2i import T2IModel
    from diffunlearn.data.tasks import UnlearningTask
    from diffunlearn.engine.loop import LoopConfig, run_loop, write_curves
    from diffunlearn.methods import methods
    from diffunlearn.metrics.diagnostics import weight_distance

    out.mkdir(parents=True, exist_ok=True)
    handler = _attach_log(out / "log.txt")
    try:
        if threads:
            torch.set_num_threads(threads)
        torch.manual_seed(resolved.seed)
        model = T2IModel.from_pretrained(resolved.model_dir)
        model.autocast = resolved.method_config.bf16
        t = resolved.task
        task = UnlearningTask.create(t.forget, t.retain, t.images_per_pair, t.seed, t.anchor_scheme,
                                     image_size=model.image_shape[-1])
        method_cls = methods.get(resolved.method)
        method = method_cls(resolved.method_config, model, task)
        steps = method.resolved_steps()
        config = resolved.as_dict() | {"run_id": resolved.run_id, "versions": resolved.versions,
                                       "resolved": {"steps": steps, "param_group": method.param_group(),
                                                    "anchor_map": task.anchor_map, "threads": torch.get_num_threads()}}
        write_config(out, config)
        write_run_marker(out, resolved.run_id, "erase", "running")
        log.info("erase %s: forget %s, %d steps on %s (run %s)", resolved.method, t.forget, steps,
                 method.param_group(), resolved.run_id)

        evaluators = load_evaluators(resolved.eval.evaluators) if resolved.eval.enabled else None
        alternatives = task.anchor_map if method.uses_anchor else None
        before = _evaluate_cached(model, evaluators, task.forget, resolved, alternatives, progress)

        params = model.set_trainable(method.param_group())
        method.setup()
        c = resolved.method_config
        loop_cfg = LoopConfig(steps=steps, lr=c.lr, optimizer=c.optimizer, weight_decay=c.weight_decay,
                              grad_clip=c.grad_clip, warmup=c.warmup, schedule=c.schedule, seed=resolved.seed,
                              log_every=c.log_every, checkpoint_every=c.checkpoint_every, progress=progress,
                              description=f"erase ({resolved.method})")
        rss_before = _peak_rss_mb()
        model.counters = dict.fromkeys(model.counters, 0)  # count the unlearning only, not the evaluation
        if method.closed_form:
            result = _closed_form(method)
        else:
            result = run_loop(params, method.step, loop_cfg, checkpoint_dir=out / "checkpoint",
                              extra_state=method.extra_state, load_extra_state=method.load_extra_state)
        write_curves(out / "curves.csv", result.curves)
        model.meta.update(forget=task.forget, method=resolved.method, run_id=resolved.run_id)
        model.save_pretrained(out / "model", changed_only=not getattr(method, "full_model", False))
        model.path = out / "model"

        metrics: dict[str, Any] = {"run_id": resolved.run_id, "method": resolved.method, "forget": task.forget,
                                   "anchor_map": task.anchor_map}
        metrics["cost"] = {"train_seconds": round(result.seconds, 2), "steps": steps,
                           "resumed_from_step": result.resumed_from, "peak_rss_mb": _peak_rss_mb(),
                           "peak_rss_mb_before_training": rss_before, **dict(model.counters),
                           **_accelerator_peak()}
        metrics["diagnostics"] = {"weight_distance": weight_distance(model.teacher_params(), params),
                                  "final_loss": result.curves[-1] if result.curves else None}
        if evaluators is not None:
            after = _evaluate(model, evaluators, task.forget, resolved, alternatives, before, progress)
            metrics["before"], metrics["after"] = before.metrics, after.metrics
            _save_samples(out / "samples.png", before, after)
        _write_json(out / "metrics.json", metrics)
        write_run_marker(out, resolved.run_id, "erase", "complete")
        _remove_checkpoint(out)
        log.info("done: %s", json.dumps({k: metrics.get("after", {}).get(k) for k in ("UA", "IRA", "CRA", "SFID")}))
        return Run(out, resolved.run_id, config, metrics)
    finally:
        _detach_log(handler)


def evaluate(model: str | Path | None = None, forget: list[str] | None = None, out: str | Path | None = None,
             overrides: list[str] | None = None, threads: int | None = None, progress: bool = True,
             ) -> dict[str, Any]:
    """Evaluate a model (a model folder or an erase run's model/) on the forget concepts."""
    from diffunlearn.backends.model_dir import check_model_dir
    from diffunlearn.config import EvalConfig, apply_overrides, build
    from diffunlearn.data.tasks import validate_concepts
    from diffunlearn.runs import model_folder

    model_dir = model_folder(model)

    meta = check_model_dir(model_dir)
    forget = list(forget or meta.get("forget") or [])
    validate_concepts(forget, None)
    eval_cfg = build(EvalConfig, apply_overrides({}, [o.removeprefix("eval.") for o in overrides or []]), "eval.")
    if out:
        prepare_out = Path(out)
        if prepare_out.exists() and any(prepare_out.iterdir()) and not (prepare_out / "evaluation.json").exists():
            from diffunlearn.runs import RunDirError

            raise RunDirError(f"output directory {prepare_out} is not empty; choose another --out")

    import torch

    from diffunlearn.backends.diffusers_t2i import T2IModel
    from diffunlearn.metrics.evaluate import evaluate_model

    if threads:
        torch.set_num_threads(threads)
    loaded = T2IModel.from_pretrained(model_dir)
    result = evaluate_model(loaded, load_evaluators(eval_cfg.evaluators), forget, eval_cfg, progress=progress)
    metrics = {"model": str(model_dir), "model_hash": loaded.content_hash(), "forget": forget,
               "eval": eval_cfg.model_dump(), **result.metrics}
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "evaluation.json", metrics)
    return metrics


def _closed_form(method):
    from diffunlearn.engine.loop import LoopResult

    start = time.perf_counter()
    logs = method.apply_closed_form()
    return LoopResult(steps=0, curves=[{"step": 0, **logs}], hook_rows=[], seconds=time.perf_counter() - start)


# ---- evaluation helpers ----------------------------------------------------------------------

def load_evaluators(folder: str | None):
    from diffunlearn.metrics.classifier import EVALUATOR_DIR, Evaluators

    return Evaluators.load(Path(folder) if folder else EVALUATOR_DIR)


def _evaluate(model, evaluators, forget, resolved: ResolvedRun, alternatives, before, progress: bool):
    from diffunlearn.metrics.evaluate import evaluate_model

    reference = before.metrics.get("FID") if before is not None else None
    return evaluate_model(model, evaluators, forget, resolved.eval, alternatives=alternatives,
                          reference_fid=reference, progress=progress)


def _evaluate_cached(model, evaluators, forget, resolved: ResolvedRun, alternatives, progress: bool):
    """The original model's evaluation, cached per (model, forget set, eval config, alternatives):
    every erase run of the same model and concepts starts from the same 'before'."""
    if evaluators is None:
        return None
    import numpy as np
    import torch

    from diffunlearn.config import config_hash
    from diffunlearn.data.tasks import cache_dir
    from diffunlearn.metrics.evaluate import Evaluation

    key = config_hash({"model": resolved.model_hash, "forget": sorted(forget), "eval": resolved.eval.model_dump(),
                       "alternatives": alternatives, "versions": resolved.versions})
    folder = cache_dir() / "evaluations" / key
    if (folder / "metrics.json").exists() and (folder / "images.npy").exists():
        try:
            images = torch.from_numpy(np.load(folder / "images.npy", allow_pickle=False))
            saved = json.loads((folder / "metrics.json").read_text())
            return Evaluation(metrics=saved["metrics"], images=images, plan=saved["plan"])
        except (OSError, ValueError, KeyError):
            pass  # a corrupt cache entry is recomputed
    result = _evaluate(model, evaluators, forget, resolved, alternatives, None, progress)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "images.npy", result.images.numpy(), allow_pickle=False)
    _write_json(folder / "metrics.json", {"metrics": result.metrics, "plan": [p.to_dict() for p in result.plan]})
    return result


def _save_samples(path: Path, before, after) -> None:
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

def _accelerator_peak() -> dict[str, float]:
    import torch

    if torch.cuda.is_available():
        return {"peak_cuda_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
    return {}


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _write_json(path: Path, data: dict) -> None:
    from diffunlearn.io import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, default=_json_default))


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _load_run(out: Path, skipped: bool) -> Run:
    import yaml

    config = yaml.safe_load((out / "config.yaml").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    return Run(out, config.get("run_id", ""), config, metrics, skipped=skipped)


def _attach_log(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def _detach_log(handler: logging.Handler) -> None:
    log.removeHandler(handler)
    handler.close()


def _remove_checkpoint(out: Path) -> None:
    import shutil

    shutil.rmtree(out / "checkpoint", ignore_errors=True)




DEMO_METHOD = "core"
DEMO_CONCEPT = "dotted"


def demo(out: str | Path = "runs/demo", threads: int | None = None, progress: bool = True) -> Path:
    """Erase one style with CORE from the shipped model; write the run and `report.md`."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "run").is_dir():
        from diffunlearn.runs import RunDirError

        raise RunDirError(f"output directory {out} is not empty and holds no demo; choose another --out")
    start = time.perf_counter()
    run = erase(DEMO_METHOD, forget=[DEMO_CONCEPT], out=out / "run", threads=threads, progress=progress)
    report = out / "report.md"
    report.write_text(render_report(run, seconds=time.perf_counter() - start))
    return report


def render_report(run: Run, seconds: float) -> str:
    """A short markdown report: the metrics table (with 95% CIs) and the sample grid."""
    keys = ("UA", "UA_partial", "IRA", "CRA", "AR_MU_top1", "AR_CL", "FID", "KID", "SFID", "Total")
    before, after = run.metrics.get("before", {}), run.metrics.get("after", {})
    lines = [f"# diffunlearn demo: {run.config['method']['name']} erases `{', '.join(run.metrics['forget'])}`", "",
             f"Run `{run.run_id}` in `{run.out}`; anchor map {run.metrics.get('anchor_map')}; "
             f"training {run.metrics['cost']['train_seconds']:.0f} s, demo {seconds:.0f} s in all.", "",
             "| metric | before | after | after 95% CI |", "|---|---|---|---|"]
    for k in keys:
        ci = after.get(f"{k}_ci")
        ci_text = f"[{ci[0]:.1f}, {ci[1]:.1f}]" if isinstance(ci, list | tuple) and len(ci) == 2 else ""
        lines.append(f"| {k} | {_fmt(before.get(k))} | {_fmt(after.get(k))} | {ci_text} |")
    lines += ["", "Samples (same seeds before and after):", "", "![samples](run/samples.png)", ""]
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, dict):
        value = value.get("mean")
    return f"{value:.2f}" if isinstance(value, int | float) else "-"
