"""Attack unlearned testbed models both ways and print the robustness table of the README.

For each method, forget one style with its `testbed` profile (reusing runs/profiles/<method>-
<concept>-default when it exists), then run `relearn` (DiMRA, assumption i) and `resurgence`
(random in-domain concepts) with their `testbed` profiles on it; print one markdown row per
(method, attack): AR before the attack (AR_MU), the largest AR during it (AR_DiMRA, top-1 and
top-3), the smallest AR_CL (methods with anchors), retain accuracy and FID before/after, the
share of the distance to the original weights travelled back, and the attack's time.

    python benchmarks/attack_robustness.py --methods esd,salun,sfront,core,dimum,mace

Every figure is read from the attack run's metrics.json; rerunning skips finished runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import diffunlearn

FAST_EVAL = ["eval.images_per_prompt=2", "eval.partial_images=8", "eval.bootstrap=200"]
ATTACKS = {"relearn": ["attack.data=retain"], "resurgence": ["attack.data=random"]}
COLUMNS = ("AR_MU_top1", "AR_DiMRA_top1", "AR_DiMRA_top3", "AR_CL_min", "retain_acc_before", "retain_acc_after",
           "FID_before", "FID_after", "travelled_back_fraction")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="esd,salun,sfront,core,dimum,mace")
    parser.add_argument("--attacks", default="relearn,resurgence")
    parser.add_argument("--concept", default="dotted")
    parser.add_argument("--out", type=Path, default=Path("runs/profiles"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--extra", default="", help="extra attack overrides, comma-separated")
    args = parser.parse_args()

    print("| method | attack | AR_MU | AR_DiMRA top-1 | top-3 | AR_CL min | retain acc before -> after "
          "| FID before -> after | travelled back | time (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        erased = diffunlearn.erase(method, [args.concept], out=args.out / f"{method}-{args.concept}-default",
                                   overrides=FAST_EVAL, threads=args.threads, progress=False)
        for name in args.attacks.split(","):
            extra = [o for o in args.extra.split(",") if o]
            run = diffunlearn.attack(name, erased.out, overrides=[*ATTACKS[name], *FAST_EVAL, *extra],
                                     threads=args.threads, progress=False)
            print(row(method, name, run.metrics), flush=True)


def row(method: str, attack: str, metrics: dict) -> str:
    s = metrics["summary"]

    def fmt(key: str, scale: float = 1.0) -> str:
        value = s.get(key)
        return f"{scale * value:.1f}" if isinstance(value, int | float) else "-"

    return (f"| {method} | {attack} | {fmt('AR_MU_top1')} | {fmt('AR_DiMRA_top1')} (step {s.get('AR_DiMRA_top1_step')})"
            f" | {fmt('AR_DiMRA_top3')} | {fmt('AR_CL_min')} | {fmt('retain_acc_before')} -> "
            f"{fmt('retain_acc_after')} | {fmt('FID_before')} -> {fmt('FID_after')} | "
            f"{fmt('travelled_back_fraction', 100)}% | {metrics['cost']['train_seconds']:.0f} |")


if __name__ == "__main__":
    main()
