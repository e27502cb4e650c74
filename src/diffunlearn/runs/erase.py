"""An erase run, top to bottom: resolve, start or skip, load the model and the task, evaluate
the original (cached), run the method on the shared loop (or its closed form), save the
changed weights, evaluate again, write the run directory."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffunlearn.engine import distributed
from diffunlearn.runs.common import (
    Run,
    accelerator_peak,
    check_device,
    load_judging,
    load_model,
    log,
    loop_config,
    make_task,
    peak_rss_mb,
    remove_checkpoint,
    run_or_skip,
    save_samples,
    write_config,
    write_json,
    write_run_marker,
)
from diffunlearn.runs.resolve import ResolvedRun, check_threads, eval_identity, resolve_erase, task_flags


def erase(method: str | None, forget: list[str] | None = None, retain: list[str] | None = None,
          model: str | Path | None = None, config: str | Path | None = None, out: str | Path | None = None,
          overrides: list[str] | None = None, threads: int | None = None, progress: bool = True,
          notify: Callable[[str], None] | None = None, concepts: str | None = None, anchor: str | None = None,
          domain: str | None = None, device: str | None = None) -> Run:
    """Erase `forget` from `model` (default: the shipped testbed) with `method`, evaluate before
    and after, and write the run directory. Finished runs are skipped; interrupted ones resume.
    `notify` receives one line saying which of the three happens. Raises TrainingDiverged (and
    marks the run `diverged`) if training produces NaN or infinite values. `concepts` (a concept-set
    file or built-in name), `anchor` and `domain` set `task.concepts`, `task.anchor`, `task.domain`.
    `device`: cpu, cuda, cuda:N, mps (default: CUDA when present, else CPU; not part of the run id).
    Started N times by `accelerate launch --num_processes N` (or torchrun), the processes train
    data-parallel, each on 1/N of every batch; process 0 evaluates and writes."""
    check_threads(threads)
    check_device(device)
    resolved = resolve_erase(method, forget, retain, model, config, overrides,
                             task_flags(concepts=concepts, anchor=anchor, domain=domain))
    distributed.init()
    label = f"run {resolved.run_id} ({resolved.method}, profile {resolved.profile})"
    return run_or_skip(resolved, out, "erase", label, notify, threads,
                       lambda: _load_erase(resolved, progress, device),
                       lambda out_dir, loaded: _execute_erase(resolved, loaded, out_dir, progress),
                       worker=lambda out_dir, loaded: _train_as_worker(resolved, loaded, out_dir))


@dataclass
class _Loaded:
    """What an erase run needs, loaded before its directory is created (a model folder that
    fails only at load, or a task that cannot be built, fails without writing anything)."""

    model: Any
    task: Any
    method: Any
    steps: int
    judging: Any


def load_erase(method: str, forget: list[str], retain: list[str] | None = None, model: str | Path | None = None,
               config: str | Path | None = None, overrides: list[str] | None = None) -> _Loaded:
    """The model, task, method (and its step count) that `erase` with these arguments would
    train, loaded exactly as the run loads them but without a run directory: for benchmarks
    and notebooks that drive a method's steps themselves (set the group trainable and call
    `method.setup()` first, as the run does)."""
    return _load_erase(resolve_erase(method, forget, retain, model, config, overrides), progress=False)


def _load_erase(resolved: ResolvedRun, progress: bool, device: str | None = None) -> _Loaded:
    import torch

    from diffunlearn.methods import methods

    torch.manual_seed(resolved.seed)
    model = load_model(resolved.model_dir, resolved.allow_pickle, device)
    model.set_precision(bf16=resolved.method_config.bf16, fp16=resolved.method_config.fp16)
    model.gradient_checkpointing = resolved.method_config.gradient_checkpointing
    task = make_task(resolved, model, progress)
    method = methods.get(resolved.method)(resolved.method_config, model, task)
    steps = method.resolved_steps()
    judging = load_judging(resolved.eval, resolved.concept_set) if resolved.eval.enabled else None
    return _Loaded(model, task, method, steps, judging)


def _execute_erase(resolved: ResolvedRun, loaded: _Loaded, out: Path, progress: bool) -> Run:
    import torch

    from diffunlearn.engine.loop import check_finite_weights, run_loop, write_curves
    from diffunlearn.metrics.diagnostics import DistanceTracker, weight_distance
    from diffunlearn.metrics.paired import paired_metrics

    model, task, method, steps, judging = loaded.model, loaded.task, loaded.method, loaded.steps, loaded.judging
    t = resolved.task
    config = resolved.as_dict() | {"run_id": resolved.run_id, "versions": resolved.versions,
                                   "resolved": {"steps": steps, "param_group": method.param_group(),
                                                "anchor_map": task.anchor_map, "threads": torch.get_num_threads()}}
    write_config(out, config)
    log.info("erase %s: forget %s, %d steps on %s (run %s)", resolved.method, t.forget, steps,
             method.param_group(), resolved.run_id)

    alternatives = task.anchor_map if method.uses_anchor else None
    before = _evaluate_cached(model, judging, task, resolved, alternatives, progress)

    task.prefetch()  # every training image, before training changes the model that may generate them
    distributed.barrier()  # data-parallel: the other processes read them from the cache (_train_as_worker)

    params = model.set_trainable(method.param_group())
    method.setup()
    c = resolved.method_config
    # diagnostics every log_every steps: each group's distance from the original weights
    loop_cfg = loop_config(c, steps, resolved.seed, progress, f"erase ({resolved.method})", hook_every=c.log_every)
    start = {n: p.detach() for n, p in model.unet.named_parameters()}
    tracker = DistanceTracker(start, start, list(params))
    rss_before = peak_rss_mb()
    model.counters = dict.fromkeys(model.counters, 0)  # count the unlearning only, not the evaluation
    if method.closed_form:
        result = _closed_form(method)
        check_finite_weights(dict(model.unet.named_parameters()), 0, None)
    else:
        result = run_loop(params, method.step, loop_cfg, checkpoint_dir=out / "checkpoint",
                          hooks=[lambda step: tracker(dict(model.unet.named_parameters()))],
                          extra_state=method.extra_state, load_extra_state=method.load_extra_state,
                          loss_scaler=model.loss_scaler)
    _deliver_final_weights(method, params)
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
    if judging is not None:
        after = _evaluate(model, judging, task, resolved, alternatives, before, progress)
        metrics["before"], metrics["after"] = before.metrics, after.metrics
        metrics["paired"] = paired_metrics(before, after, judging.fid_feature)
        save_samples(out / "samples.png", before, after)
        if after.metrics.get("not_computed"):
            log.info("%s", after.metrics["not_computed"])
    write_json(out / "metrics.json", metrics)
    write_run_marker(out, resolved.run_id, "erase", "complete")
    remove_checkpoint(out)
    log.info("done: %s", json.dumps({k: metrics.get("after", {}).get(k) for k in ("UA", "IRA", "CRA", "SFID")}))
    return Run(out, resolved.run_id, config, metrics)


def _train_as_worker(resolved: ResolvedRun, loaded: _Loaded, out: Path) -> Run:
    """A data-parallel process other than 0: the same training on its share of every batch (the
    loop averages gradients over processes), resuming from process 0's checkpoint; it writes nothing."""
    from diffunlearn.engine.loop import run_loop

    method, model = loaded.method, loaded.model
    distributed.barrier()  # process 0 has evaluated the original model and cached the training images
    loaded.task.prefetch()
    params = model.set_trainable(method.param_group())
    method.setup()
    if not method.closed_form:
        loop_cfg = loop_config(resolved.method_config, loaded.steps, resolved.seed, False, "erase")
        run_loop(params, method.step, loop_cfg, checkpoint_dir=out / "checkpoint",
                 extra_state=method.extra_state, load_extra_state=method.load_extra_state,
                 loss_scaler=model.loss_scaler)
    return Run(out, resolved.run_id, {}, {})


