"""Torch-free checks and hashing of model folders, so bad input fails before torch loads.

A model folder is either a full diffusers-style folder (unet/, text_encoder/, tokenizer/,
scheduler/, optional vae/) or an erase run's folder whose `diffunlearn.json` names a base
model by path and content hash and whose unet/ holds only the changed tensors.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

META_FILE = "diffunlearn.json"
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
TEXT_WEIGHTS = "text_encoder/model.safetensors"


class ModelDirError(ValueError):
    """A model folder that is missing, incomplete or corrupt."""


def read_safetensors_header(path: Path) -> dict:
    """Parse a safetensors header without reading tensors; raises ModelDirError if corrupt."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ModelDirError(f"corrupt safetensors file {path}: shorter than its header")
            (size,) = struct.unpack("<Q", raw)
            total = path.stat().st_size
            if size <= 0 or size > total - 8:
                raise ModelDirError(f"corrupt safetensors file {path}: bad header length")
            header = json.loads(f.read(size))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelDirError(f"corrupt safetensors file {path}: {err}") from None
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, TypeError, IndexError, ValueError):
        raise ModelDirError(f"corrupt safetensors file {path}: malformed header") from None
    if 8 + size + end != total:
        raise ModelDirError(f"corrupt safetensors file {path}: size does not match its header (truncated?)")
    return header


def read_meta(path: Path) -> dict:
    meta_path = Path(path) / META_FILE
    if not meta_path.exists():
        return {}
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise ModelDirError(f"corrupt {meta_path}: {err}") from None


def check_model_dir(path: str | Path) -> dict:
    """Validate a model folder (and its base, for run folders); return its metadata."""
    path = Path(path)
    if not path.is_dir():
        raise ModelDirError(f"model folder not found: {path}")
    meta = read_meta(path)
    base = meta.get("base")
    if base:
        base_path = Path(base["path"])
        if not base_path.is_absolute():
            base_path = (path / base_path).resolve()
        check_model_dir(base_path)
        if not (path / UNET_WEIGHTS).exists():
            raise ModelDirError(f"run model folder {path} has no {UNET_WEIGHTS}")
        read_safetensors_header(path / UNET_WEIGHTS)
        return meta
    for needed in ("unet/config.json", UNET_WEIGHTS, "text_encoder/config.json", "scheduler"):
        if not (path / needed).exists():
            raise ModelDirError(f"{path} is not a model folder: missing {needed}")
    for config in ("unet/config.json", "text_encoder/config.json"):
        try:
            json.loads((path / config).read_text())
        except json.JSONDecodeError as err:
            raise ModelDirError(f"corrupt {path / config}: {err}") from None
    for weights in path.glob("*/*.safetensors"):
        read_safetensors_header(weights)
    return meta


def hash_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for p in paths:
        digest.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def model_content_hash(path: str | Path) -> str:
    """Hash of the weights and configs that define the model (run folders include their base)."""
    path = Path(path)
    meta = read_meta(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json")
                   and p.name != META_FILE and "samples" not in p.parts)
    own = hash_files(files)
    base = meta.get("base")
    if base:
        return hashlib.sha256(f"{base['hash']}:{own}".encode()).hexdigest()[:16]
    return own
