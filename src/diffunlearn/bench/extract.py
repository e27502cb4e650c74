"""What a finished run directory contributes to the results store: its scalar metrics and its
curves, under stable names (torch-free; reads metrics.json / evaluation.json and the CSVs).

Erase runs: the evaluation after unlearning under its own names (UA, IRA, CRA, SFID, Total,
FID, AR_MU_top1, p_forget, entropy, ...), the evaluation before as `before.<name>`, AdvAnchor's
paired figures (erase_FID, preserve_FID, erase_ACC, preserve_ACC), the cost (train_seconds,
peak_rss_mb, steps) and the weight distance. Attack runs: the summary of the attack curve
under its own names (AR_MU_top1, AR_DiMRA_top1, AR_CL_min, retain_acc_after,
travelled_back_fraction, ...), the final evaluation as `after.<name>` and the cost.
The original model (the `original` control): its evaluation, with SFID = 100 (its FID is its
own reference) and Total = UA + IRA + CRA + 100.

Curves: `loss` (curves.csv: each loss term per step), `distance` (diagnostics.csv: distance of
each parameter group from the original weights during unlearning) and `attack`
(attack_curve.csv: AR, retain accuracy, FID and distances every eval_every attack steps).
NaN and infinities are dropped, never stored.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from diffunlearn.config import ConfigError
from diffunlearn.metrics import DISTANCE_GROUPS

EVALUATION_KEYS = ("UA", "UA_partial", "IRA", "CRA", "SFID", "Total", "FID", "KID", "precision", "recall",
                   "AR_MU_top1", "AR_MU_top3", "AR_CL", "p_forget", "entropy")
PAIRED_KEYS = ("erase_FID", "preserve_FID", "erase_ACC", "preserve_ACC")
COST_KEYS = ("train_seconds", "peak_rss_mb", "steps", "unet_forward", "unet_backward")
SUMMARY_KEYS = ("AR_MU_top1", "AR_MU_top3", "AR_DiMRA_top1", "AR_DiMRA_top3", "AR_DiMRA_top1_step",
                "AR_DiMRA_top3_step", "AR_final_top1", "AR_final_top3", "forget_acc_before", "forget_acc_after",
                "AR_CL_before", "AR_CL_min", "retain_acc_before", "retain_acc_after", "IRA_before", "IRA_after",
                "CRA_before", "CRA_after", "FID_before", "FID_after", "UA_before", "UA_after",
                "distance_to_original_before", "distance_to_original_after", "travelled_back",
                "travelled_back_fraction", "distance_full_after", "moved", "resurgence",
                "forget_images", "AR_resolution", "text_reach",
                *(f"{kind}_{g}{when}" for g in DISTANCE_GROUPS
                  for kind, when in (("dist", "_before"), ("dist", "_after"), ("toward", ""))))
DISTANCE_KEYS = ("weight_distance.l2", "weight_distance.relative")
TRACE_KEYS = ("cos_update_retain", "cos_update_forget", "lambda_t")  # per-step traces summarised by their mean
RUN_KEYS = ("seconds", "cpu_seconds")  # wall and CPU time of the whole run, measured by the worker


# attack-curve figures a claim or leaderboard can read at one step: `AR_MU_top1@400`
CURVE_POINT_KEYS = ("AR_MU_top1", "AR_MU_top3", "AR_CL", "UA", "IRA", "CRA", "FID", "retain_acc",
                    *(f"{kind}_{g}" for g in DISTANCE_GROUPS for kind in ("dist", "toward")))


def curve_point(name: str) -> tuple[str, int] | None:
    """'AR_MU_top1@400' -> ('AR_MU_top1', 400): an attack's curve figure at that step; None for
    any other name."""
    curve, at, step = name.partition("@")
    if not at or curve not in CURVE_POINT_KEYS or not step.isdigit():
        return None
    return curve, int(step)


def attack_only(name: str) -> bool:
    """A figure only attack runs have (AR_DiMRA, resurgence, a curve point, ...): a claim on it
    must select attack runs."""
    return curve_point(name) is not None or (name in SUMMARY_KEYS and name not in EVALUATION_KEYS)


def known_metrics() -> set[str]:
    names = {*EVALUATION_KEYS, *PAIRED_KEYS, *COST_KEYS, *SUMMARY_KEYS, *DISTANCE_KEYS, *RUN_KEYS}
    names |= {f"before.{k}" for k in EVALUATION_KEYS} | {f"after.{k}" for k in EVALUATION_KEYS}
    names |= {f"{k}_mean" for k in TRACE_KEYS}
    return names


def check_metric(name: str, where: str) -> str:
    if "@" in name:
        if curve_point(name) is None:
            raise ConfigError(f"{where}: unknown metric '{name}': a point of the attack curve is NAME@STEP, NAME one "
                              f"of {', '.join(CURVE_POINT_KEYS)}")
        return name
    names = known_metrics()
    if name not in names:
        import difflib

        close = difflib.get_close_matches(name, sorted(names), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{where}: unknown metric '{name}'{hint}")
    return name


def clean(value: Any) -> float | None:
    """A finite float, or None (bools, strings, NaN and infinities are not figures)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _take(source: dict[str, Any] | None, keys, prefix: str = "") -> dict[str, float]:
    out = {}
    for key in keys:
        value = clean((source or {}).get(key))
        if value is not None:
            out[prefix + key] = value
    return out


