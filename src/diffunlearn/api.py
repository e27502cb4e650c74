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
    label = f"run {resolved.run_id} ({resolved.method}, profile {resolved.profile})"
    return _run_or_skip(resolved, out, "erase", label, notify, lambda out_dir: _execute_erase(
        resolved, out_dir, threads, progress))


def _run_or_skip(resolved, out: str | Path | None, kind: str, label: str,
                 notify: Callable[[str], None] | None, execute: Callable[[Path], Run]) -> Run:
    """Run `execute` in the run directory (default: the resolved run's), or load it if finished."""
    out_dir = Path(out) if out else resolved.default_out()
    if _start(out_dir, resolved.run_id, kind, label, notify) == "done":
        return _load_run(out_dir, skipped=True)
    return execute(out_dir)


def _start(out: Path, run_id: str, kind: str, label: str, notify: Callable[[str], None] | None) -> str:
    """The state of a run directory ('new', 'resume' or 'done'), told to `notify` in one line."""
    state = prepare_run_dir(out, run_id, kind)
    if notify:
        verb = {"done": "is already complete", "resume": "resumes", "new": "starts"}[state]
        notify(f"{label} {verb} in {out}")
    return state


def _loop_config(c, steps: int, seed: int, progress: bool, description: str, **extra):
    """The shared loop's settings from a method's or an attack's TrainConfig."""
    from diffunlearn.engine.loop import LoopConfig

    return LoopConfig(steps=steps, lr=c.lr, optimizer=c.optimizer, weight_decay=c.weight_decay,
                      grad_clip=c.grad_clip, warmup=c.warmup, schedule=c.schedule, seed=seed,
                      log_every=c.log_every, checkpoint_every=c.checkpoint_every, progress=progress,
                      description=description, **extra)


def _execute_erase(resolved: ResolvedRun, out: Path, threads: int | None, progress: bool) -> Run:
    import torch

    from diffunlearn.backends.diffusers_t2i import T2IModel
    from diffunlearn.data.tasks import UnlearningTask
    from diffunlearn.engine.loop import run_loop, write_curves
    from diffunlearn.methods import methods
    from diffunlearn.metrics.diagnostics import DistanceTracker, weight_distance

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
        # diagnostics every log_every steps: each group's distance from the original weights
        loop_cfg = _loop_config(c, steps, resolved.seed, progress, f"erase ({resolved.method})",
                                hook_every=c.log_every)
        start = {n: p.detach() for n, p in model.unet.named_parameters()}
        tracker = DistanceTracker(start, start, list(params))
        rss_before = _peak_rss_mb()
        model.counters = dict.fromkeys(model.counters, 0)  # count the unlearning only, not the evaluation
        if method.closed_form:
            result = _closed_form(method)
        else:
            result = run_loop(params, method.step, loop_cfg, checkpoint_dir=out / "checkpoint",
                              hooks=[lambda step: tracker(dict(model.unet.named_parameters()))],
                              extra_state=method.extra_state, load_extra_state=method.load_extra_state)
        write_curves(out / "curves.csv", result.curves)
        if result.hook_rows:
            write_curves(out / "diagnostics.csv", result.hook_rows)
        model.meta.update(forget=task.forget, method=resolved.method, run_id=resolved.run_id)
        if alternatives:
            model.meta["alternatives"] = alternatives
        if getattr(method, "full_model", False):
            # a full model (retrain) has no base; attacks measure distances against this original
            model.meta["original"] = {"path": str(Path(resolved.model_dir).resolve()), "hash": resolved.model_hash}
        model.save_pretrained(out / "model", changed_only=not getattr(method, "full_model", False))
        model.path = out / "model"

        metrics: dict[str, Any] = {"run_id": resolved.run_id, "method": resolved.method, "forget": task.forget,
                                   "anchor_map": task.anchor_map}
        metrics["cost"] = {"train_seconds": round(result.seconds, 2), "steps": steps,
                           "resumed_from_step": result.resumed_from, "peak_rss_mb": _peak_rss_mb(),
                           "peak_rss_mb_before_training": rss_before, **dict(model.counters),
                           **_accelerator_peak(), **method.cost()}
        metrics["diagnostics"] = {"weight_distance": weight_distance(model.teacher_params(), params),
                                  "final_loss": result.curves[-1] if result.curves else None,
                                  "distance_by_group": result.hook_rows[-1] if result.hook_rows else None}
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


