"""An attack run, top to bottom: resolve, start or skip, load the attacked and the original
model, build the attack data by its paper's protocol, fine-tune on the shared loop while a
hook evaluates the model and its distance to the original, save, summarise."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffunlearn.metrics import DISTANCE_GROUPS
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
from diffunlearn.runs.erase import erase
from diffunlearn.runs.resolve import check_threads, task_flags


def attack(name: str | None, model: str | Path | None = None, forget: list[str] | None = None,
           config: str | Path | None = None, out: str | Path | None = None, overrides: list[str] | None = None,
           threads: int | None = None, progress: bool = True, original: str | Path | None = None,
           notify: Callable[[str], None] | None = None, concepts: str | None = None, anchor: str | None = None,
           domain: str | None = None, device: str | None = None) -> Run:
    """Attack a model (an erase run's directory, the original model or a retrain, the latter two
    with `forget`) with `name` (`relearn` or `resurgence`): build the attack data, fine-tune,
    evaluate every `attack.eval_every` steps, and write the attack's run directory (default:
    inside the attacked run, `attacks/<name>-<id>`). Finished runs are skipped; interrupted
    ones resume. Raises TrainingDiverged (and marks the run `diverged`) on NaN or infinite values.
    `concepts`, `anchor`, `domain`: as for `erase` (default: the attacked run's); `device` too."""
    from diffunlearn.runs.resolve import resolve_attack

    check_threads(threads)
    check_device(device)
    resolved = resolve_attack(name, model, forget, config, overrides, original,
                              task_flags(concepts=concepts, anchor=anchor, domain=domain))
    label = f"attack {resolved.run_id} ({resolved.attack} on {resolved.model_dir})"
    return run_or_skip(resolved, out, "attack", label, notify, threads,
                       lambda: _load_attack(resolved, progress, device),
                       lambda out_dir, loaded: _execute_attack(resolved, loaded, out_dir, progress))


def erase_then_attack(method: str, attack_name: str, forget: list[str], model: str | Path | None = None,
                      overrides: list[str] | None = None, threads: int | None = None, progress: bool = True,
                      notify: Callable[[str], None] | None = None, concepts: str | None = None,
                      anchor: str | None = None, domain: str | None = None,
                      device: str | None = None) -> tuple[Run, Run]:
    """The chain erase -> attack -> evaluate: `method.*` / `task.*` overrides go to the erase run,
    `attack.*` to the attack, `eval.*` and `model.allow_pickle` to both; each run lands in its
    default directory."""
    check_threads(threads)
    overrides = overrides or []
    erase_overrides = [o for o in overrides if not o.startswith("attack.")]
    attack_overrides = [o for o in overrides if o.startswith(("attack.", "eval.", "model.allow_pickle="))]
    erased = erase(method, forget, model=model, overrides=erase_overrides, threads=threads, progress=progress,
                   notify=notify, concepts=concepts, anchor=anchor, domain=domain, device=device)
    attacked = attack(attack_name, erased.out, overrides=attack_overrides, threads=threads, progress=progress,
                      notify=notify, device=device)
    return erased, attacked


def _load_attack(resolved, progress: bool, device: str | None = None) -> dict[str, Any]:
    """The attacked and the original model, the task, the attack and the evaluator, loaded
    before the run directory is created (see runs/common.py)."""
    import torch

    from diffunlearn.attacks import attacks

    torch.manual_seed(resolved.seed)
    model = load_model(resolved.model_dir, resolved.allow_pickle, device)
    c = resolved.attack_config
    model.set_precision(bf16=c.bf16, fp16=c.fp16)
    model.gradient_checkpointing = c.gradient_checkpointing
    same = resolved.original_dir.resolve() == resolved.model_dir.resolve()
    original = model if same else load_model(resolved.original_dir, resolved.allow_pickle, device)
    task = make_task(resolved, original, progress)
    attack_obj = attacks.get(resolved.attack)(c, model, task, original=original)
    judging = load_judging(resolved.eval, resolved.concept_set) if resolved.eval.enabled else None
    return {"model": model, "original": original, "same": same, "task": task, "attack": attack_obj,
            "judging": judging}


def _execute_attack(resolved, loaded: dict[str, Any], out: Path, progress: bool) -> Run:
    import torch

    from diffunlearn.engine.loop import run_loop, write_curves
    from diffunlearn.metrics.diagnostics import DistanceTracker

    model, original, same, task = loaded["model"], loaded["original"], loaded["same"], loaded["task"]
    attack_obj, judging = loaded["attack"], loaded["judging"]
    c, t = resolved.attack_config, resolved.task
    data = attack_obj.prepare()
    shown = sorted(data.concepts() & set(task.forget))
    if shown:
        raise RuntimeError(f"attack data shows erased concepts {shown}: the protocol is broken")
    data.info["text_reach"] = caption_reach(model, task, data.prompts)
    config = resolved.as_dict() | {"run_id": resolved.run_id, "versions": resolved.versions,
                                   "resolved": {"threads": torch.get_num_threads(), "data": data.info}}
    write_config(out, config)
    write_json(out / "data.json", {**data.info, "prompts": sorted(set(data.prompts))})
    log.info("attack %s on %s: forget %s, %d images, %d steps (run %s)", resolved.attack, resolved.model_dir,
             t.forget, len(data), c.steps, resolved.run_id)

    original_weights = original.effective_weights()
    tracker = DistanceTracker(original_weights, model.effective_weights(), attack_obj.trained_weight_names())
    del original_weights
    if not same:
        del original, attack_obj.original
        attack_obj.original = model
    watcher = _AttackWatcher(model, judging, task, resolved, tracker, out)
    params = attack_obj.trainable()
    loop_cfg = loop_config(c, c.steps, resolved.seed, progress, f"attack ({resolved.attack})",
                            hook_every=c.eval_every or c.steps)
    model.counters = dict.fromkeys(model.counters, 0)
    result = run_loop(params, attack_obj.step, loop_cfg, checkpoint_dir=out / "checkpoint",
                      hooks=[watcher], loss_scaler=model.loss_scaler)
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
                       "resumed_from_step": result.resumed_from, "peak_rss_mb": peak_rss_mb(),
                       **dict(model.counters), **accelerator_peak()}
    metrics["curve"] = result.hook_rows
    metrics["summary"] = attack_summary(result.hook_rows) | {"text_reach": data.info["text_reach"]}
    before, after = watcher.full("before"), watcher.full("after")
    if before is not None and after is not None:
        metrics["before"], metrics["after"] = before.metrics, after.metrics
        save_samples(out / "samples.png", before, after)
    write_json(out / "metrics.json", metrics)
    write_run_marker(out, resolved.run_id, "attack", "complete")
    remove_checkpoint(out)
    log.info("done: %s", json.dumps(metrics["summary"]))
    return Run(out, resolved.run_id, config, metrics)


