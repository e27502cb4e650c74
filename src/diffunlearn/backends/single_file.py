"""Single-file Stable Diffusion checkpoints (`sd-v1-4.safetensors`, `v2-1_768-ema-pruned.ckpt`).

Such a file holds the original (LDM) weights of every component but no configs, so it comes
with a local config folder (`model.config=FOLDER`: a Stable Diffusion folder's model_index.json,
*/config.json, scheduler and tokenizer files; weights there are not read). diffusers'
`StableDiffusionPipeline.from_single_file(file, config=FOLDER, local_files_only=True)` converts
it, with the hub switched off; the result is saved once as a diffusers folder in the cache,
keyed by the file (path, size, modification time) and the config folder's content, and from
then on the file is that folder to every run.

Pickles (`.ckpt`, `.pt`, `.pth`, `.bin`) are refused unless the user allows them, and then read
only by torch.load(weights_only=True), which cannot run code, and re-saved as safetensors
before diffusers sees them, so no other loader ever unpickles them.

The checks run without torch; only `converted_folder` imports it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from diffunlearn.backends.model_dir import (
    META_FILE,
    PICKLE_SUFFIXES,
    SUPPORTED,
    ModelDirError,
    check_supported_layout,
    hash_files,
    read_safetensors_header,
)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
CONFIG_PARTS = ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                "scheduler/scheduler_config.json")


def is_single_file(path: str | Path) -> bool:
    path = Path(path)
    return path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES


def check_single_file(path: Path, config: str | Path | None, allow_pickle: bool) -> Path:
    """Validate a single-file checkpoint and its config folder without torch; return the folder."""
    name = _short(path)
    if config is None:
        raise ModelDirError(f"{name} is a single-file checkpoint: give the Stable Diffusion folder its configs come "
                            "from with model.config=FOLDER (model_index.json, */config.json, scheduler/, tokenizer/)")
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise ModelDirError(f"{name} is a pickle, which can run code when loaded; convert it to .safetensors or pass "
                            "--allow-pickle (model.allow_pickle=true) to read it with torch.load(weights_only=True)")
    if path.suffix.lower() == ".safetensors":
        header = read_safetensors_header(path)
        if not any(k.startswith("model.diffusion_model.") for k in header):
            raise ModelDirError(f"{name} holds no Stable Diffusion UNet (no model.diffusion_model.* weights); "
                                f"{SUPPORTED}")
    folder = Path(config)
    if not folder.is_dir():
        raise ModelDirError(f"config folder not found: {_short(folder)} (model.config)")
    check_supported_layout(folder)
    for part in CONFIG_PARTS:
        if not (folder / part).is_file():
            raise ModelDirError(f"config folder {_short(folder)} lacks {part}; model.config must be a Stable Diffusion "
                                "folder (its weights are not needed)")
    tokenizer = folder / "tokenizer"
    if not ((tokenizer / "tokenizer.json").is_file()
            or ((tokenizer / "vocab.json").is_file() and (tokenizer / "merges.txt").is_file())):
        raise ModelDirError(f"config folder {_short(folder)} holds no CLIP tokenizer (tokenizer/tokenizer.json, or "
                            "vocab.json and merges.txt)")
    return folder


def cache_key(path: Path, config: Path) -> str:
    """The file by path, size and modification time (re-reading gigabytes to hash them on every
    run costs minutes), and the config folder by content."""
    stat = path.stat()
    configs = sorted(p for p in config.rglob("*") if p.is_file() and p.suffix in (".json", ".txt"))
    text = json.dumps([str(path.resolve()), stat.st_size, stat.st_mtime_ns, hash_files(configs)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def converted_folder(path: Path, config: Path, allow_pickle: bool, cache: Path) -> Path:
    """The diffusers folder of a single-file checkpoint, converted once into `cache/models`."""
    check_single_file(path, config, allow_pickle)
    folder = cache / "models" / cache_key(path, config)
    if (folder / META_FILE).is_file():
        return folder
    staging = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _convert(path, config, staging)
        try:
            os.replace(staging, folder)
        except OSError:  # another process converted it meanwhile
            if not (folder / META_FILE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _convert(path: Path, config: Path, out: Path) -> None:
    import pickle

    from safetensors import SafetensorError

    source = path
    try:
        if path.suffix.lower() != ".safetensors":
            source = out / ".checkpoint.safetensors"
            _pickle_to_safetensors(path, source)
        with _hub_offline():
            from diffusers import StableDiffusionPipeline

            from diffunlearn.backends.diffusers_t2i import _quiet_hub_progress

            _quiet_hub_progress()
            pipe = StableDiffusionPipeline.from_single_file(
                str(source), config=str(config), local_files_only=True, safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)
        pipe.save_pretrained(str(out), safe_serialization=True)
    except ModelDirError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError, pickle.UnpicklingError,
            SafetensorError) as err:
        text = " ".join(str(err).split())[:140] or type(err).__name__
        raise ModelDirError(f"cannot convert {_short(path, 60)} with config {_short(config, 40)}: "
                            f"{type(err).__name__}: {text}") from None
    finally:
        if source != path:
            source.unlink(missing_ok=True)
    meta = {"kind": "diffusers", "guidance_scale": 7.5, "sample_steps": 50, "latent": True,
            "converted_from": {"file": str(path.resolve()), "config": str(config.resolve())}}
    (out / META_FILE).write_text(json.dumps(meta, indent=2))


def _pickle_to_safetensors(path: Path, target: Path) -> None:
    """Read a pickled checkpoint with torch.load(weights_only=True) (it admits tensors and plain
    containers only, never code) and write its tensors as safetensors."""
    import torch
    from safetensors.torch import save_file

    state = torch.load(path, map_location="cpu", weights_only=True)
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # Lightning's checkpoint wraps the weights
    if not isinstance(state, dict):
        raise ModelDirError(f"{_short(path)} does not hold a state dict")
    tensors, seen = {}, set()
    for key, value in state.items():
        if isinstance(key, str) and torch.is_tensor(value):
            shared = value.untyped_storage().data_ptr() in seen  # safetensors refuses shared storage
            seen.add(value.untyped_storage().data_ptr())
            tensors[key] = value.clone() if shared else value.contiguous()
    if not tensors:
        raise ModelDirError(f"{_short(path)} holds no tensors")
    save_file(tensors, str(target))


class _hub_offline:
    """No request to the Hugging Face hub while converting, whatever the environment says."""

    def __enter__(self):
        from huggingface_hub import constants

        self.saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        self.constant = constants.HF_HUB_OFFLINE  # read once at import: the variable alone is not enough
        os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        constants.HF_HUB_OFFLINE = True
        return self

    def __exit__(self, *exc):
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = self.constant
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _short(path: Path, limit: int = 80) -> str:
    text = str(path)
    return text if len(text) <= limit else "..." + text[-(limit - 3):]