def _deliver_final_weights(method, params) -> None:
    """Replace the trained weights with the ones the method delivers (SDD: its EMA), if any."""
    final = method.final_weights()
    if final:
        import torch

        with torch.no_grad():
            for name, value in final.items():
                params[name].copy_(value)


def _closed_form(method):
    from diffunlearn.engine.loop import LoopResult

    start = time.perf_counter()
    logs = method.apply_closed_form()
    return LoopResult(steps=0, curves=[{"step": 0, **logs}], hook_rows=[], seconds=time.perf_counter() - start)


def _evaluate(model, judging, task, resolved: ResolvedRun, alternatives, before, progress: bool):
    from diffunlearn.metrics.evaluate import evaluate_model

    reference_fid = before.metrics.get("FID") if before is not None else None
    return evaluate_model(model, judging.evaluator, task.forget, resolved.eval, concept_set=judging.concept_set,
                          alternatives=alternatives, reference_fid=reference_fid, reference=task.source,
                          fid_feature=judging.fid_feature, progress=progress, data_seed=task.seed)


def _evaluate_cached(model, judging, task, resolved: ResolvedRun, alternatives, progress: bool):
    """The original model's evaluation, cached per (model, forget set, eval config, evaluator,
    concept set, alternatives): every erase run of the same model and concepts starts from the
    same 'before'."""
    if judging is None:
        return None
    from diffunlearn.config import config_hash
    from diffunlearn.data.tasks import cache_dir
    from diffunlearn.metrics.evaluate import Evaluation

    key = config_hash({"model": resolved.model_hash, "forget": sorted(task.forget), "data_seed": task.seed,
                       "eval": eval_identity(resolved.eval),
                       "evaluator": judging.spec, "concepts": judging.concept_set.fingerprint(),
                       "alternatives": alternatives, "versions": resolved.versions})
    folder = cache_dir() / "evaluations" / key
    if (folder / "metrics.json").exists() and (folder / "images.npy").exists():
        try:
            return Evaluation.load(folder)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a corrupt cache entry is recomputed
    result = _evaluate(model, judging, task, resolved, alternatives, None, progress)
    result.save(folder)
    return result
