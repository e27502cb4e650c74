"""Speed against its limit: one training step of each method against the raw UNet passes it needs.

For every registered method that trains through the shared loop, on the shipped testbed model
and the method's `testbed` profile (its batch size, parameter group, optimizer), this times one
step exactly as the loop runs it (`engine.loop.train_step`: the step's lr, zero_grad, the
method's `step` -- drawing the batches, encoding, the batched student and teacher forwards, the
loss, the backward -- gradient clipping, the finiteness check and the optimizer update), then
replays, raw, the UNet passes that step made: every `unet(...)` call it made, on the very same
inputs, with or without autograd as the step ran it, and a backward through each output the
step back-propagated through, with the same trainable parameter group. The ratio step / raw is
the toolkit's overhead over the model's own cost (goal <= 1.15).

Step and raw alternate (warm-up first, then step, raw, step, raw, ...), and the table reports
the median ratio and its spread (interquartile range and min-max), so a busy machine moves
both timings of a trial alike instead of swinging the figure. Times are the process's CPU time
(`time.process_time`; with one thread, the time the step actually ran, not the time other
processes held the core); the wall-clock ratio is printed beside it. Closed-form methods (uce,
retrain) have no training step and are listed as skipped; MACE's closed-form refinement and
fusion are skipped, its per-concept LoRA training (which runs on the shared loop) is timed.
The UNet passes counted by the backend (`model.counters`) are printed beside each row as a
check on the replay (forward calls / images through them / backward passes).

    PYTHONPATH=src python benchmarks/step_overhead.py [--methods esd,salun] [--trials 15] [--threads 1]
"""

from __future__ import annotations

import argparse
import gc
import statistics
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from timing import Stopwatch, spread

from diffunlearn.engine.loop import make_optimizer, train_step
from diffunlearn.runs.common import loop_config
from diffunlearn.runs.erase import load_erase

NO_EVAL = ["eval.enabled=false"]


@dataclass
class UNetCall:
    """One call of the UNet as a step made it: its inputs and whether it was back-propagated."""

    sample: torch.Tensor
    timestep: torch.Tensor
    cond: torch.Tensor
    grad: bool  # autograd recorded the call (its output required grad)
    backward: bool = False  # a gradient flowed back through its output


@contextmanager
def recorded_unet_calls(unet: torch.nn.Module):
    """Record every forward of `unet` (also those through torch.func.functional_call)."""
    calls: list[UNetCall] = []

    def hook(module, args, kwargs, output):
        sample, timestep = args[0], args[1] if len(args) > 1 else kwargs["timestep"]
        cond = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        out = output.sample if hasattr(output, "sample") else output[0]
        call = UNetCall(sample.detach().clone(), torch.as_tensor(timestep).detach().clone(),
                        cond.detach().clone(), grad=out.requires_grad)
        if out.requires_grad:
            out.register_hook(lambda grad: setattr(call, "backward", True))
        calls.append(call)

    handle = unet.register_forward_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def replay(unet: torch.nn.Module, calls: list[UNetCall], params: list[torch.nn.Parameter],
           backward_all: bool = False) -> tuple[float, float]:
    """(wall, CPU) seconds for the raw passes of `calls`: each forward as the step ran it, and a
    backward through each output the step back-propagated through (into the trained group);
    with `backward_all`, through every output autograd recorded."""
    for p in params:
        p.grad = None
    gc.collect()
    with Stopwatch() as watch:
        for call in calls:
            with torch.set_grad_enabled(call.grad):
                out = unet(call.sample, call.timestep, encoder_hidden_states=call.cond).sample
            if call.backward or (backward_all and call.grad):
                out.pow(2).mean().backward()
    for p in params:
        p.grad = None
    return watch.wall, watch.cpu


@dataclass
class Trainable:
    """What the loop trains for one method: its model, trained parameters, step and settings."""

    model: object
    params: dict[str, torch.nn.Parameter]
    step_fn: object
    loop_cfg: object
    batch_size: int
    note: str = ""
    # the loss is not on the UNet's output (MACE: its attention maps), so the counters and the
    # output hooks see no backward; the raw reference back-propagates through the whole output
    loss_inside: bool = False