def attack(name: str | None, model: str | Path | None = None, forget: list[str] | None = None,
           config: str | Path | None = None, out: str | Path | None = None, overrides: list[str] | None = None,
           threads: int | None = None, progress: bool = True, original: str | Path | None = None,
           notify: Callable[[str], None] | None = None) -> Run:
    """Attack a model (an erase run's directory, the original model or a retrain, the latter two
    with `forget`) with `name` (`relearn` or `resurgence`): build the attack data, fine-tune,
    evaluate every `attack.eval_every` steps, and write the attack's run directory (default:
    inside the attacked run, `attacks/<name>-<id>`). Finished runs are skipped; interrupted
    ones resume."""
    from diffunlearn.runs import resolve_attack

    resolved = resolve_attack(name, model, forget, config, overrides, original)
    label = f"attack {resolved.run_id} ({resolved.attack} on {resolved.model_dir})"
    return _run_or_skip(resolved, out, "attack", label, notify, lambda out_dir: _execute_attack(
        resolved, out_dir, threads, progress))


def erase_then_attack(method: str, attack_name: str, forget: list[str], model: str | Path | None = None,
                      overrides: list[str] | None = None, threads: int | None = None, progress: bool = True,
                      notify: Callable[[str], None] | None = None) -> tuple[Run, Run]:
    """The chain erase -> attack -> evaluate: `method.*` / `task.*` overrides go to the erase run,
    `attack.*` to the attack, `eval.*` to both; each run lands in its default directory."""
    overrides = overrides or []
    erase_overrides = [o for o in overrides if not o.startswith("attack.")]
    attack_overrides = [o for o in overrides if o.startswith(("attack.", "eval."))]
    erased = erase(method, forget, model=model, overrides=erase_overrides, threads=threads, progress=progress,
                   notify=notify)
    attacked = attack(attack_name, erased.out, overrides=attack_overrides, threads=threads, progress=progress,
                      notify=notify)
    return erased, attacked


