"""An evaluation of any model folder or run directory on forget concepts."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from diffunlearn.runs.common import (
    busy_message,
    check_creatable,
    claimed_dir,
    is_scaffolding,
    load_judging,
    load_model,
    lock_holder,
    set_threads,
    write_json,
)
from diffunlearn.runs.resolve import RunDirError, check_threads

RESULT = "evaluation.json"


def evaluate(model: str | Path | None = None, forget: list[str] | None = None, out: str | Path | None = None,
             overrides: list[str] | None = None, threads: int | None = None, progress: bool = True,
             allow_pickle: bool = False) -> dict[str, Any]:
    """Evaluate a model (a model folder or a complete run directory) on the forget concepts;
    with `out`, write `evaluation.json` there (the folder is locked while it is evaluated)."""
    from diffunlearn.backends.model_dir import check_model_dir
    from diffunlearn.config import ConfigError, EvalConfig, apply_overrides, build, shown
    from diffunlearn.data.tasks import validate_concepts
    from diffunlearn.runs.resolve import check_eval_prompts, check_evaluators, model_folder, run_concept_set

    check_threads(threads)
    other = [o for o in overrides or [] if not o.startswith("eval.")]
    if other:
        raise ConfigError(f"evaluate takes only eval.* overrides (e.g. eval.images_per_prompt=4), got "
                          f"'{shown(other[0])}'")
    model_dir = model_folder(model)
    meta = check_model_dir(model_dir, allow_pickle)
    forget = list(forget or meta.get("forget") or [])
    validate_concepts(forget, None)
    eval_cfg = build(EvalConfig, apply_overrides({}, [o.removeprefix("eval.") for o in overrides or []]), "eval.")
    if not eval_cfg.enabled:
        raise ConfigError("eval.enabled=false leaves nothing to evaluate")
    concept_set = run_concept_set()
    check_evaluators(eval_cfg, concept_set)
    check_eval_prompts(eval_cfg, forget)
    out = Path(out) if out else None
    if out is not None:
        inspect_evaluation_dir(out)

    set_threads(threads)
    loaded = load_model(model_dir, allow_pickle)
    from diffunlearn.metrics.evaluate import evaluate_model

    judging = load_judging(eval_cfg, concept_set)
    with claimed_dir(out) if out is not None else contextlib.nullcontext():
        result = evaluate_model(loaded, judging.evaluator, forget, eval_cfg, concept_set=concept_set,
                                fid_feature=judging.fid_feature, progress=progress)
        metrics = {"model": str(model_dir), "model_hash": loaded.content_hash(), "forget": forget,
                   "eval": eval_cfg.model_dump(), **result.metrics}
        if out is not None:
            write_json(out / RESULT, metrics)
    return metrics


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
        raise RunDirError(busy_message(out, holder))
    if any(p.name != RESULT and not is_scaffolding(p.name) for p in out.iterdir()):
        raise RunDirError(f"output directory {shown(str(out), 120)} is not empty; choose another --out")
