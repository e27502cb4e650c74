"""Time and peak GPU memory of the Stable Diffusion `paper` profiles, beside UnlearnCanvas' figures.

Given a local Stable Diffusion 1.x folder (or one .safetensors with --model-config) and a CUDA
GPU, erase one concept with esd-x, uce, mace, core and salun (each with its `paper` profile,
evaluation off: the figures are the unlearning's alone) and print, per method, the training time
(`cost.train_seconds`: the method's loop or closed form, without loading or generating data), the
wall time of the whole run, and the peak GPU memory allocated by the process, next to the
run time and memory UnlearnCanvas (Zhang et al. 2024) reports for the same methods in its
efficiency comparison: ESD 6163 s / 17.8 GB, SalUn 667 s / 30.8 GB, CA 734 s / 10.1 GB,
UCE 434 s / 5.1 GB (MACE and CORE have no figure there).

    python benchmarks/sd_gpu.py --model /models/stable-diffusion-v1-5
    python benchmarks/sd_gpu.py --model sd-v1-4.safetensors --model-config /models/sd-v1-4-configs \\
        --methods esd-x,uce --bf16 --gradient-checkpointing

Without a CUDA GPU, or without the weights, it prints one line saying so and exits 0. Runs land
in --out and are skipped when finished, like any erase run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# UnlearnCanvas' published run time (s) and GPU memory (GB) per method
PUBLISHED = {"esd": (6163, 17.8), "salun": (667, 30.8), "ca": (734, 10.1), "uce": (434, 5.1)}
PUBLISHED_NAME = {"esd-x": "esd", "esd-u": "esd", "esd": "esd", "salun": "salun", "ca-model": "ca", "ca-noise": "ca",
                  "uce": "uce"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="SD folder or single .safetensors checkpoint")
    parser.add_argument("--model-config", type=Path, default=None, help="config folder for a single-file checkpoint")
    parser.add_argument("--methods", default="esd-x,uce,mace,core,salun")
    parser.add_argument("--forget", default="Van Gogh")
    parser.add_argument("--retain", default="Claude Monet,Pablo Picasso", help="for the methods that train on D_r")
    parser.add_argument("--domain", default="style")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (method.bf16=true)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--extra", default="", help="more overrides, comma-separated (e.g. method.steps=50)")
    parser.add_argument("--out", type=Path, default=Path("runs/sd-gpu"))
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, no GPU visible"
        print(f"sd_gpu: no CUDA GPU here (torch {torch.__version__}, {build}); nothing to measure")
        return 0
    if args.model is None or not args.model.exists():
        print(f"sd_gpu: no Stable Diffusion weights at {args.model or '(none given)'}; pass --model "
              "/path/to/stable-diffusion-v1-5 to measure")
        return 0

    import diffunlearn

    overrides = ["method.profile=paper", "eval.enabled=false", *[o for o in args.extra.split(",") if o]]
    if args.model_config:
        overrides.append(f"model.config={args.model_config}")
    if args.bf16:
        overrides.append("method.bf16=true")
    if args.gradient_checkpointing:
        overrides.append("method.gradient_checkpointing=true")
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 {args.bf16}, "
          f"gradient checkpointing {args.gradient_checkpointing}")
    print("| method | train time (s) | run time (s) | peak GPU memory (GB) | UnlearnCanvas time (s) "
          "| UnlearnCanvas memory (GB) |")
    print("|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        run = diffunlearn.erase(method, [args.forget], retain=[r for r in args.retain.split(",") if r],
                                model=args.model, out=args.out / method, overrides=overrides, domain=args.domain,
                                progress=sys.stderr.isatty(), device=args.device)
        wall = time.perf_counter() - start
        cost = run.metrics.get("cost", {})
        peak = torch.cuda.max_memory_allocated() / 2**30 if not run.skipped else \
            cost.get("peak_cuda_allocated_mb", float("nan")) / 1024
        published = PUBLISHED.get(PUBLISHED_NAME.get(method, ""), None)
        theirs = (f"{published[0]} | {published[1]}" if published else "- | -")
        print(f"| {method} | {cost.get('train_seconds', float('nan')):.0f} | "
              f"{'(skipped)' if run.skipped else f'{wall:.0f}'} | {peak:.1f} | {theirs} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
