"""An evaluation of any model folder or run directory on forget concepts."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from diffunlearn.runs.common import (
    busy_message,
    check_creatable,
    check_device,
    claimed_dir,
    is_scaffolding,
    load_judging,
    load_model,
    lock_holder,
    set_threads,
    write_json,
)
from diffunlearn.runs.resolve import RunDirBusy, RunDirError, check_threads

RESULT = "evaluation.json"


def evaluate(model: str | Path | None = None, forget: list[str] | None = None, out: str | Path | None = None,
             overrides: list[str] | None = None, threads: int | None = None, progress: bool = True,
             allow_pickle: bool = False, concepts: str | None = None, domain: str | None = None,
             device: str | None = None) -> dict[str, Any]:
    """Evaluate a model (a model folder or a complete run directory) on the forget concepts of a
    concept set (`concepts`: a file or built-in name; default as for `erase`); with `out`, write
    `evaluation.json` there (the folder is locked while it is evaluated)."""
    from diffunlearn.backends.model_dir import check_model_dir
    from diffunlearn.config import ConfigError, EvalConfig, TaskConfig, apply_overrides, build, shown
    from diffunlearn.runs.resolve import (
        check_eval_prompts,
        check_evaluators,
        model_folder,
        resolve_task_concepts,
        task_flags,
    )

    check_threads(threads)
    check_device(device)
    other = [o for o in overrides or [] if not o.startswith("eval.")]
    if other:
        raise ConfigError(f"evaluate takes only eval.* overrides (e.g. eval.images_per_prompt=4; the concept "
                          f"set through --concepts/--domain), got '{shown(other[0])}'")
    model_dir = model_folder(model)
    meta = check_model_dir(model_dir, allow_pickle)
    forget = list(forget or meta.get("forget") or [])
    task_cfg = build(TaskConfig, {**task_flags(concepts=concepts, domain=domain), "forget": forget}, "task.")
    concept_set = resolve_task_concepts(task_cfg, model_dir, meta)
    eval_cfg = build(EvalConfig, apply_overrides({}, [o.removeprefix("eval.") for o in overrides or []]), "eval.")
    if not eval_cfg.enabled:
        raise ConfigError("eval.enabled=false leaves nothing to evaluate")
    check_evaluators(eval_cfg, concept_set)
    check_eval_prompts(eval_cfg, forget)
    out = Path(out) if out else None
    if out is not None:
        inspect_evaluation_dir(out)

    set_threads(threads)
    loaded = load_model(model_dir, allow_pickle, device)
    from diffunlearn.metrics.evaluate import evaluate_model

    judging = load_judging(eval_cfg, concept_set)
    reference = _reference_source(concept_set, task_cfg.seed, loaded, model_dir, meta, allow_pickle, progress)
    with claimed_dir(out) if out is not None else contextlib.nullcontext():
        result = evaluate_model(loaded, judging.evaluator, forget, eval_cfg, concept_set=concept_set,
                                fid_feature=judging.fid_feature, reference=reference, data_seed=task_cfg.seed,
                                progress=progress)
        metrics = {"model": str(model_dir), "model_hash": loaded.content_hash(), "forget": forget,
                   "concept_set": concept_set.describe(), "eval": eval_cfg.model_dump(), **result.metrics}
        if out is not None:
            write_json(out / RESULT, metrics)
    return metrics


def _reference_source(concept_set, seed: int, loaded, model_dir: Path, meta: dict, allow_pickle: bool,
                      progress: bool):
    """FID/KID's held-out images: the concept set's source; a generated source samples the model
    before unlearning (the run's base), as in the run that made it."""
    from diffunlearn.data.images import image_source
    from diffunlearn.data.tasks import cache_dir
    from diffunlearn.runs.resolve import original_of

    if concept_set.images.source != "generated":
        return image_source(concept_set, seed)
    original_dir = original_of(model_dir, meta)
    original = (loaded if original_dir.resolve() == model_dir.resolve()
                else load_model(original_dir, allow_pickle, str(loaded.device)))
    return image_source(concept_set, seed, original, cache_dir(), progress)


def inspect_evaluation_dir(out: Path) -> None:
    """An evaluation folder is new, empty, or holds an earlier evaluation.json (overwritten)."""
    from diffunlearn.config import shown

    if not out.exists():
        check_creatable(out)
        return
    if not out.is_dir():
        raise RunDirError(f"output path {shown(str(out), 120)} exists and is not a directory; choose another --out")
    holder = lock_holder(out)
    if holder is not None:
        raise RunDirBusy(busy_message(out, holder))
    if any(p.name != RESULT and not is_scaffolding(p.name) for p in out.iterdir()):
        raise RunDirError(f"output directory {shown(str(out), 120)} is not empty; choose another --out")
