"""Measured against estimated seconds of the runs a results store holds, per kind of run.

The grid's time estimates (bench/costs.py, constants in bench/costs.yaml) are the runner's plan
and each recipe's stated duration. This prints, for every recipe the store holds, the runs that
finished with their current spec grouped by kind (an erase per method, an attack per attack and
its step count), their measured seconds against the estimate of the same node, and the ratio:
the evidence for re-fitting the constants. A `retrain` erase that found its pretraining cached
finishes in seconds against an hour's estimate: such runs (under `FOUND_DONE_FRACTION` of their
estimate) are listed apart, as the runner's progress line leaves them out of its speed.

    python benchmarks/cost_check.py --root runs/bench
    python benchmarks/cost_check.py --root runs/bench --recipes organism,profiles
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path


def rows_of(recipe: str, root: Path) -> list[dict]:
    """(kind label, measured s, estimated s) of each run recorded complete with its current spec."""
    from diffunlearn.bench import load_recipe
    from diffunlearn.bench.grid import expand, finished_nodes, sync_store

    nodes = expand(load_recipe(recipe), root)
    store = sync_store(root, recipe, nodes)  # as `diffunlearn results` reads it
    seconds = {r["node"]: r["seconds"] for r in store.runs(recipe)}
    out = []
    for n in finished_nodes(nodes, store):
        if seconds.get(n.node) is None:
            continue
        label = f"erase {n.method}" if n.kind != "attack" else f"attack {n.attack}"
        out.append({"recipe": recipe, "label": label, "measured": float(seconds[n.node]),
                    "estimated": float(n.est_seconds)})
    return out


def main() -> None:
    from diffunlearn.bench import shipped_recipes
    from diffunlearn.bench.grid import FOUND_DONE_FRACTION

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs/bench", help="the results folder of `diffunlearn bench`")
    parser.add_argument("--recipes", default=None, help="comma-separated recipes (default: every shipped one)")
    args = parser.parse_args()
    root = Path(args.root)
    names = args.recipes.split(",") if args.recipes else shipped_recipes()
    rows = [r for name in names for r in rows_of(name, root)]
    print("| recipe | run | runs | measured s (median) | estimated s (median) | measured / estimated |")
    print("|---|---|---|---|---|---|")
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        found_done = r["measured"] < FOUND_DONE_FRACTION * r["estimated"]
        groups.setdefault((r["recipe"], r["label"] + (" (found done)" if found_done else "")), []).append(r)
    for (recipe, label), group in sorted(groups.items()):
        measured = statistics.median(r["measured"] for r in group)
        estimated = statistics.median(r["estimated"] for r in group)
        ratio = sum(r["measured"] for r in group) / sum(r["estimated"] for r in group)
        print(f"| {recipe} | {label} | {len(group)} | {measured:.0f} | {estimated:.0f} | {ratio:.2f} |")
    timed = [r for r in rows if r["measured"] >= FOUND_DONE_FRACTION * r["estimated"]]
    if timed:
        total = sum(r["measured"] for r in timed) / sum(r["estimated"] for r in timed)
        print(f"\nall runs but those that found their work done: measured / estimated = {total:.2f}")


if __name__ == "__main__":
    main()
