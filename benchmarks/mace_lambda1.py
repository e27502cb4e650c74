"""[000]'s MACE `lambda1` sweep on the testbed: erase one concept with MACE at each lambda1 (the
rest of the `testbed` profile), attack each result with `resurgence` (its `testbed` profile),
and print one markdown row per lambda1 with the erase quality (UA / IRA / CRA / SFID) and the
attack's headline figures: AR before the attack (AR_MU), the largest AR during it (AR_DiMRA,
top-1 and top-3, with its step) and the retain accuracy before and after.

    PYTHONPATH=src python benchmarks/mace_lambda1.py --out runs/mace --threads 1

Runs go to <out>/lambda1-<value> (attacks inside, as the runs API puts them); finished runs are
skipped, interrupted ones resume, so rerunning only prints the table again. Every figure is read
from the runs' metrics.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import diffunlearn

LAMBDA1 = (0.0, 1e-4, 1e-3, 1e-2, 0.1, 1.0)
FAST_EVAL = ["eval.images_per_prompt=2", "eval.partial_images=8", "eval.bootstrap=200"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lambdas", default=",".join(str(v) for v in LAMBDA1))
    parser.add_argument("--concept", default="dotted")
    parser.add_argument("--out", type=Path, default=Path("runs/mace"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--extra", default="", help="extra erase overrides, comma-separated (e.g. method.lamb=10)")
    args = parser.parse_args()

    rows = []
    for value in (float(v) for v in args.lambdas.split(",")):
        overrides = [f"method.lambda1={value}", *FAST_EVAL, *(o for o in args.extra.split(",") if o)]
        erased = diffunlearn.erase("mace", [args.concept], out=args.out / f"lambda1-{value:g}", overrides=overrides,
                                   threads=args.threads, progress=False)
        attacked = diffunlearn.attack("resurgence", erased.out, overrides=FAST_EVAL, threads=args.threads,
                                      progress=False)
        rows.append(row(value, erased.metrics, attacked.metrics))
        print(rows[-1], flush=True)
    print()
    print("| lambda1 | UA | IRA | CRA | SFID | AR_MU top-1 / top-3 | AR_DiMRA top-1 (step) / top-3 "
          "| retain acc before -> after |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


def row(value: float, erased: dict, attacked: dict) -> str:
    after, s = erased["after"], attacked["summary"]

    def pct(key: str) -> str:
        v = s.get(key)
        return f"{v:.1f}" if isinstance(v, int | float) else "-"

    return (f"| {value:g} | {after['UA']:.1f} | {after['IRA']:.1f} | {after['CRA']:.1f} | {after['SFID']:.1f} "
            f"| {pct('AR_MU_top1')} / {pct('AR_MU_top3')} "
            f"| {pct('AR_DiMRA_top1')} ({s.get('AR_DiMRA_top1_step')}) / {pct('AR_DiMRA_top3')} "
            f"| {pct('retain_acc_before')} -> {pct('retain_acc_after')} |")


if __name__ == "__main__":
    main()
