"""An evaluation of any model folder or run directory on forget concepts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffunlearn.runs.common import load_judging, write_json


def evaluate(model: str | Path | None = None, forget: list[str] | None = None, out: str | Path | None = None,
             overrides: list[str] | None = None, threads: int | None = None, progress: bool = True,
             ) -> dict[str, Any]:
    """Evaluate a model (a model folder or an erase run's model/) on the forget concepts."""
    from diffunlearn.backends.model_dir import check_model_dir
    from diffunlearn.config import EvalConfig, apply_overrides, build
    from diffunlearn.data.tasks import validate_concepts
    from diffunlearn.runs.resolve import check_eval_prompts, check_evaluators, model_folder, run_concept_set

    model_dir = model_folder(model)

    meta = check_model_dir(model_dir)
    forget = list(forget or meta.get("forget") or [])
    validate_concepts(forget, None)
    eval_cfg = build(EvalConfig, apply_overrides({}, [o.removeprefix("eval.") for o in overrides or []]), "eval.")
    concept_set = run_concept_set()
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
    result = evaluate_model(loaded, judging.evaluator, forget, eval_cfg, concept_set=concept_set,
                            fid_feature=judging.fid_feature, progress=progress)
    metrics = {"model": str(model_dir), "model_hash": loaded.content_hash(), "forget": forget,
               "eval": eval_cfg.model_dump(), **result.metrics}
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "evaluation.json", metrics)
    return metrics
