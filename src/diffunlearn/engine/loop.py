"""The one training loop: pretraining, every unlearning method and every attack run on it.

A caller supplies the parameters to train and a `step` callable that, given the step index
and that step's random generator, computes the gradients (usually `loss.backward()`) and
returns the values to log. The loop owns seeding, the optimizer and its schedule, gradient
clipping, the EMA, the progress bar, periodic hooks (evaluation, diagnostics), CSV curves
and atomic checkpoints.

Resumption is exact: all randomness of step k comes from a generator seeded by
(seed, k), so a run resumed from a checkpoint replays the same batches and noise as an
uninterrupted one, and reaches the same final weights.

Data-parallel (engine/distributed.py): in a process group the loop averages every step's
gradients and logged values over processes; process 0 alone writes checkpoints and runs hooks.

Mixed precision in fp16 (`loss_scaler`, a torch.amp.GradScaler the step's backward passes
used through the backend): the loop unscales the gradients before clipping, skips a step whose
scaled gradients overflowed (halving the scale, as GradScaler does; not a divergence) and keeps
the scale in its checkpoints.

Divergence stops the run: a NaN or infinite loss or gradient norm (checked every step,
before the optimizer applies it) or weight (checked before every checkpoint and at the end)
raises TrainingDiverged, so a checkpoint never holds non-finite weights and the last good
one stays on disk.
"""

from __future__ import annotations

import csv
import hashlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from diffunlearn.engine import distributed
from diffunlearn.engine.checkpoint import (
    load_checkpoint,
    optimizer_from_tensors,
    optimizer_to_tensors,
    save_checkpoint,
)
from diffunlearn.engine.errors import CheckpointError, TrainingDiverged

StepFn = Callable[[int, torch.Generator], Mapping[str, float]]
Hook = Callable[[int], Mapping[str, float] | None]


@dataclass
class LoopConfig:
    steps: int
    lr: float
    optimizer: str = "adam"  # adam | adamw | sgd
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0
    warmup: int = 0
    schedule: str = "constant"  # constant | cosine
    ema_decay: float | None = None
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 200
    hook_every: int = 0
    progress: bool = True
    description: str = "training"


@dataclass
class LoopResult:
    steps: int
    curves: list[dict[str, float]]
    hook_rows: list[dict[str, float]]
    seconds: float
    resumed_from: int = 0
    ema: dict[str, torch.Tensor] = field(default_factory=dict)


class StopRequested(Exception):
    """Raised by a hook (or a test) to interrupt a run; the last checkpoint stays valid."""


def step_generator(seed: int, step: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def make_optimizer(params: list[nn.Parameter], cfg: LoopConfig) -> torch.optim.Optimizer:
    """The configured optimizer, with torch's fused kernel where it has one for these tensors:
    on CPU torch otherwise updates tensor by tensor in Python, which costs ~5% of a full-UNet
    testbed step (benchmarks/step_overhead.py); the fused update is the same up to float rounding."""
    fused = _fused_supported(params)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    raise ValueError(f"unknown optimizer '{cfg.optimizer}'; valid: adam, adamw, sgd")


def _fused_supported(params: list[nn.Parameter]) -> bool:
    """torch's fused Adam/AdamW/SGD kernels exist for floating-point tensors on CPU and CUDA."""
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


def lr_factor(step: int, cfg: LoopConfig) -> float:
    if cfg.warmup and step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup) / span)))
    return 1.0


def _progress(cfg: LoopConfig, start: int, enabled: bool = True):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=start, desc=cfg.description, disable=not (cfg.progress and enabled),
                dynamic_ncols=True, leave=False)


