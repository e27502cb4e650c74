"""Torch-free checks and hashing of model folders, so bad input fails before torch loads.

A model folder is a full diffusers-style folder (unet/, text_encoder/, tokenizer/,
scheduler/, optional vae/; a Stable Diffusion one loads with StableDiffusionPipeline). A run's
model folder is one too (`self_contained` in its `diffunlearn.json`): its unchanged files are
hard links to its base model's, its UNet weights are complete, `unet_changed.safetensors` holds
the tensors that differ from the base, and `diffunlearn.json` names the base by path and content
hash. Older runs wrote only the changed tensors (in unet/) and need their base to load; such
folders still load.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

META_FILE = "diffunlearn.json"
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
# a run's model folder: the UNet tensors that differ from its base model (the full UNet is in UNET_WEIGHTS)
CHANGED_UNET_WEIGHTS = "unet_changed.safetensors"
# component folders of a model (besides any model_index.json names): what a run's model links from its base
STANDARD_COMPONENTS = ("unet", "text_encoder", "tokenizer", "scheduler", "vae")
TEXT_WEIGHTS = "text_encoder/model.safetensors"
# each component's safetensors file and the pickle its library would fall back to
WEIGHT_FILES = {"unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
                "text_encoder": ("model.safetensors", "pytorch_model.bin"),
                "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# what the content hash reads: every weight format, configs, and the tokenizer's vocabulary files
HASHED_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".msgpack", ".h5", ".onnx", *PICKLE_SUFFIXES)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # what a UNet may predict (scheduler prediction_type)
MAX_BASE_CHAIN = 8  # run folders nest (an attack on an erase run on a model); no real chain is longer
# model_index.json classes diffunlearn loads: Stable Diffusion 1.x/2.x, and its own testbed layout
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "DiffunlearnT2I")
SUPPORTED = ("supported: Stable Diffusion 1.x/2.x (a StableDiffusionPipeline folder, or one .safetensors file "
             "with model.config=FOLDER) and the shipped testbeds")
# the families people try, by the model_index.json class or the folder a layout has that SD lacks
FAMILIES = {"StableDiffusionXL": "SDXL", "Flux": "Flux", "StableDiffusion3": "SD3", "PixArt": "PixArt",
            "Kandinsky": "Kandinsky", "IF": "DeepFloyd IF", "Wuerstchen": "Wuerstchen",
            "StableCascade": "Stable Cascade", "Sana": "Sana", "AuraFlow": "AuraFlow", "HunyuanDiT": "Hunyuan-DiT",
            "Lumina": "Lumina", "LatentConsistency": "LCM", "StableDiffusionInpaint": "SD inpainting",
            "StableDiffusionDepth2Img": "SD depth-to-image", "StableDiffusionUpscale": "SD upscaler"}


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
    meta = _read_json(meta_path)
    base = meta.get("base")
    if base is not None and not (isinstance(base, dict) and isinstance(base.get("path"), str)
                                 and isinstance(base.get("hash"), str)):
        raise ModelDirError(f"corrupt {meta_path}: 'base' must hold a path and a hash")
    return meta


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelDirError(f"corrupt {path}: {_first_line(err)}") from None
    if not isinstance(data, dict):
        raise ModelDirError(f"corrupt {path}: expected a JSON object, got {type(data).__name__}")
    return data


def _first_line(err: BaseException, limit: int = 120) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def base_path_of(path: Path, meta: dict) -> Path:
    base_path = Path(meta["base"]["path"])
    return base_path if base_path.is_absolute() else (path / base_path).resolve()


def component_weights(path: Path, component: str, allow_pickle: bool = False) -> Path:
    """The weights file of a component folder (unet, text_encoder, vae): its safetensors file,
    else its pickle (`.bin`) when `allow_pickle`; ModelDirError otherwise."""
    folder = Path(path) / component
    safe, pickled = WEIGHT_FILES[component]
    for name in (safe, safe + ".index.json"):
        if (folder / name).is_file():
            return folder / name
    if (folder / pickled).is_file():
        if not allow_pickle:
            raise ModelDirError(f"{folder / pickled} is a pickle, which can run code when loaded; convert it to "
                                f"{safe} or pass --allow-pickle (model.allow_pickle=true) to load it with "
                                "torch.load(weights_only=True)")
        return folder / pickled
    raise ModelDirError(f"{path} is not a model folder: missing {component}/{safe}")


def check_model_dir(path: str | Path, allow_pickle: bool = False) -> dict:
    """Validate a model folder (and its base chain, for run folders) without torch; return its
    metadata. Catches what would fail at load: missing parts, corrupt JSON or safetensors
    headers, pickles not allowed, a base chain that loops, a UNet whose input or text width
    does not match its weights or the text encoder."""
    return _check_model_dir(Path(path), allow_pickle, [])


def _check_model_dir(path: Path, allow_pickle: bool, chain: list[Path]) -> dict:
    if not path.is_dir():
        if path.is_file() and path.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth"):
            raise ModelDirError(f"model folder not found: {path} is a single-file checkpoint, which erase and attack "
                                "read with model.config=FOLDER (evaluate the erase run's model/ instead)")
        raise ModelDirError(f"model folder not found: {path}")
    here = path.resolve()
    if here in chain:
        raise ModelDirError(f"model folder {chain[0]} has a base chain that loops back to {path}")
    if len(chain) >= MAX_BASE_CHAIN:
        raise ModelDirError(f"model folder {chain[0]}: base chain longer than {MAX_BASE_CHAIN} folders")
    meta = read_meta(path)
    if meta.get("base") and not meta.get("self_contained"):  # the changed-tensors-only layout of older runs
        _check_model_dir(base_path_of(path, meta), allow_pickle, [*chain, here])
        if not (path / UNET_WEIGHTS).exists():
            raise ModelDirError(f"run model folder {path} has no {UNET_WEIGHTS}")
        read_safetensors_header(path / UNET_WEIGHTS)
        return meta
    check_supported_layout(path)
    unet_config = _read_json(_needed(path, "unet/config.json"))
    text_config = _read_json(_needed(path, "text_encoder/config.json"))
    _check_scheduler(path, _read_json(_needed(path, "scheduler/scheduler_config.json")))
    _check_tokenizer(path)
    weights = {c: component_weights(path, c, allow_pickle) for c in ("unet", "text_encoder")}
    if (path / "vae").exists():
        _read_json(_needed(path, "vae/config.json"))
        weights["vae"] = component_weights(path, "vae", allow_pickle)
    for file in path.glob("*/*.safetensors"):
        read_safetensors_header(file)
    if weights["unet"].suffix == ".safetensors":
        _check_unet_fits(path, unet_config, text_config, read_safetensors_header(weights["unet"]))
    return meta


def check_supported_layout(path: Path) -> None:
    """A folder of a model family diffunlearn does not load (SDXL, Flux, SD3, inpainting...) is
    one line naming what it is and what is supported, before anything else is read."""
    index = path / "model_index.json"
    name = _short(path)
    if index.is_file():
        pipeline = _read_json(index).get("_class_name")
        if isinstance(pipeline, str) and pipeline not in SUPPORTED_PIPELINES:
            family = next((f for prefix, f in FAMILIES.items() if pipeline.startswith(prefix)), None)
            what = f"a {pipeline[:60]} model" + (f" ({family})" if family else "")
            raise ModelDirError(f"{name} holds {what}, which diffunlearn does not load; {SUPPORTED}")
    for part, what in (("text_encoder_2", "a second text encoder (SDXL-style)"),
                       ("transformer", "a diffusion transformer (Flux/SD3-style)")):
        if (path / part).is_dir():
            raise ModelDirError(f"{name} holds {what}, which diffunlearn does not load; {SUPPORTED}")
    unet = path / "unet" / "config.json"
    if unet.is_file():
        config = _read_json(unet)
        if config.get("addition_embed_type"):
            raise ModelDirError(f"{name}/unet takes extra conditioning ({str(config['addition_embed_type'])[:30]}, "
                                f"SDXL-style), which diffunlearn does not load; {SUPPORTED}")
        if config.get("in_channels") != config.get("out_channels", config.get("in_channels")):
            raise ModelDirError(f"{name}/unet takes {config.get('in_channels')} input channels for "
                                f"{config.get('out_channels')} output ones (inpainting/depth-style), which "
                                f"diffunlearn does not load; {SUPPORTED}")


def _short(path: Path, limit: int = 80) -> str:
    text = str(path)
    return text if len(text) <= limit else "..." + text[-(limit - 3):]


def _needed(path: Path, part: str) -> Path:
    if not (path / part).is_file():
        raise ModelDirError(f"{path} is not a model folder: missing {part}")
    return path / part


def _check_scheduler(path: Path, config: dict) -> None:
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ModelDirError(f"{path}/scheduler: prediction_type {str(prediction)[:40]!r} is not supported; supported: "
                            f"{', '.join(PREDICTION_TYPES)}")


def _check_tokenizer(path: Path) -> None:
    folder = path / "tokenizer"
    if not folder.is_dir():
        raise ModelDirError(f"{path} is not a model folder: missing tokenizer/")
    if (folder / "tokenizer_config.json").exists():
        _read_json(folder / "tokenizer_config.json")
    if not ((folder / "tokenizer.json").is_file() or
            ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())):
        raise ModelDirError(f"{folder} holds no tokenizer (tokenizer.json, or vocab.json and merges.txt)")


def _check_unet_fits(path: Path, unet: dict, text: dict, header: dict) -> None:
    """The UNet's first convolution and its cross-attention keys must have the shapes its
    config and the text encoder say (the mismatches a hand-edited or mixed folder has)."""
    conv_in = header.get("conv_in.weight", {}).get("shape")
    channels = unet.get("block_out_channels") or [None]
    expected = [channels[0], unet.get("in_channels")]
    if conv_in and None not in expected and list(conv_in[:2]) != expected:
        raise ModelDirError(f"{path}/unet: config.json (in_channels {expected[1]}, block_out_channels[0] "
                            f"{expected[0]}) does not match its weights (conv_in {conv_in})")
    width = text.get("hidden_size") or text.get("projection_dim")
    cross = unet.get("cross_attention_dim")
    keys = [v.get("shape") for k, v in header.items() if k.endswith("attn2.to_k.weight") and isinstance(v, dict)]
    if keys and isinstance(cross, int) and keys[0][-1] != cross:
        raise ModelDirError(f"{path}/unet: config.json (cross_attention_dim {cross}) does not match its weights "
                            f"(attn2.to_k takes {keys[0][-1]})")
    if keys and isinstance(width, int) and keys[0][-1] != width:
        raise ModelDirError(f"{path}: the text encoder's width {width} does not match the UNet's cross-attention "
                            f"({keys[0][-1]})")


def hash_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for p in paths:
        digest.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def model_components(path: Path) -> list[str]:
    """The component folders of a model folder: the standard five that exist and every other
    one its model_index.json names with a class (a hub folder's safety_checker, feature_extractor)."""
    names = [c for c in STANDARD_COMPONENTS if (path / c).is_dir()]
    index = path / "model_index.json"
    if index.is_file():
        for key, value in _read_json(index).items():
            if (isinstance(value, list) and value and value[0] is not None and key not in names
                    and (path / key).is_dir() and "/" not in key and not key.startswith(".")):
                names.append(key)
    return names


def model_content_hash(path: str | Path) -> str:
    """Hash of the weights and configs that define the model (run folders include their base):
    every weight file in any format, so two folders that differ only in a `.bin` differ here.
    Top-level files other than JSON (notes, recipes, curves) do not define the model."""
    path = Path(path)
    meta = read_meta(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in HASHED_SUFFIXES
                   and (p.suffix == ".json" or p.parent != path) and p.name != META_FILE
                   and "samples" not in p.parts and not p.name.startswith("."))
    own = hash_files(files)
    base = meta.get("base")
    if base:
        return hashlib.sha256(f"{base['hash']}:{own}".encode()).hexdigest()[:16]
    return own