def generation_counts(evaluation: dict[str, Any] | None) -> dict[str, float]:
    """The forget generations behind an evaluation's AR (`forget_images`) and the points one of
    them moves it (`AR_resolution`), as attack summaries record them; and the retain images
    behind its IRA and CRA (`IRA_images`, `CRA_images`; evaluations since 2026-12-07 record them)."""
    evaluation = evaluation or {}
    counts = evaluation.get("counts") or {}
    images = clean(counts.get("forget-full"))
    out = {"forget_images": images, "AR_resolution": 100.0 / images} if images else {}
    for metric, judged in (counts.get("judged") or _canvas_judged(evaluation)).items():
        if clean(judged):
            out[f"{metric}_images"] = float(judged)
    return out


def _canvas_judged(evaluation: dict[str, Any]) -> dict[str, Any]:
    """The count an evaluation before `counts.judged` did not record, where it is known: the canvas
    evaluator classifies every canvas concept, so each of its figures judged every retain image."""
    if evaluation.get("evaluator") != "canvas":
        return {}
    retain = (evaluation.get("counts") or {}).get("retain")
    return {m: retain for m in ("IRA", "CRA") if evaluation.get(m) is not None}


def erase_metrics(out: Path) -> dict[str, float]:
    m = json.loads((out / "metrics.json").read_text())
    figures = _take(m.get("after"), EVALUATION_KEYS) | generation_counts(m.get("after"))
    figures |= _take(m.get("before"), EVALUATION_KEYS, "before.")
    figures |= _take(m.get("paired"), PAIRED_KEYS)
    figures |= _take(m.get("cost"), COST_KEYS)
    distance = (m.get("diagnostics") or {}).get("weight_distance") or {}
    figures |= _take(distance, ("l2", "relative"), "weight_distance.")
    traces: dict[str, list[float]] = {}
    for source, _, name, value in curves(out, "erase"):
        if source == "loss" and name in TRACE_KEYS:
            traces.setdefault(name, []).append(value)
    figures |= {f"{name}_mean": sum(values) / len(values) for name, values in traces.items()}
    return figures


def attack_metrics(out: Path) -> dict[str, float]:
    m = json.loads((out / "metrics.json").read_text())
    figures = _take(m.get("summary"), SUMMARY_KEYS)
    if "forget_acc_after" in figures and "forget_acc_before" in figures:  # [000]'s degree of resurgence
        figures["resurgence"] = figures["forget_acc_after"] - figures["forget_acc_before"]
    figures |= _take(m.get("after"), EVALUATION_KEYS, "after.")
    figures |= _take(m.get("cost"), COST_KEYS)
    return figures


def evaluation_metrics(out: Path) -> dict[str, float]:
    m = json.loads((out / "evaluation.json").read_text())
    figures = _take(m, EVALUATION_KEYS) | generation_counts(m)
    figures["SFID"] = 100.0  # min(100 * FID_0 / FID_0, 100): the original is its own reference
    if all(k in figures for k in ("UA", "IRA", "CRA")):
        figures["Total"] = figures["UA"] + figures["IRA"] + figures["CRA"] + 100.0
    return figures


CURVE_FILES = {"erase": (("loss", "curves.csv"), ("distance", "diagnostics.csv")),
               "attack": (("loss", "curves.csv"), ("attack", "attack_curve.csv")),
               "evaluate": ()}


def curves(out: Path, kind: str) -> list[tuple[str, int, str, float]]:
    """(source, step, name, value) rows of a run's CSV curves."""
    rows = []
    for source, filename in CURVE_FILES[kind]:
        path = out / filename
        if not path.is_file():
            continue
        with path.open() as f:
            for row in csv.DictReader(f):
                try:
                    step = int(float(row.get("step", "")))
                except ValueError:
                    continue
                for name, text in row.items():
                    if name == "step" or text in (None, ""):
                        continue
                    try:
                        value = clean(float(text))
                    except ValueError:
                        continue
                    if value is not None:
                        rows.append((source, step, name, value))
    return rows


def run_figures(out: Path, kind: str) -> dict[str, float]:
    return {"erase": erase_metrics, "attack": attack_metrics, "evaluate": evaluation_metrics}[kind](out)