def run_loop(
    params: Mapping[str, nn.Parameter],
    step_fn: StepFn,
    cfg: LoopConfig,
    checkpoint_dir: Path | None = None,
    hooks: list[Hook] | None = None,
    extra_state: Callable[[], dict[str, torch.Tensor]] | None = None,
    load_extra_state: Callable[[dict[str, torch.Tensor]], None] | None = None,
    loss_scaler: torch.amp.GradScaler | None = None,
) -> LoopResult:
    """Train `params` for `cfg.steps` steps of `step_fn`, resuming from `checkpoint_dir` if it
    holds a checkpoint. `extra_state` adds method-owned tensors (a mask, an EMA teacher) to it;
    `loss_scaler` is fp16's loss scale, the one `step_fn`'s backward passes multiply by."""
    names = list(params)
    plist = [params[n] for n in names]
    rank, size = distributed.world()
    optimizer = make_optimizer(plist, cfg)
    ema = {n: p.detach().clone() for n, p in params.items()} if cfg.ema_decay else {}
    curves: list[dict[str, float]] = []
    hook_rows: list[dict[str, float]] = []
    start, elapsed = 0, 0.0

    loaded = load_checkpoint(checkpoint_dir) if checkpoint_dir else None
    if loaded:
        tensors, info = loaded
        try:
            with torch.no_grad():
                for n in names:
                    params[n].copy_(tensors[f"param.{n}"])
            ema = {n: tensors[f"ema.{n}"] for n in ema}
            optimizer_from_tensors(optimizer, tensors, info["optimizer"])
            if load_extra_state:
                load_extra_state({k[6:]: v for k, v in tensors.items() if k.startswith("extra.")})
            if loss_scaler is not None:
                loss_scaler.load_state_dict(info["loss_scaler"])
            start, curves, hook_rows, elapsed = info["step"], info["curves"], info["hook_rows"], info["seconds"]
        except (KeyError, ValueError, TypeError, RuntimeError) as err:
            raise CheckpointError(f"checkpoint in {checkpoint_dir} does not fit this run ({type(err).__name__}); "
                                  "delete that folder to restart the run from scratch") from None
    last_checkpoint = start or None

    def checkpoint(step: int) -> None:
        nonlocal last_checkpoint
        if checkpoint_dir is None or rank != 0:  # data-parallel: process 0 writes, the others hold the same
            last_checkpoint = step
            return
        opt_tensors, opt_info = optimizer_to_tensors(optimizer)
        tensors = {f"param.{n}": params[n] for n in names} | {f"ema.{n}": v for n, v in ema.items()} | opt_tensors
        if extra_state:
            tensors |= {f"extra.{k}": v for k, v in extra_state().items()}
        info = {"optimizer": opt_info, "curves": curves, "hook_rows": hook_rows,
                "seconds": elapsed + time.perf_counter() - t0}
        if loss_scaler is not None:
            info["loss_scaler"] = loss_scaler.state_dict()
        save_checkpoint(checkpoint_dir, step, tensors, info)
        last_checkpoint = step

    def run_hooks(step: int) -> None:
        if rank != 0:  # evaluation and diagnostics are process 0's
            return
        row: dict[str, float] = {"step": step}
        for hook in hooks or []:
            row.update(hook(step) or {})
        if len(row) > 1:
            hook_rows.append(row)

    t0 = time.perf_counter()
    bar = _progress(cfg, start, enabled=rank == 0)
    if start == 0 and cfg.hook_every:
        run_hooks(0)
    try:
        for step in range(start, cfg.steps):
            logs = train_step(step, step_fn, optimizer, plist, cfg, last_checkpoint, world_size=size,
                              loss_scaler=loss_scaler)
            if ema:
                with torch.no_grad():
                    for n, p in params.items():
                        ema[n].lerp_(p.detach(), 1 - cfg.ema_decay)
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                curves.append({"step": done, **{k: float(v) for k, v in logs.items()}})
                bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "grad_norm")})
            hook_due = bool(cfg.hook_every) and (done % cfg.hook_every == 0 or done == cfg.steps)
            checkpoint_due = done % cfg.checkpoint_every == 0 or done == cfg.steps
            if hook_due or checkpoint_due:  # hooks and checkpoints never see non-finite weights
                check_finite_weights(params, done, last_checkpoint)
            if hook_due:
                run_hooks(done)
            if checkpoint_due:
                checkpoint(done)
            bar.update(1)
    finally:
        bar.close()
    seconds = elapsed + time.perf_counter() - t0
    return LoopResult(cfg.steps, curves, hook_rows, seconds, resumed_from=start, ema=ema)


def train_step(step: int, step_fn: StepFn, optimizer: torch.optim.Optimizer, plist: list[nn.Parameter],
               cfg: LoopConfig, last_checkpoint: int | None = None, world_size: int = 1,
               loss_scaler: torch.amp.GradScaler | None = None) -> dict[str, float]:
    """One optimizer step of the loop: the step's learning rate, fresh gradients from `step_fn`
    with this step's generator (averaged over the processes of a data-parallel group; unscaled
    under fp16), clipping, the divergence check, the update. Returns the logs.
    (benchmarks/step_overhead.py times exactly this against the raw UNet passes it needs.)"""
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr * lr_factor(step, cfg)
    optimizer.zero_grad(set_to_none=True)
    logs = dict(step_fn(step, step_generator(cfg.seed, step)))
    if world_size > 1:  # data-parallel: the mean gradient and loss of the global batch
        distributed.average_gradients(plist)
        logs = distributed.average_logs(logs)
    overflow = False
    if loss_scaler is not None:  # fp16: unscale; an overflow is the scale's business, not a divergence
        loss_scaler.unscale_(optimizer)
        overflow = not all(bool(torch.isfinite(p.grad).all()) for p in plist if p.grad is not None)
    if cfg.grad_clip and not overflow:
        logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(plist, cfg.grad_clip))
    _check_finite_logs(logs, step + 1, last_checkpoint)
    if loss_scaler is None:
        optimizer.step()
        return logs
    # GradScaler skips the update of an overflowing step and halves the scale
    logs["fp16_scale"], logs["skipped_overflow"] = float(loss_scaler.get_scale()), float(overflow)
    loss_scaler.step(optimizer)
    loss_scaler.update()
    return logs


def _check_finite_logs(logs: Mapping[str, float], step: int, last_checkpoint: int | None) -> None:
    """The loss (and its terms) and the gradient norm of a step must be finite; other logged
    values (a method's diagnostics) may be anything."""
    for key, value in logs.items():
        if (key.startswith("loss") or key == "grad_norm") and not math.isfinite(float(value)):
            raise TrainingDiverged(step, f"{key} is {float(value)}", last_checkpoint)


def check_finite_weights(params: Mapping[str, torch.Tensor], step: int, last_checkpoint: int | None) -> None:
    """TrainingDiverged if a weight holds NaN or an infinity (also for closed-form edits)."""
    with torch.no_grad():
        for name, p in params.items():
            if not bool(torch.isfinite(p).all()):
                raise TrainingDiverged(step, f"weight {name} holds NaN or infinite values", last_checkpoint)


def write_curves(path: Path, rows: list[dict[str, float]]) -> None:
    """CSV with the union of keys as columns (terms can differ between rows)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


__all__ = ["LoopConfig", "LoopResult", "StopRequested", "TrainingDiverged", "check_finite_weights", "run_loop",
           "step_generator", "train_step", "write_curves"]