def build(name: str, forget: str) -> Trainable | str:
    """The method as an erase run sets it up before its loop; a string says why it is skipped."""
    loaded = load_erase(name, [forget], overrides=NO_EVAL)
    model, method = loaded.model, loaded.method
    if name == "mace":  # the closed forms are skipped; each concept's LoRA trains on the shared loop
        model.set_trainable(method.param_group())
        method.setup()
        params = method.add_concept_lora(forget)
        return Trainable(model, params, lambda k, gen: method.attention_step(forget, gen),
                         method.lora_loop_config(forget), method.cfg.batch_size, "LoRA training only",
                         loss_inside=True)
    if method.closed_form:
        return "closed form: no training step"
    params = model.set_trainable(method.param_group())
    method.setup()
    cfg = loop_config(method.cfg, loaded.steps, 0, False, name)
    return Trainable(model, params, method.step, cfg, method.cfg.batch_size)


def measure(run: Trainable, trials: int, warmup: int) -> dict:
    plist = list(run.params.values())
    optimizer = make_optimizer(plist, run.loop_cfg)
    timings: dict[str, list[float]] = {"step": [], "raw": [], "ratio": [], "wall_ratio": []}
    passes: dict[str, list[int]] = {}
    for k in range(warmup + trials):
        before = dict(run.model.counters)
        gc.collect()
        with recorded_unet_calls(run.model.unet) as calls, Stopwatch() as step:
            train_step(k, run.step_fn, optimizer, plist, run.loop_cfg)
        raw_wall, raw_cpu = replay(run.model.unet, calls, plist, backward_all=run.loss_inside)
        counted = {key: run.model.counters[key] - before[key] for key in before}
        replayed = {"unet_forward": len(calls), "unet_forward_images": sum(len(c.sample) for c in calls),
                    "unet_backward": sum(c.backward for c in calls)}
        if run.loss_inside:
            replayed["unet_backward"] = counted["unet_backward"]  # neither sees the backward
        if counted != replayed:  # the replay must make exactly the passes the backend counted
            raise RuntimeError(f"replay mismatch: counters {counted}, replayed {replayed}")
        if k >= warmup:
            for key, value in (("step", step.cpu), ("raw", raw_cpu), ("ratio", step.cpu / raw_cpu),
                               ("wall_ratio", step.wall / raw_wall)):
                timings[key].append(value)
            for key, value in counted.items():
                passes.setdefault(key, []).append(value)
    return {"step_ms": 1e3 * statistics.median(timings["step"]), "raw_ms": 1e3 * statistics.median(timings["raw"]),
            "ratio": spread(timings["ratio"]), "wall_ratio": spread(timings["wall_ratio"]),
            "passes": " / ".join(_range(passes[key]) for key in ("unet_forward", "unet_forward_images",
                                                                  "unet_backward"))}


def _range(values: list[int]) -> str:
    return str(values[0]) if min(values) == max(values) else f"{min(values)}-{max(values)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="all", help="comma-separated, or 'all' registered methods")
    parser.add_argument("--forget", default="dotted", help="the concept every method forgets")
    parser.add_argument("--trials", type=int, default=15, help="timed (step, raw) pairs per method")
    parser.add_argument("--warmup", type=int, default=2, help="untimed pairs first")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from diffunlearn.methods import methods

    names = methods.names() if args.methods == "all" else args.methods.split(",")
    print(f"threads {args.threads}, {args.trials} interleaved trials after {args.warmup} warm-up, "
          f"forgetting '{args.forget}', testbed profiles\n")
    rows, skipped = [], []
    for name in names:
        torch.manual_seed(0)
        run = build(name, args.forget)
        if isinstance(run, str):
            skipped.append(f"{name} ({run})")
            continue
        r = measure(run, args.trials, args.warmup)
        note = f" ({run.note})" if run.note else ""
        cpu, wall = r["ratio"], r["wall_ratio"]
        rows.append(f"| {name}{note} | {run.batch_size} | {r['passes']} | {r['step_ms']:.1f} | {r['raw_ms']:.1f} | "
                    f"**{cpu['median']:.2f}** | {cpu['q1']:.2f}-{cpu['q3']:.2f}; {cpu['min']:.2f}-{cpu['max']:.2f} | "
                    f"{wall['median']:.2f} ({wall['q1']:.2f}-{wall['q3']:.2f}) |")
        print(rows[-1], flush=True)
    print("\n| method | batch | UNet passes per step (fwd calls / images / bwd) | step ms | raw ms | ratio median | "
          "spread: IQR; min-max | wall-clock ratio median (IQR) |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if skipped:
        print(f"\nskipped: {', '.join(skipped)}")


if __name__ == "__main__":
    main()
