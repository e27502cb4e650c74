"""Typed configuration: built-in defaults < profile < YAML file < command-line `key=value`.

Every model forbids unknown keys, so a typo is an error before any model loads. This module
never imports torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A configuration the user wrote that cannot be used; the message is one line."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# ---- YAML and overrides -------------------------------------------------------------------

def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"malformed YAML in {path}{where}: {getattr(err, 'problem', err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"malformed config {path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """'method.lr=1e-5' -> (['method', 'lr'], 1e-5); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"bad override '{text}': expected key=value (e.g. method.lr=1e-5)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"bad override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _looks_like_float(value):
        value = float(value)  # YAML 1.1 reads '1e-5' as a string
    return key.split("."), value


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return any(c in text.lower() for c in "e.") and not text.lower().startswith(("nan", "inf"))


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = dict(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for k in keys[:-1]:
            child = node.get(k)
            node[k] = dict(child) if isinstance(child, dict) else {}
            node = node[k]
        node[keys[-1]] = value
    return out


def validation_message(err: ValidationError, prefix: str = "") -> str:
    """One line naming the first bad key and why (pydantic's own text is multi-line)."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    key = f"{prefix}{loc}" if loc else prefix.rstrip(".") or "config"
    if first["type"] == "extra_forbidden":
        return f"unknown config key '{key}'"
    return f"bad value for '{key}': {first['msg']} (got {first.get('input')!r})"


def build(model: type[StrictModel], data: dict[str, Any], prefix: str = "") -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(validation_message(err, prefix)) from None


def config_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False)


# ---- shared sections ----------------------------------------------------------------------

class TrainConfig(StrictModel):
    """The shared loop's settings (engine/loop.py); a method's profile sets its defaults."""

    steps: int = Field(200, ge=0, description="optimizer steps")
    lr: float = Field(1e-4, gt=0, description="learning rate")
    batch_size: int = Field(4, ge=1, description="images per term per step")
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, description="max gradient norm; null disables")
    warmup: int = Field(0, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    param_group: Literal["xattn", "xattn-kv", "noxattn", "full"] = Field(
        "xattn", description="which UNet weights train (backends/base.py PARAM_GROUPS)")
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(5, ge=1)
    bf16: bool = Field(False, description="bf16 autocast for UNet forwards")


class TaskConfig(StrictModel):
    """D_f and D_r (data/tasks.py)."""

    forget: list[str] = Field(default_factory=list, description="concepts to erase")
    retain: list[str] | None = Field(None, description="retain concepts; default: every other concept")
    images_per_pair: int = Field(3, ge=1, description="first n images of each style-object pair (CORE: 3)")
    anchor_scheme: str = Field("one-to-one", description="next | fixed:NAME | one-to-one | all-to-one | "
                               "five-to-one | one-to-all | one-to-five")
    seed: int = 0


class EvalConfig(StrictModel):
    """The evaluation protocol of TESTBED.md."""

    images_per_prompt: int = Field(3, ge=1)
    partial_images: int = Field(12, ge=0, description="images for each partial forget prompt")
    seed: int = Field(1000, description="first sampling seed; identical before and after")
    steps: int = Field(25, ge=1, description="DDIM steps")
    guidance: float | None = Field(None, description="CFG scale; default: the model's recorded one")
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples for confidence intervals")
    fid_reference_per_pair: int = Field(4, ge=1, description="held-out real images per retain pair")
    batch_size: int = Field(128, ge=1)
    enabled: bool = True
    evaluators: str | None = Field(None, description="evaluator folder; default: the shipped classifiers")


class PretrainArch(StrictModel):
    image_size: int = 16
    channels: list[int] = [32, 64, 64]
    layers_per_block: int = 1
    heads: int = 2
    norm_groups: int = 8
    text_dim: int = 64
    text_layers: int = 2
    max_length: int = 12
    guidance_scale: float = 3.0


class PretrainData(StrictModel):
    seed: int = 0
    images_per_pair: int = 300
    p_empty: float = 0.1
    exclude: list[str] = Field(default_factory=list, description="concepts left out (retrain)")


class PretrainTrain(StrictModel):
    steps: int = 10000
    batch_size: int = 64
    lr: float = 6e-4
    optimizer: Literal["adam", "adamw"] = "adamw"
    weight_decay: float = 0.01
    warmup: int = 300
    schedule: Literal["constant", "cosine"] = "cosine"
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    min_snr_gamma: float | None = Field(5.0, description="Min-SNR-gamma loss weighting (Hang et al. 2023); "
                                        "null: the plain epsilon loss")
    bf16: bool = True
    seed: int = 0
    checkpoint_every: int = 500


class PretrainModelConfig(StrictModel):
    arch: PretrainArch = PretrainArch()
    data: PretrainData = PretrainData()
    train: PretrainTrain = PretrainTrain()


class PretrainEvaluatorConfig(StrictModel):
    seed: int = 0
    images_per_pair: int = 100
    heldout_per_pair: int = 20
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    noise_std: float = 0.08
    feature_dim: int = 32
    width: int = 32


# ---- the Stable Diffusion-layout testbed (testbed-sd) ------------------------------------------

class SDTokenizerConfig(StrictModel):
    vocab_size: int = Field(1280, ge=600, description="CLIP-format vocabulary: 512 byte symbols, the merges, "
                            "2 specials")
    max_token_length: int | None = Field(8, ge=2, description="longest merged token (characters): longer "
                                         "concept names stay several tokens; null: no cap")
    context_length: int = Field(77, ge=8, description="tokens per prompt (model_max_length; Stable Diffusion: 77)")


class VAEArch(StrictModel):
    image_size: int = 16
    channels: list[int] = Field([32, 64], description="one entry per resolution; each after the first halves it")
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_groups: int = 8
    mid_attention: bool = True


class PretrainVAEConfig(StrictModel):
    arch: VAEArch = VAEArch()
    seed: int = 0
    images_per_pair: int = 100
    heldout_per_pair: int = 10
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    kl_weight: float = Field(1e-4, ge=0, description="weight of the KL term per latent value (reconstruction: "
                             "mean absolute error per pixel value)")
    checkpoint_every: int = 500


class SDArch(StrictModel):
    image_size: int = 16
    channels: list[int] = [32, 64, 64]
    attention_from: int = Field(1, ge=0, description="first UNet level (0: the full latent grid) with "
                                "cross-attention")
    layers_per_block: int = 1
    heads: int = Field(2, description="attention heads (diffusers' attention_head_dim)")
    norm_groups: int = 8
    text_dim: int = 64
    text_layers: int = 2
    beta_schedule: Literal["squaredcos_cap_v2", "scaled_linear", "linear"] = "squaredcos_cap_v2"
    guidance_scale: float = 3.0


class PretrainSDModelConfig(StrictModel):
    """testbed-sd's recipe: the VAE (trained first, then frozen), the tokenizer, then the UNet
    and text encoder on the shared pretraining data and loop settings."""

    tokenizer: SDTokenizerConfig = SDTokenizerConfig()
    vae: PretrainVAEConfig = PretrainVAEConfig()
    arch: SDArch = SDArch()
    data: PretrainData = PretrainData()
    train: PretrainTrain = PretrainTrain()