def _execute_attack(resolved, out: Path, threads: int | None, progress: bool) -> Run:
    import torch

    from diffunlearn.attacks import attacks
    from diffunlearn.backends.diffusers_t2i import T2IModel
    from diffunlearn.data.tasks import UnlearningTask
    from diffunlearn.engine.loop import run_loop, write_curves
    from diffunlearn.metrics.diagnostics import DistanceTracker

    out.mkdir(parents=True, exist_ok=True)
    handler = _attach_log(out / "log.txt")
    try:
        if threads:
            torch.set_num_threads(threads)
        torch.manual_seed(resolved.seed)
        model = T2IModel.from_pretrained(resolved.model_dir)
        c = resolved.attack_config
        model.autocast = c.bf16
        same = resolved.original_dir.resolve() == resolved.model_dir.resolve()
        original = model if same else T2IModel.from_pretrained(resolved.original_dir)
        t = resolved.task
        task = UnlearningTask.create(t.forget, t.retain, t.images_per_pair, t.seed, t.anchor_scheme,
                                     image_size=model.image_shape[-1])
        attack_obj = attacks.get(resolved.attack)(c, model, task, original=original)
        data = attack_obj.prepare()
        shown = sorted(data.concepts() & set(task.forget))
        if shown:
            raise RuntimeError(f"attack data shows erased concepts {shown}: the protocol is broken")
        config = resolved.as_dict() | {"run_id": resolved.run_id, "versions": resolved.versions,
                                       "resolved": {"threads": torch.get_num_threads(), "data": data.info}}
        write_config(out, config)
        write_run_marker(out, resolved.run_id, "attack", "running")
        _write_json(out / "data.json", {**data.info, "prompts": sorted(set(data.prompts))})
        log.info("attack %s on %s: forget %s, %d images, %d steps (run %s)", resolved.attack, resolved.model_dir,
                 t.forget, len(data), c.steps, resolved.run_id)

        original_weights = original.effective_weights()
        tracker = DistanceTracker(original_weights, model.effective_weights(), attack_obj.trained_weight_names())
        del original_weights
        if not same:
            del original, attack_obj.original
            attack_obj.original = model
        evaluators = load_evaluators(resolved.eval.evaluators) if resolved.eval.enabled else None
        watcher = _AttackWatcher(model, evaluators, task.forget, resolved, tracker, out)
        params = attack_obj.trainable()
        loop_cfg = _loop_config(c, c.steps, resolved.seed, progress, f"attack ({resolved.attack})",
                                hook_every=c.eval_every or c.steps)
        model.counters = dict.fromkeys(model.counters, 0)
        result = run_loop(params, attack_obj.step, loop_cfg, checkpoint_dir=out / "checkpoint",
                          hooks=[watcher])
        write_curves(out / "curves.csv", result.curves)
        write_curves(out / "attack_curve.csv", result.hook_rows)
        changed = attack_obj.finish()
        model.meta["changed_params"] = sorted(set(model.meta.get("changed_params", [])) | set(changed))
        model.meta.update(attack=resolved.attack, attack_run_id=resolved.run_id, forget=task.forget)
        if resolved.alternatives:
            model.meta["alternatives"] = resolved.alternatives
        model.save_pretrained(out / "model", changed_only=True)

        metrics: dict[str, Any] = {"run_id": resolved.run_id, "attack": resolved.attack, "forget": task.forget,
                                   "model": str(resolved.model_dir), "original": str(resolved.original_dir),
                                   "alternatives": resolved.alternatives, "data": data.info}
        metrics["cost"] = {"train_seconds": round(result.seconds, 2), "steps": c.steps,
                           "resumed_from_step": result.resumed_from, "peak_rss_mb": _peak_rss_mb(),
                           **dict(model.counters), **_accelerator_peak()}
        metrics["curve"] = result.hook_rows
        metrics["summary"] = attack_summary(result.hook_rows)
        before, after = watcher.full("before"), watcher.full("after")
        if before is not None and after is not None:
            metrics["before"], metrics["after"] = before.metrics, after.metrics
            _save_samples(out / "samples.png", before, after)
        _write_json(out / "metrics.json", metrics)
        write_run_marker(out, resolved.run_id, "attack", "complete")
        _remove_checkpoint(out)
        log.info("done: %s", json.dumps(metrics["summary"]))
        return Run(out, resolved.run_id, config, metrics)
    finally:
        _detach_log(handler)


