"""How much of an erased concept's text conditioning each attack's captions can move.

For each model and forget set, builds the data of `relearn` (assumption i: the retain set D_r)
and of `resurgence` (random in-domain concepts) exactly as the attacks do, and prints
`text_reach` (metrics/diagnostics.py; every attack run records the same figure in its summary):
the share of the erased concept's token state inside the captions' principal span. No training,
a few seconds per row.

    python benchmarks/text_reach.py
    python benchmarks/text_reach.py --models testbed --forget dotted circle square,triangle,arrow
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["testbed", "testbed-sd"], help="shipped names or folders")
    parser.add_argument("--forget", nargs="+", default=["dotted", "striped", "circle", "square",
                                                        "square,triangle,arrow"],
                        help="forget sets, each comma-separated")
    args = parser.parse_args()
    import torch

    from diffunlearn.attacks.relearn import Relearn, RelearnConfig
    from diffunlearn.attacks.resurgence import Resurgence, ResurgenceConfig
    from diffunlearn.data.tasks import UnlearningTask
    from diffunlearn.runs.attack import caption_reach
    from diffunlearn.runs.common import load_model
    from diffunlearn.runs.resolve import model_folder

    torch.set_num_threads(1)
    print("| model | forget | relearn (retain set) | resurgence (random in-domain) |")
    print("|---|---|---|---|")
    for name in args.models:
        model = load_model(model_folder(name))
        for forget in (f.split(",") for f in args.forget):
            task = UnlearningTask.create(forget, images_per_prompt=1)
            reach = [caption_reach(model, task, attack(config, model, task).build_data().prompts)
                     for attack, config in ((Relearn, RelearnConfig(data="retain")),
                                            (Resurgence, ResurgenceConfig(data="random")))]
            print(f"| {name} | {', '.join(forget)} | {reach[0]:.3f} | {reach[1]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
