"""An erase run, top to bottom: resolve, start or skip, load the model and the task, evaluate
the original (cached), run the method on the shared loop (or its closed form), save the
changed weights, evaluate again, write the run directory."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffunlearn.runs.common import (
    Run,
    accelerator_peak,
    attach_log,
    detach_log,
    load_evaluators,
    log,
    loop_config,
    peak_rss_mb,
    remove_checkpoint,
    run_or_skip,
    save_samples,
    write_json,
)
from diffunlearn.runs.resolve import ResolvedRun, resolve_erase, write_config, write_run_marker


def erase(method: str | None, forget: list[str] | None = None, retain: list[str] | None = None,
          model: str | Path | None = None, config: str | Path | None = None, out: str | Path | None = None,
          overrides: list[str] | None = None, threads: int | None = None, progress: bool = True,
          notify: Callable[[str], None] | None = None) -> Run:
    """Erase `forget` from `model` (default: the shipped testbed) with `method`, evaluate before
    and after, and write the run directory. Finished runs are skipped; interrupted ones resume.
    `notify` receives one line saying which of the three happens."""
    resolved = resolve_erase(method, forget, retain, model, config, overrides)
    label = f"run {resolved.run_id} ({resolved.method}, profile {resolved.profile})"
    return run_or_skip(resolved, out, "erase", label, notify, lambda out_dir: _execute_erase(
        resolved, out_dir, threads, progress))


def _execute_erase(resolved: ResolvedRun, out: Path, threads: int | None, progress: bool) -> Run:
    import torch

    from diffunlearn.backends.diffusers_t2i import T2IModel
    from diffunlearn.data.tasks import UnlearningTask
    from diffunlearn.engine.loop import run_loop, write_curves
    from diffunlearn.methods import methods
    from diffunlearn.metrics.diagnostics import DistanceTracker, weight_distance
    from diffunlearn.metrics.paired import paired_metrics

    out.mkdir(parents=True, exist_ok=True)
    handler = attach_log(out / "log.txt")
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
        loop_cfg = loop_config(c, steps, resolved.seed, progress, f"erase ({resolved.method})",
                                hook_every=c.log_every)
        start = {n: p.detach() for n, p in model.unet.named_parameters()}
        tracker = DistanceTracker(start, start, list(params))
        rss_before = peak_rss_mb()
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
                           "resumed_from_step": result.resumed_from, "peak_rss_mb": peak_rss_mb(),
                           "peak_rss_mb_before_training": rss_before, **dict(model.counters),
                           **accelerator_peak(), **method.cost()}
        metrics["diagnostics"] = {"weight_distance": weight_distance(model.teacher_params(), params),
                                  "final_loss": result.curves[-1] if result.curves else None,
                                  "distance_by_group": result.hook_rows[-1] if result.hook_rows else None}
        if evaluators is not None:
            after = _evaluate(model, evaluators, task.forget, resolved, alternatives, before, progress)
            metrics["before"], metrics["after"] = before.metrics, after.metrics
            metrics["paired"] = paired_metrics(before, after, evaluators)
            save_samples(out / "samples.png", before, after)
        write_json(out / "metrics.json", metrics)
        write_run_marker(out, resolved.run_id, "erase", "complete")
        remove_checkpoint(out)
        log.info("done: %s", json.dumps({k: metrics.get("after", {}).get(k) for k in ("UA", "IRA", "CRA", "SFID")}))
        return Run(out, resolved.run_id, config, metrics)
    finally:
        detach_log(handler)


def _closed_form(method):
    from diffunlearn.engine.loop import LoopResult

    start = time.perf_counter()
    logs = method.apply_closed_form()
    return LoopResult(steps=0, curves=[{"step": 0, **logs}], hook_rows=[], seconds=time.perf_counter() - start)


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