class _AttackWatcher:
    """The attack's loop hook: evaluates the model (AR top-1/top-3, AR_CL, retain accuracy, FID)
    and the weights' distance to the original at step 0, every `eval_every` steps and at the
    end. The full evaluations before and after are kept on disk, so a resumed run has them."""

    def __init__(self, model, evaluators, forget, resolved, tracker, out: Path):
        self.model, self.evaluators, self.forget, self.resolved = model, evaluators, forget, resolved
        self.tracker, self.out = tracker, out
        self.steps = resolved.attack_config.steps
        self.reference_fid: float | None = None

    def __call__(self, step: int) -> dict[str, float]:
        row = dict(self.tracker(self.model.effective_weights()))
        if self.evaluators is None:
            return row
        from diffunlearn.metrics.evaluate import evaluate_model

        result = evaluate_model(self.model, self.evaluators, self.forget, self.resolved.eval,
                                alternatives=self.resolved.alternatives, reference_fid=self._reference_fid(),
                                progress=False)
        m = result.metrics
        if step == 0:
            self._store("before", result)
        if step == self.steps:
            self._store("after", result)
        for key in ("AR_MU_top1", "AR_MU_top3", "AR_CL", "UA", "UA_partial", "IRA", "CRA", "FID", "p_forget"):
            if m.get(key) is not None:
                row[key] = m[key]
        if m.get("IRA") is not None and m.get("CRA") is not None:
            row["retain_acc"] = (m["IRA"] + m["CRA"]) / 2
        return row

    def _store(self, which: str, result) -> None:
        result.save(self.out / "evaluations" / which)

    def _reference_fid(self) -> float | None:
        """SFID's reference: the FID before the attack (read once; a resumed run reads it from disk)."""
        if self.reference_fid is None:
            before = self.full("before")
            self.reference_fid = before.metrics.get("FID") if before is not None else None
        return self.reference_fid

    def full(self, which: str):
        from diffunlearn.metrics.evaluate import Evaluation

        folder = self.out / "evaluations" / which
        return Evaluation.load(folder) if (folder / "metrics.json").exists() else None


def attack_summary(rows: list[dict[str, float]]) -> dict[str, Any]:
    """The attack's headline figures from its curve ([002] §VI, [000] §3): AR before the attack
    (AR_MU), the largest AR during it (AR_DiMRA, top-1 and top-3) and the step it was reached,
    the smallest AR_CL, retain accuracy and FID before and after, and the distance to the
    original weights before and after with the share of it travelled back."""
    if not rows:
        return {}
    first, last = rows[0], rows[-1]
    during = [r for r in rows if r["step"] > 0] or rows
    out: dict[str, Any] = {"evaluations": len(rows), "steps": last["step"]}
    for k in ("top1", "top3"):
        key = f"AR_MU_{k}"
        if key in first:
            best = max(during, key=lambda r, key=key: r[key])
            out[f"AR_MU_{k}"] = first[key]
            out[f"AR_DiMRA_{k}"] = best[key]
            out[f"AR_DiMRA_{k}_step"] = best["step"]
            out[f"AR_final_{k}"] = last[key]
    if "AR_MU_top1" in first:  # [000]'s forget accuracy: generations classified as the erased concept
        out["forget_acc_before"], out["forget_acc_after"] = first["AR_MU_top1"], last["AR_MU_top1"]
    if "AR_CL" in first:
        out["AR_CL_before"] = first["AR_CL"]
        out["AR_CL_min"] = min(r["AR_CL"] for r in during)
    for key in ("retain_acc", "IRA", "CRA", "FID", "UA"):
        if key in first:
            out[f"{key}_before"], out[f"{key}_after"] = first[key], last[key]
    d0, d1 = first["dist_unlearned"], last["dist_unlearned"]
    out["distance_to_original_before"], out["distance_to_original_after"] = d0, d1
    out["travelled_back"] = d0 - d1  # on the weights the unlearning changed
    out["travelled_back_fraction"] = (d0 - d1) / d0 if d0 > 0 else None
    out["distance_full_after"] = last["dist_full"]
    out["moved"] = last["moved_full"]
    return out


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
    from diffunlearn.config import config_hash
    from diffunlearn.data.tasks import cache_dir
    from diffunlearn.metrics.evaluate import Evaluation

    key = config_hash({"model": resolved.model_hash, "forget": sorted(forget), "eval": resolved.eval.model_dump(),
                       "alternatives": alternatives, "versions": resolved.versions})
    folder = cache_dir() / "evaluations" / key
    if (folder / "metrics.json").exists() and (folder / "images.npy").exists():
        try:
            return Evaluation.load(folder)
        except (OSError, ValueError, KeyError):
            pass  # a corrupt cache entry is recomputed
    result = _evaluate(model, evaluators, forget, resolved, alternatives, None, progress)
    result.save(folder)
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
