"""The frozen teacher and batched forwards against the official ESD code's way, side by side.

rohitgandikota/erasing keeps a second full UNet as the frozen model and runs the three ESD
forwards (student on c_f, frozen on c_f, frozen on "") one at a time. DESIGN.md rules 5-6:
we snapshot only the trained group and evaluate the teacher with torch.func.functional_call,
and run all frozen terms of a step in one batched forward. This prints, measured in one run:

- extra memory for the teacher: snapshot of the group vs a deep copy of the UNet (ratio);
- time per ESD step: batched (ours) vs sequential forwards (ratio).

    python benchmarks/teacher_and_batching.py [--model DIR] [--batch 4] [--steps 20]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from diffunlearn.backends.diffusers_t2i import T2IModel
from diffunlearn.data.tasks import UnlearningTask
from diffunlearn.engine.loop import step_generator
from diffunlearn.objectives import Term, compute_loss, draw_batch
from diffunlearn.runs.resolve import default_model_dir


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def sequential_esd_step(model: T2IModel, frozen_unet, task, batch_size: int, gen) -> torch.Tensor:
    """The official code's shape: a second UNet, three separate forwards."""
    batch = draw_batch(model, task, "forget", batch_size, gen)
    x_t = model.add_noise(batch.x0, batch.noise, batch.t)
    cond_f, cond_0 = model.encode(batch.prompts["forget"]), model.encode(batch.prompts["empty"])
    with torch.no_grad():
        e_0 = frozen_unet(x_t, batch.t, encoder_hidden_states=cond_0).sample
        e_f = frozen_unet(x_t, batch.t, encoder_hidden_states=cond_f).sample
    pred = model.eps(x_t, batch.t, cond_f)
    loss = (pred - (e_0 - (e_f - e_0))).pow(2).mean()
    loss.backward()
    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(default_model_dir()))
    parser.add_argument("--group", default="xattn")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = T2IModel.from_pretrained(args.model)
    task = UnlearningTask.create(["dotted"], images_per_prompt=3)
    params = model.set_trainable(args.group)
    snapshot = tensor_bytes(model.teacher_params().values())
    frozen_unet = copy.deepcopy(model.unet).requires_grad_(False)
    full_copy = tensor_bytes(frozen_unet.parameters())
    print(f"teacher memory: snapshot of '{args.group}' {snapshot / 2**20:.2f} MiB vs full UNet copy "
          f"{full_copy / 2**20:.2f} MiB -> {full_copy / max(snapshot, 1):.1f}x less")

    terms = [Term("esd", images="forget", prompt="forget", target="esd", eta=1.0)]

    def ours(k):
        total, _ = compute_loss(terms, model, task, args.batch, step_generator(0, k))
        total.backward()

    def theirs(k):
        sequential_esd_step(model, frozen_unet, task, args.batch, step_generator(0, k))

    timings = {}
    for name, fn in (("batched", ours), ("sequential", theirs), ("batched ", ours), ("sequential ", theirs)):
        for k in range(3):  # warm-up
            fn(k)
        start = time.perf_counter()
        for k in range(args.steps):
            for p in params.values():
                p.grad = None
            fn(k)
        timings[name.strip()] = (time.perf_counter() - start) / args.steps
    print(f"ESD step at batch {args.batch}: batched {timings['batched'] * 1e3:.1f} ms vs sequential "
          f"{timings['sequential'] * 1e3:.1f} ms -> {timings['sequential'] / timings['batched']:.2f}x")


if __name__ == "__main__":
    main()
