"""EraseDiff against SalUn: wall time of whole erase runs on the same task, side by side.

[004] Table 4 (DDPM, forgetting 'airplane', five runs): the forgetting stage took 28.17 min for
SalUn and 12.70 min for EraseDiff, SalUn / EraseDiff = 2.2x; SalUn's saliency mask is a separate
stage the paper leaves out of that time. Here both methods run through the runs API
(`diffunlearn.erase(..., out=...)` into a temporary directory) with their `testbed` profiles on
the same task and with evaluation off (`eval.enabled=false`), so both runs do the same
non-training work. Runs alternate (EraseDiff, SalUn, EraseDiff, ...). Reported, as medians:
the run's wall time, its forgetting stage (the loop's `train_seconds`, which excludes SalUn's
mask, as [004] does), the steps and UNet passes it made, and SalUn's mask computation timed
alone (the model and task loaded as the run loads them, then `SalUn.setup()`).

    PYTHONPATH=src python benchmarks/erasediff_vs_salun.py [--repeats 2] [--threads 1] [--forget dotted]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from timing import Stopwatch

import diffunlearn
from diffunlearn.runs.erase import load_erase

METHODS = ("erasediff", "salun")
NO_EVAL = ["eval.enabled=false"]
PAPER_RATIO = 28.17 / 12.70  # [004] Table 4, SalUn / EraseDiff forgetting-stage minutes


def salun_mask_seconds(forget: str) -> float:
    """SalUn's saliency mask alone, set up exactly as its erase run does before training."""
    loaded = load_erase("salun", [forget], overrides=NO_EVAL)
    loaded.model.set_trainable(loaded.method.param_group())
    with Stopwatch() as watch:
        loaded.method.setup()
    return watch.wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--forget", default="dotted")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each method, alternating")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results: dict[str, list[dict]] = {m: [] for m in METHODS}
    masks = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.repeats):
            for method in METHODS:
                with Stopwatch() as watch:
                    run = diffunlearn.erase(method, [args.forget], out=Path(tmp) / f"{method}-{k}",
                                            overrides=NO_EVAL, threads=args.threads, progress=False)
                cost = run.metrics["cost"]
                results[method].append({"wall": watch.wall, "cpu": watch.cpu, **cost})
                print(f"{method} #{k}: wall {watch.wall:.1f} s (CPU {watch.cpu:.1f} s), forgetting stage "
                      f"{cost['train_seconds']:.1f} s, {cost['steps']} steps", flush=True)
            masks.append(salun_mask_seconds(args.forget))

    def median(method: str, key: str) -> float:
        return statistics.median(r[key] for r in results[method])

    print(f"\nthreads {args.threads}, forgetting '{args.forget}', testbed profiles, evaluation off, "
          f"{args.repeats} alternating runs each (medians)\n")
    print("| method | steps | batch | UNet fwd calls / images / bwd | run wall s | run CPU s | forgetting stage s "
          "| s per step |")
    print("|---|---|---|---|---|---|---|---|")
    for method in METHODS:
        r = results[method][-1]
        batch = load_batch_size(method)
        print(f"| {method} | {r['steps']} | {batch} | {r['unet_forward']} / {r['unet_forward_images']} / "
              f"{r['unet_backward']} | {median(method, 'wall'):.1f} | {median(method, 'cpu'):.1f} | "
              f"{median(method, 'train_seconds'):.1f} | "
              f"{median(method, 'train_seconds') / r['steps']:.3f} |")
    salun_train, erasediff_train = median("salun", "train_seconds"), median("erasediff", "train_seconds")
    print(f"\nSalUn's saliency mask alone: {statistics.median(masks):.1f} s (a separate stage, before training)")
    print(f"SalUn / EraseDiff, forgetting stage: {salun_train / erasediff_train:.2f}x "
          f"([004] Table 4: {PAPER_RATIO:.1f}x); whole runs (mask and saving included): "
          f"{median('salun', 'wall') / median('erasediff', 'wall'):.2f}x wall, "
          f"{median('salun', 'cpu') / median('erasediff', 'cpu'):.2f}x CPU")
    per_step = (erasediff_train / results["erasediff"][-1]["steps"]) / (salun_train / results["salun"][-1]["steps"])
    print(f"per step: EraseDiff / SalUn {per_step:.2f}x")


def load_batch_size(method: str) -> int:
    from diffunlearn.methods import methods

    return methods.get(method).profiles["testbed"]["batch_size"]


if __name__ == "__main__":
    main()
