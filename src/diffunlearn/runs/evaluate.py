"""An evaluation of any model folder or run directory on forget concepts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffunlearn.runs.common import load_judging, write_json


def evaluate(model: str | Path | None = None, forget: list[str] | None = None, out: str | Path | None = None,
             overrides: list[str] | None = None, threads: int | None = None, progress: bool = True,
             concepts: str | None = None, domain: str | None = None) -> dict[str, Any]:
    """Evaluate a model (a model folder or an erase run's model/) on the forget concepts of a
    concept set (`concepts`: a file or built-in name; default as for `erase`)."""
    from diffunlearn.backends.model_dir import check_model_dir
    from diffunlearn.config import ConfigError, EvalConfig, TaskConfig, apply_overrides, build
    from diffunlearn.runs.resolve import (
        check_eval_prompts,
        check_evaluators,
        model_folder,
        resolve_task_concepts,
        task_flags,
    )

    model_dir = model_folder(model)

    meta = check_model_dir(model_dir)
    forget = list(forget or meta.get("forget") or [])
    sections = apply_overrides({}, overrides or [])
    unknown = sorted(set(sections) - {"eval", "task"})
    if unknown:
        raise ConfigError(f"unknown config key '{unknown[0]}'; evaluate takes eval.* and task.* overrides")
    task_data = {**(sections.get("task") or {}), **task_flags(concepts=concepts, domain=domain), "forget": forget}
    task_cfg = build(TaskConfig, task_data, "task.")
    concept_set = resolve_task_concepts(task_cfg, model_dir, meta)
    eval_cfg = build(EvalConfig, sections.get("eval") or {}, "eval.")
    check_evaluators(eval_cfg, concept_set)
    check_eval_prompts(eval_cfg, forget)
    if out:
        prepare_out = Path(out)
        if prepare_out.exists() and any(prepare_out.iterdir()) and not (prepare_out / "evaluation.json").exists():
            from diffunlearn.runs.resolve import RunDirError

            raise RunDirError(f"output directory {prepare_out} is not empty; choose another --out")

    import torch

    from diffunlearn.backends.diffusers_t2i import T2IModel
    from diffunlearn.metrics.evaluate import evaluate_model

    if threads:
        torch.set_num_threads(threads)
    loaded = T2IModel.from_pretrained(model_dir)
    judging = load_judging(eval_cfg, concept_set)
    reference = _reference_source(concept_set, task_cfg.seed, loaded, model_dir, meta, progress)
    result = evaluate_model(loaded, judging.evaluator, forget, eval_cfg, concept_set=concept_set,
                            fid_feature=judging.fid_feature, reference=reference, data_seed=task_cfg.seed,
                            progress=progress)
    metrics = {"model": str(model_dir), "model_hash": loaded.content_hash(), "forget": forget,
               "concept_set": concept_set.describe(),
               "eval": eval_cfg.model_dump(), **result.metrics}
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "evaluation.json", metrics)
    return metrics


def _reference_source(concept_set, seed: int, loaded, model_dir: Path, meta: dict, progress: bool):
    """FID/KID's held-out images: the concept set's source; a generated source samples the model
    before unlearning (the run's base), as in the run that made it."""
    from diffunlearn.data.images import image_source
    from diffunlearn.data.tasks import cache_dir
    from diffunlearn.runs.resolve import original_of

    if concept_set.images.source != "generated":
        return image_source(concept_set, seed)
    original_dir = original_of(model_dir, meta)
    if original_dir.resolve() == model_dir.resolve():
        original = loaded
    else:
        from diffunlearn.backends.diffusers_t2i import T2IModel

        original = T2IModel.from_pretrained(original_dir)
    return image_source(concept_set, seed, original, cache_dir(), progress)
