"""Quality of a testbed model's generations, per concept, for a few guidance scales.

    python benchmarks/testbed_quality.py [--model DIR|testbed-sd] [--guidance 2,3,4,5] [--per-pair 3]

Every (style, object) pair's full prompt is sampled with fixed seeds and classified by the
shipped evaluators; prints the mean accuracy per domain, the worst concepts, and the
evaluators' own accuracy on held-out real images. This is how the shipped model's guidance
scale was chosen (the bar: >= 90% per domain on average, no concept below 70%).
"""

from __future__ import annotations

import argparse
import time

import torch

from diffunlearn.backends.diffusers_t2i import T2IModel
from diffunlearn.data import canvas
from diffunlearn.metrics.classifier import Evaluators, accuracy
from diffunlearn.pretrain import generation_quality
from diffunlearn.runs.resolve import default_model_dir, model_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(default_model_dir()))
    parser.add_argument("--guidance", default="2,3,4,5")
    parser.add_argument("--per-pair", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, evaluators = T2IModel.from_pretrained(model_folder(args.model)), Evaluators.load()

    pairs = [(s, o) for s in canvas.ALL_STYLES for o in canvas.ALL_OBJECTS for _ in range(10)]
    real, _ = canvas.render_batch(pairs, [canvas.HELDOUT_OFFSET + 100 + i % 10 for i in range(len(pairs))])
    real = torch.from_numpy(real)
    print(f"evaluators on {len(pairs)} held-out real images: style "
          f"{accuracy(evaluators, real, [s for s, _ in pairs], 'style'):.4f}, object "
          f"{accuracy(evaluators, real, [o for _, o in pairs], 'object'):.4f}")
    for g in (float(x) for x in args.guidance.split(",")):
        start = time.perf_counter()
        result = generation_quality(model, evaluators, g, args.per_pair)
        parts = []
        for domain, (mean, per) in result.items():
            worst = sorted(per.items(), key=lambda kv: kv[1])[:3]
            parts.append(f"{domain} {mean:.3f} (worst " + ", ".join(f"{n} {v:.2f}" for n, v in worst) + ")")
        print(f"guidance {g}: " + "; ".join(parts) + f" [{time.perf_counter() - start:.0f} s]")


if __name__ == "__main__":
    main()
