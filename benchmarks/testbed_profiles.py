"""Measure candidate `testbed` profiles: each method forgets one style (and one object) on the
shipped model over a small grid of learning rates and step counts; prints a markdown table
of UA / IRA / CRA / SFID / Total and training time, and the best setting per method by Total.

    python benchmarks/testbed_profiles.py --methods core,esd --out runs/profiles

The chosen settings are written into each method's `profiles["testbed"]` by hand, with this
script's figures in the profile's comment: a profile is a decision, this script its evidence.
The README's methods table (the current profiles alone, no grid) comes from the `profiles`
recipe: `diffunlearn bench profiles --groups methods`, then `python benchmarks/readme_tables.py`.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import diffunlearn

GRID = {
    "finetune": {"method.lr": [1e-4, 3e-4], "method.steps": [100, 300]},
    "neggrad": {"method.lr": [1e-5, 2e-5], "method.steps": [20]},
    "esd": {"method.lr": [1e-4, 3e-4], "method.steps": [100]},
    "esd-u": {"method.lr": [1e-5, 3e-5], "method.steps": [100]},
    "core": {"method.lr": [3e-4, 1e-3], "method.epochs": [20, 40]},
    "dimum": {"method.lr": [1e-4, 3e-4], "method.steps": [150, 300]},
    "sfront": {"method.lr": [5e-5, 1e-4], "method.beta": [10.0]},
    "salun": {"method.lr": [1e-4, 3e-4], "method.epochs": [40]},
    "erasediff": {"method.lr": [5e-5, 1e-4], "method.steps": [100]},
    "shs": {"method.lr": [1e-4, 2e-4], "method.sparsity": [0.9, 0.99]},
    "uce": {"method.lamb": [0.05, 0.5], "method.erase_scale": [5.0, 20.0]},
    "advanchor": {"method.lr": [2e-4, 3e-4, 1e-3]},
    "sdd": {"method.lr": [1e-4, 1.5e-4, 2e-4, 3e-4]},
    "erasediff-sum": {"method.forget_weight": [0.005, 0.02, 0.1]},
    "mace": {"method.lr": [1e-3], "method.lamb": [10.0, 100.0]},
}
FAST_EVAL = ["eval.images_per_prompt=2", "eval.partial_images=8", "eval.bootstrap=200"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="all", help="comma-separated, or 'all' registered methods")
    parser.add_argument("--exclude", default="retrain", help="methods left out (retrain takes ~40 min)")
    parser.add_argument("--concepts", default="dotted,circle")
    parser.add_argument("--out", type=Path, default=Path("runs/profiles"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from diffunlearn.methods import methods

    rows = []
    chosen = methods.names() if args.methods == "all" else args.methods.split(",")
    for method in [m for m in chosen if m not in args.exclude.split(",")]:
        for concept in args.concepts.split(","):
            run = diffunlearn.erase(method, [concept], out=args.out / f"{method}-{concept}-default",
                                    overrides=FAST_EVAL, threads=args.threads, progress=False)
            rows.append(summary(method, concept, "testbed profile", run, is_default=True))
            print(json.dumps(rows[-1]), flush=True)
        grid = GRID.get(method, {})
        keys, values = zip(*grid.items(), strict=True) if grid else ((), ())
        for combo in itertools.product(*values) if keys else []:
            overrides = [f"{k}={v}" for k, v in zip(keys, combo, strict=True)] + FAST_EVAL
            for concept in args.concepts.split(","):
                tag = "-".join(f"{k.split('.')[-1]}{v}" for k, v in zip(keys, combo, strict=True))
                run = diffunlearn.erase(method, [concept], out=args.out / f"{method}-{concept}-{tag}",
                                        overrides=overrides, threads=args.threads, progress=False)
                rows.append(summary(method, concept, " ".join(overrides[: len(keys)]), run))
                print(json.dumps(rows[-1]), flush=True)
    print_table(rows)


def summary(method: str, concept: str, setting: str, run, is_default: bool = False) -> dict:
    after = run.metrics["after"]
    return {"method": method, "concept": concept, "setting": setting, "is_default": is_default,
            **{k: after[k] for k in ("UA", "UA_partial", "IRA", "CRA", "SFID", "Total")},
            "seconds": run.metrics["cost"]["train_seconds"]}


def print_table(rows: list[dict]) -> None:
    print("\n| method | concept | setting | UA | UA partial | IRA | CRA | SFID | Total | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['concept']} | {r['setting']} | {r['UA']:.1f} | {r['UA_partial']:.1f} | "
              f"{r['IRA']:.1f} | {r['CRA']:.1f} | {r['SFID']:.1f} | {r['Total']:.1f} | {r['seconds']:.0f} |")
    best: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        best.setdefault((r["method"], r["setting"]), []).append(r["Total"])
    print("\nbest setting per method (mean Total over concepts):")
    for method in dict.fromkeys(r["method"] for r in rows):
        scored = {s: sum(v) / len(v) for (m, s), v in best.items() if m == method}
        setting = max(scored, key=scored.get)
        print(f"  {method}: {setting} (Total {scored[setting]:.1f})")


if __name__ == "__main__":
    main()
