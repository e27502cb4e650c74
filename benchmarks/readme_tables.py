"""Print the README's methods and robustness tables from the `profiles` recipe's results.

    diffunlearn bench profiles                 # runs (or skips) every method and attack
    python benchmarks/readme_tables.py         # prints both tables

    diffunlearn bench profiles --model testbed-sd --groups methods    # the same methods on testbed-sd
    python benchmarks/readme_tables.py --model testbed-sd --methods-only

The runs are a recipe (resumable, any executor, recorded in the results store), and every
figure here is read from the store.
"""

from __future__ import annotations

import argparse
import math

import diffunlearn


def fmt(value, digits: int = 0, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{scale * value:.{digits}f}"


FIGURES = ("UA", "IRA", "CRA", "SFID", "train_seconds")


def methods_table(figures: dict[str, list]) -> str:
    """Name, paper, what it trains, testbed defaults and the measured forgetting of one style:
    `figures[name]` holds UA, IRA, CRA, SFID and training seconds; a method without figures
    gets dashes."""
    from diffunlearn.methods import methods

    lines = ["| method | paper | trains | testbed defaults | UA | IRA | CRA | SFID | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in methods.names():
        cls = methods.get(name)
        # closed-form methods run no loop: their `steps=0` says nothing
        shown = {k: v for k, v in cls.profiles["testbed"].items()
                 if k != "param_group" and not (cls.closed_form and k == "steps" and v == 0)}
        defaults = ", ".join(f"{k}={v}" for k, v in shown.items()) or "the shipped model's recipe"
        result = " | ".join(fmt(v) for v in figures[name]) if name in figures else "- | - | - | - | -"
        lines.append(f"| `{name}` | {cls.paper} | {cls.trains} | {defaults} | {result} |")
    return "\n".join(lines)


def erase_figures(frame) -> dict[str, list]:
    """Each method's first complete erase run in a results frame, as methods_table's figures."""
    rows = frame[(frame["kind"] == "erase") & (frame["status"] == "complete")].drop_duplicates("method")
    return {r["method"]: [r.get(k) for k in FIGURES] for _, r in rows.iterrows()}


def robustness_table(frame) -> str:
    attacks = frame[(frame["kind"] == "attack") & (frame["status"] == "complete")]
    lines = ["| method | attack | AR_MU | AR_DiMRA top-1 | top-3 | AR_CL min | retain acc before -> after "
             "| FID before -> after | travelled back | time (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in attacks.iterrows():
        step = fmt(r.get("AR_DiMRA_top1_step"))
        lines.append(
            f"| {r['method']} | {r['attack']} | {fmt(r.get('AR_MU_top1'), 1)} | {fmt(r.get('AR_DiMRA_top1'), 1)} "
            f"(step {step}) | {fmt(r.get('AR_DiMRA_top3'), 1)} | {fmt(r.get('AR_CL_min'), 1)} | "
            f"{fmt(r.get('retain_acc_before'), 1)} -> {fmt(r.get('retain_acc_after'), 1)} | "
            f"{fmt(r.get('FID_before'), 1)} -> {fmt(r.get('FID_after'), 1)} | "
            f"{fmt(r.get('travelled_back_fraction'), 1, 100)}% | {fmt(r.get('train_seconds'))} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs/bench", help="the results folder of `diffunlearn bench`")
    parser.add_argument("--model", default=None, help="the model the recipe ran on (as given to `bench --model`)")
    parser.add_argument("--methods-only", action="store_true", help="only the methods table")
    args = parser.parse_args()
    frame = diffunlearn.results("profiles", args.root, model=args.model)
    print("README methods table:\n")
    print(methods_table(erase_figures(frame)))
    if not args.methods_only:
        print("\nREADME robustness table:\n")
        print(robustness_table(frame))


if __name__ == "__main__":
    main()