class _AttackWatcher:
    """The attack's loop hook: evaluates the model (AR top-1/top-3, AR_CL, retain accuracy, FID)
    and the weights' distance to the original at step 0, every `eval_every` steps and at the
    end. The full evaluations before and after are kept on disk, so a resumed run has them."""

    def __init__(self, model, judging, task, resolved, tracker, out: Path):
        self.model, self.judging, self.task, self.resolved = model, judging, task, resolved
        self.tracker, self.out = tracker, out
        self.steps = resolved.attack_config.steps
        self.reference_fid: float | None = None

    def __call__(self, step: int) -> dict[str, float]:
        row = dict(self.tracker(self.model.effective_weights()))
        if self.judging is None:
            return row
        if self.judging.evaluator is None and step not in (0, self.steps):
            return row  # without an evaluator only the samples before and after are worth generating
        from diffunlearn.metrics.evaluate import evaluate_model

        result = evaluate_model(self.model, self.judging.evaluator, self.task.forget, self.resolved.eval,
                                concept_set=self.judging.concept_set, alternatives=self.resolved.alternatives,
                                reference_fid=self._reference_fid(), reference=self.task.source,
                                fid_feature=self.judging.fid_feature, progress=False, data_seed=self.task.seed)
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
        row["forget_images"] = m["counts"]["forget-full"]  # AR's denominator: its resolution is 100 / n
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


def caption_reach(model, task, prompts: list[str]) -> float:
    """metrics.diagnostics.text_reach of the attack's captions on the erased concepts: how much of
    their text conditioning the fine-tuning can move through the cross-attention projections."""
    import torch

    from diffunlearn.attacks.base import concept_embedding
    from diffunlearn.metrics.diagnostics import text_reach

    captions = sorted(set(prompts))
    with torch.no_grad():
        states = torch.cat([model.encode(captions[i : i + 64]) for i in range(0, len(captions), 64)])
        vectors = torch.stack([concept_embedding(model, task.concept_set, c) for c in task.forget])
    return text_reach(states, vectors)


def attack_summary(rows: list[dict[str, float]]) -> dict[str, Any]:
    """The attack's headline figures from its curve ([002] §VI, [000] §3): AR before the attack
    (AR_MU), the largest AR during it (AR_DiMRA, top-1 and top-3) and the step it was reached,
    the smallest AR_CL, retain accuracy and FID before and after, and the distance to the
    original weights before and after with the share of it travelled back; per parameter group
    (xattn, noxattn, full, unlearned) the distance before and after and the direction of travel
    (`toward_*`: the cosine of the attack's whole move with the way back to the original)."""
    if not rows:
        return {}
    first, last = rows[0], rows[-1]
    during = [r for r in rows if r["step"] > 0] or rows
    out: dict[str, Any] = {"evaluations": len(rows), "steps": last["step"]}
    if first.get("forget_images"):  # one generation more or less moves AR by this many points
        out["forget_images"] = first["forget_images"]
        out["AR_resolution"] = 100.0 / first["forget_images"]
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
    for g in DISTANCE_GROUPS:  # per parameter group: where the attack went, and which way ([002] §IV)
        if f"dist_{g}" in first:
            out[f"dist_{g}_before"], out[f"dist_{g}_after"] = first[f"dist_{g}"], last[f"dist_{g}"]
        if f"toward_{g}" in last:
            out[f"toward_{g}"] = last[f"toward_{g}"]
    return out
