"""Atomic, resumable checkpoints: safetensors for tensors, JSON for the rest.

A checkpoint is `ckpt-<step>.safetensors` plus `ckpt.json` naming it. Each file is written
to a temporary name and renamed; the JSON is renamed last, so a crash at any point leaves
the previous checkpoint intact and readable. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffunlearn.engine.errors import CheckpointError
from diffunlearn.io import atomic_write_text

POINTER = "ckpt.json"


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state into tensors (for safetensors) and JSON-able scalars."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], info: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in info["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})


def save_checkpoint(folder: Path, step: int, tensors: dict[str, torch.Tensor], info: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    name = f"ckpt-{step:08d}.safetensors"
    atomic_save_tensors(tensors, folder / name)
    atomic_write_text(folder / POINTER, json.dumps({"step": step, "file": name, **info}))
    for old in folder.glob("ckpt-*.safetensors"):
        if old.name != name:
            old.unlink()


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The latest complete checkpoint in `folder`, or None; CheckpointError if it is corrupt."""
    pointer = folder / POINTER
    if not pointer.exists():
        return None
    try:
        info = json.loads(pointer.read_text())
        return load_file(str(folder / info["file"])), info
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
        raise CheckpointError(f"corrupt checkpoint in {folder} ({type(err).__name__}); "
                              "delete that folder to restart the run from scratch") from None
