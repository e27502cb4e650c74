"""Sampling speed against diffusers' own pipeline loop, on the same model, measured side by side.

Ours: `T2IModel.sample`, the sampler evaluation (metrics/evaluate.py) and every attack call.
Reference: the denoising loop of diffusers' `StableDiffusionPipeline.__call__` (diffusers
0.42, pipelines/stable_diffusion/pipeline_stable_diffusion.py), written out because the
testbed (pixel space, no VAE, a word-level tokenizer) is not a pipeline class: encode the
prompts and the empty negative prompts with the text encoder (`encode_prompt`), concatenate
them for classifier-free guidance, `scheduler.set_timesteps`, then per timestep one batched
forward of uncond + cond on `scale_model_input(cat([latents] * 2), t)`, the guidance
combination and `scheduler.step` -- with a `DDIMScheduler` built from the model's scheduler
config (the deterministic DDIM, eta 0, that ours implements; `use_clipped_model_output`, as
diffusers' DDIMPipeline passes it, because on a pixel-space model ours re-derives eps from the
clipped x0). Same UNet and text encoder, same
steps, guidance, batch and initial noise (seeded per image), and the largest difference between
the two outputs is printed as a check that both compute the same images.

Trials alternate (ours, reference, ours, ...) after a warm-up; the table gives images per second
(median, from the process's CPU time: with one thread, robust to other processes on the core) of
each and the median of the per-trial ratio ours / reference with its spread (goal >= 1.0).

    PYTHONPATH=src python benchmarks/sampling_speed.py [--batch 32] [--steps 25] [--trials 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import gc
import statistics

import torch
from timing import Stopwatch, spread

from diffunlearn.backends.diffusers_t2i import T2IModel
from diffunlearn.data import canvas
from diffunlearn.runs.resolve import default_model_dir


@torch.no_grad()
def pipeline_loop(model: T2IModel, scheduler, prompts: list[str], latents: torch.Tensor, steps: int,
                  guidance: float) -> torch.Tensor:
    """StableDiffusionPipeline.__call__'s steps 3-7 (encode, timesteps, denoising loop) on `model`."""
    cond = model.text_encoder(model.tokenizer(prompts).to(model.device))[0]
    uncond = model.text_encoder(model.tokenizer([""] * len(prompts)).to(model.device))[0]
    embeds = torch.cat([uncond, cond])
    scheduler.set_timesteps(steps, device=model.device)
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise_pred = model.unet(model_input, t, encoder_hidden_states=embeds, return_dict=False)[0]
        noise_uncond, noise_text = noise_pred.chunk(2)
        noise_pred = noise_uncond + guidance * (noise_text - noise_uncond)
        # ours re-derives eps from the clipped x0 on a pixel-space model (clip_sample), as DDIMPipeline asks for
        latents = scheduler.step(noise_pred, t, latents, eta=0.0, use_clipped_model_output=True,
                                 return_dict=False)[0]
    return latents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(default_model_dir()))
    parser.add_argument("--batch", type=int, default=32, help="images per call (evaluation batches up to 128)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps (evaluation's default)")
    parser.add_argument("--guidance", type=float, default=None, help="default: the model's recorded scale")
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers import DDIMScheduler

    model = T2IModel.from_pretrained(args.model)
    guidance = model.guidance_scale if args.guidance is None else args.guidance
    scheduler = DDIMScheduler.from_config(model.scheduler.config)
    pairs = [(s, o) for s in canvas.STYLES for o in canvas.OBJECTS]
    prompts = [canvas.full_prompt(*pairs[i % len(pairs)]) for i in range(args.batch)]
    seeds = list(range(args.batch))

    def ours():
        return model.sample(prompts, seeds, steps=args.steps, guidance=guidance, batch_size=args.batch)

    def reference():
        return pipeline_loop(model, scheduler, prompts, model.initial_noise(seeds), args.steps, guidance)

    gap = float((ours() - reference().clamp(-1, 1)).abs().max())
    times: dict[str, list[float]] = {"ours": [], "reference": [], "ratio": [], "wall_ratio": []}
    for k in range(args.warmup + args.trials):
        watches = []
        for fn in (ours, reference):
            gc.collect()
            with Stopwatch() as watch:
                fn()
            watches.append(watch)
        if k >= args.warmup:
            times["ours"].append(watches[0].cpu)
            times["reference"].append(watches[1].cpu)
            times["ratio"].append(watches[1].cpu / watches[0].cpu)  # ours' images/s over the reference's
            times["wall_ratio"].append(watches[1].wall / watches[0].wall)
    print(f"threads {args.threads}, batch {args.batch}, {args.steps} DDIM steps, guidance {guidance}, "
          f"{args.trials} interleaved trials after {args.warmup} warm-up; largest pixel difference between the "
          f"two samplers' images: {gap:.2e}\n")
    print("| sampler | images/s (median, CPU time) | ms per batch |")
    print("|---|---|---|")
    for name, key in (("ours (T2IModel.sample)", "ours"), ("diffusers pipeline loop", "reference")):
        median = statistics.median(times[key])
        print(f"| {name} | {args.batch / median:.1f} | {1e3 * median:.0f} |")
    cpu, wall = spread(times["ratio"]), spread(times["wall_ratio"])
    print(f"\nours / pipeline, images per second: median {cpu['median']:.2f}x (IQR {cpu['q1']:.2f}-{cpu['q3']:.2f}, "
          f"min-max {cpu['min']:.2f}-{cpu['max']:.2f}; wall clock {wall['median']:.2f}x; goal >= 1.0)")

if __name__ == "__main__":
    main()
