"""Data-parallel training: the same run in N processes (`accelerate launch --num_processes N`,
torchrun, or any launcher that sets RANK / WORLD_SIZE), each on its share of every batch.

Every process draws the same global batch from the step's generator (engine/loop.py seeds it by
(seed, step) alone), keeps its contiguous 1/N of the rows (`shard`), and the loop averages the
gradients over processes before clipping (`average_gradients`): with equal shares the average
of the per-process mean losses is the global mean, so N processes take exactly the step one
process takes on the whole batch, up to float summation order. Process 0 alone writes (run
directory, checkpoints, curves, evaluation); the others only train.

Methods whose losses go through `objectives.compute_loss` split their batches; a method with its
own `step` (EraseDiff, AdvAnchor, MACE's LoRA stage) computes the whole batch in every process,
which is still correct (every process holds the same gradient), just not faster.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# long enough for process 0's evaluation of an SD model while the others wait at a barrier
TIMEOUT = datetime.timedelta(hours=6)


def launched() -> bool:
    """True when a launcher started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> None:
    """Join the process group a launcher prepared (gloo on CPU, NCCL on GPUs, via accelerate)."""
    if not launched():
        return  # one process: torch is not even imported (validation errors come before it)
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        from accelerate import PartialState

        PartialState(timeout=TIMEOUT)


def world() -> tuple[int, int]:
    """(rank, number of processes); (0, 1) outside a launched process group."""
    if not launched():
        return 0, 1
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def shard_rows(n: int) -> slice | None:
    """This process's contiguous share of a global batch of n rows; None with one process."""
    rank, size = world()
    if size == 1:
        return None
    if n % size:
        raise ValueError(f"a batch of {n} does not split over {size} processes; make batch_size a multiple of {size}")
    per = n // size
    return slice(rank * per, (rank + 1) * per)


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace every gradient by its mean over processes (one all-reduce of a flat buffer)."""
    import torch
    import torch.distributed as dist

    _, size = world()
    if size == 1:
        return
    params = list(params)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[offset : offset + g.numel()].view_as(p).to(p.dtype)
        offset += g.numel()


def average_logs(logs: Mapping[str, float]) -> dict[str, float]:
    """The logged values averaged over processes (the global batch's loss)."""
    import torch
    import torch.distributed as dist

    _, size = world()
    if size == 1:
        return dict(logs)
    keys = list(logs)  # the same keys in the same order in every process: they run the same step
    values = torch.tensor([float(logs[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    return {k: float(v) / size for k, v in zip(keys, values, strict=True)}


def barrier() -> None:
    import torch.distributed as dist

    if world()[1] > 1:
        dist.barrier()
