"""Typed configuration: built-in defaults < profile < YAML file < command-line `key=value`.

Every model forbids unknown keys (a typo is an error with a did-you-mean before any model
loads), rejects NaN and infinities, and never takes a boolean for a number. YAML is read
with bounds on size, nesting and alias expansion, so a hostile file fails in one short line.
This module never imports torch.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from diffunlearn.backends.base import PARAM_GROUPS

CONFIG_DIR = Path(__file__).parent / "configs"
MAX_CONFIG_BYTES = 1 << 20  # a config file is a few hundred bytes; 1 MiB is far beyond any real one
MAX_YAML_DEPTH = 32  # nesting levels (a config uses three)
MAX_YAML_NODES = 10_000  # values after alias expansion (a config has a few dozen)
MAX_SEED = 2**63 - 1  # torch.manual_seed takes at most 2**64 - 1; sampling adds image indices
ECHO_CHARS = 60  # how much of a user's value an error message repeats
PATH_CHARS = 120  # and of a path


class ConfigError(ValueError):
    """A configuration the user wrote that cannot be used; the message is one line."""


def shown(value: Any, limit: int = ECHO_CHARS) -> str:
    """A value as an error message repeats it: its text (strings) or repr, on one line, at most
    `limit` characters (the middle cut out)."""
    text = " ".join((value if isinstance(value, str) else repr(value)).split())
    if len(text) <= limit:
        return text
    tail = (limit - 3) // 3  # keep both ends: a path's file name, a list's closing bracket
    return text[: limit - 3 - tail] + "..." + text[len(text) - tail:]


def did_you_mean(name: str, choices: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def _admits_bool(annotation: Any) -> bool:
    if annotation is bool or annotation is Any:
        return True
    origin = get_origin(annotation)
    if origin is Literal:
        return any(isinstance(a, bool) for a in get_args(annotation))
    if origin is Annotated:
        return _admits_bool(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return any(_admits_bool(a) for a in get_args(annotation))
    return False


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(),
                              allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic reads `true` as 1 for an int or float field; a boolean there is a mistake."""
        if isinstance(value, bool) and not _admits_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError("expected a number or text, not a boolean")
        return value


# ---- YAML and overrides -------------------------------------------------------------------

class YAMLLimitError(yaml.YAMLError):
    """YAML beyond the bounds a config can need (nesting, alias expansion)."""


class BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no Python tags) with two bounds: nesting depth, checked while
    composing (the composer recurses, so 20,000 brackets would hit Python's recursion limit),
    and the number of values after alias expansion (a 'billion laughs' file of a few hundred
    bytes expands to millions of values, and error messages or hashing would expand them)."""

    _depth = 0

    def compose_node(self, parent, index):
        if self._depth >= MAX_YAML_DEPTH:
            raise YAMLLimitError(f"nested deeper than {MAX_YAML_DEPTH} levels")
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _check_expanded_size(node)
        return node


def _node_children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_expanded_size(root: yaml.Node) -> None:
    """Count the values of the tree that aliases expand to (iteratively, memoised per node)
    and refuse more than MAX_YAML_NODES, deeper than MAX_YAML_DEPTH, or a cycle."""
    done: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded size, expanded depth)
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            children = _node_children(node)
            size = 1 + sum(done[id(c)][0] for c in children)
            depth = 1 + max((done[id(c)][1] for c in children), default=0)
            if size > MAX_YAML_NODES:
                raise YAMLLimitError(f"expands to more than {MAX_YAML_NODES} values (YAML aliases)")
            if depth > MAX_YAML_DEPTH:
                raise YAMLLimitError(f"nested deeper than {MAX_YAML_DEPTH} levels (YAML aliases)")
            done[key] = (size, depth)
            open_nodes.discard(key)
            continue
        if key in done:
            continue
        if key in open_nodes:
            raise YAMLLimitError("holds a recursive alias")
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _node_children(node) if id(c) not in done)


def parse_yaml(text: str) -> Any:
    """YAML text -> data, safely (no Python tags) and within the bounds of BoundedLoader."""
    return yaml.load(text, Loader=BoundedLoader)  # BoundedLoader is a SafeLoader


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a mapping; ConfigError (one line) for anything else."""
    path = Path(path)
    name = shown(str(path), PATH_CHARS)
    if path.is_dir():
        raise ConfigError(f"config file {name} is a directory")
    if not path.is_file():
        raise ConfigError(f"config file not found: {name}")
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {name} is {size} bytes; a config is at most "
                              f"{MAX_CONFIG_BYTES} bytes")
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read config file {name}: {err.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {name} is not UTF-8 text (byte {raw[err.start]:#04x} at "
                          f"offset {err.start})") from None
    try:
        data = parse_yaml(text)
    except YAMLLimitError as err:
        raise ConfigError(f"config file {name} {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or err
        raise ConfigError(f"malformed YAML in {name}{where}: {shown(str(problem), 120)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"malformed config {name}: the top level must be a mapping, "
                          f"got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """'method.lr=1e-5' -> (['method', 'lr'], 1e-5); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"bad override '{shown(text)}': expected key=value (e.g. method.lr=1e-5)")
    key, raw = text.split("=", 1)
    if not key or any(not part.strip() for part in key.split(".")):
        raise ConfigError(f"bad override '{shown(text)}': empty key")
    try:
        value = parse_yaml(raw) if raw != "" else ""
    except YAMLLimitError as err:
        raise ConfigError(f"bad override '{shown(text)}': the value {err}") from None
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


def validation_message(err: ValidationError, prefix: str = "", model: type[BaseModel] | None = None) -> str:
    """One line naming the first bad key and why (pydantic's own text is multi-line); an
    unknown key gets a did-you-mean from the fields of the section it is in."""
    first = err.errors()[0]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, ConfigError):
        return str(cause)  # a validator's own one-line message (e.g. a bad eval.evaluator)
    loc = ".".join(str(p) for p in first["loc"])
    key = f"{prefix}{loc}" if loc else prefix.rstrip(".") or "config"
    if first["type"] == "extra_forbidden":
        fields = _fields_at(model, first["loc"][:-1]) if model is not None else []
        hint = did_you_mean(str(first["loc"][-1]), fields, key[: len(key) - len(str(first["loc"][-1]))])
        return f"unknown config key '{shown(key)}'{hint}"
    message = first["msg"].replace("Value error, ", "")
    return f"bad value for '{shown(key)}': {shown(message, 120)} (got {shown(repr(first.get('input')))})"


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names of the (nested) model at `loc` inside `model`."""
    for part in loc:
        field = model.model_fields.get(str(part))
        inner = field.annotation if field is not None else None
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            return []
        model = inner
    return list(model.model_fields)


def check_keys(data: dict[str, Any], valid: tuple[str, ...], where: str = "top-level",
               sections: dict[str, type[BaseModel]] | None = None) -> None:
    """Every key of `data` must be one of `valid`; an unknown one gets a did-you-mean, or, when it
    is a field of one of `sections` (e.g. `lr` of method), the dotted key it was meant to be."""
    for key in data:
        if key in valid:
            continue
        name = str(key)
        hint = did_you_mean(name, list(valid))
        if not hint and sections:
            owners = [section for section, model in sections.items() if name in model.model_fields]
            if owners:
                hint = f" (did you mean '{owners[0]}.{name}'?)"
        raise ConfigError(f"unknown config key '{shown(name)}'{hint}; valid {where} keys: {', '.join(valid)}")


def build(model: type[StrictModel], data: dict[str, Any], prefix: str = "") -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(validation_message(err, prefix, model)) from None


def config_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False)


# ---- shared sections ----------------------------------------------------------------------

MAX_BATCH = 4096  # images per batch: beyond any CPU or GPU memory at SD scale, and a typo's bound


class TrainConfig(StrictModel):
    """The shared loop's settings (engine/loop.py); a method's profile sets its defaults."""

    steps: int = Field(200, ge=0, le=10_000_000, description="optimizer steps")
    lr: float = Field(1e-4, gt=0, description="learning rate")
    batch_size: int = Field(4, ge=1, le=MAX_BATCH, description="images per term per step")
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm (> 0; a negative one would "
                                    "turn descent into ascent); null disables")
    warmup: int = Field(0, ge=0, le=10_000_000)
    schedule: Literal["constant", "cosine"] = "constant"
    param_group: Literal[PARAM_GROUPS] = Field(
        "xattn", description="which UNet weights train (backends/base.py PARAM_GROUPS)")
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(5, ge=1)
    bf16: bool = Field(False, description="bf16 autocast for UNet forwards (mixed precision; the weights, their "
                       "gradients and the optimizer stay float32)")
    fp16: bool = Field(False, description="fp16 autocast for UNet forwards with dynamic loss scaling (torch.amp."
                       "GradScaler: steps whose scaled gradients overflow are skipped and the scale halved), for "
                       "GPUs without bf16; the weights, their gradients and the optimizer stay float32")
    gradient_checkpointing: bool = Field(False, description="recompute the UNet's activations in the backward pass: "
                                         "less GPU memory, about a third more time, the same numbers (so not part "
                                         "of the run id)")

    @model_validator(mode="after")
    def _one_mixed_precision(self) -> TrainConfig:
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are alternatives; set at most one")
        return self


class TaskConfig(StrictModel):
    """D_f and D_r (data/tasks.py) over a concept set (data/concepts.py)."""

    forget: list[str] = Field(default_factory=list, description="concepts to erase")
    retain: list[str] | None = Field(None, min_length=1, description="retain concepts (at least one); default: "
                                     "every other concept of the set")
    concepts: str | None = Field(None, description="concept set: a built-in name (canvas) or a YAML file; default: "
                                 "the shipped testbeds' canvas, else a free-text set of the forget/retain names")
    domain: str = Field("concept", description="domain of free-text concepts, which picks their default prompt "
                        "templates: concept | style | object | celebrity | nudity")
    anchor: str | None = Field(None, description="text or concept the forget concepts are steered to (CORE, CA, "
                               "SalUn, DiMUM...); default: the anchor scheme, else the empty prompt")
    images_per_prompt: int = Field(3, ge=1, le=1000, description="first n images of each training prompt (CORE: 3 "
                                   "per style-object pair)")
    anchor_scheme: str = Field("auto", description="auto | next | fixed:NAME | one-to-one | all-to-one | "
                               "five-to-one | one-to-all | one-to-five (auto: a concept's own anchor, else "
                               "one-to-one onto retain concepts, else the empty prompt)")
    seed: int = Field(0, ge=0, le=MAX_SEED)

    @field_validator("forget", "retain")
    @classmethod
    def _no_duplicates(cls, names: list[str] | None) -> list[str] | None:
        twice = sorted({n for n in names or [] if names.count(n) > 1})
        if twice:
            raise ValueError(f"lists {shown(twice[0])} twice")
        return names


class EvalConfig(StrictModel):
    """The evaluation protocol of TESTBED.md."""

    images_per_prompt: int = Field(3, ge=1, le=1000)
    partial_images: int = Field(12, ge=0, le=10_000, description="images for each partial forget prompt")
    forget_images_per_prompt: int | None = Field(
        None, ge=1, le=10_000, description="images for each full forget prompt (UA's and AR's denominator: one "
        "image moves AR by 100 / their count); default: images_per_prompt")
    seed: int = Field(1000, ge=0, le=MAX_SEED - 10**9, description="first sampling seed; identical before and after")
    steps: int = Field(25, ge=1, le=1000, description="DDIM steps")
    guidance: float | None = Field(None, description="CFG scale; default: the model's recorded one")
    bootstrap: int = Field(1000, ge=0, le=100_000, description="bootstrap resamples for confidence intervals")
    fid_reference_per_pair: int = Field(4, ge=1, le=1000, description="held-out real images per retain pair")
    batch_size: int = Field(128, ge=1, le=MAX_BATCH)
    enabled: bool = True
    evaluator: str | None = Field(
        None, description="how generations are judged: canvas[:DIR] | clip:PATH | nudenet[:FILE.onnx] | "
        "classifier:PATH | none (see `diffunlearn ls evaluators`); default: the concept set's "
        "(canvas: the shipped CNNs)")
    fid_features: str = Field("evaluator", description="FID/KID feature space: evaluator (its own) | "
                              "inception:FILE.pth (pytorch-fid's Inception weights) | none")
    prompts: str | None = Field(None, description="CSV of forget prompts replacing the plan's (I2P columns prompt, "
                                "evaluation_seed, evaluation_guidance; optional concept)")
    nudenet_threshold: float = Field(0.0, ge=0, le=1, description="minimum NudeNet score that counts as exposed "
                                     "(the detector drops scores < 0.2 itself; ESD and MACE count all it returns)")

    @property
    def forget_images(self) -> int:
        """Images for each full forget prompt."""
        return self.forget_images_per_prompt or self.images_per_prompt

    @model_validator(mode="before")
    @classmethod
    def _renamed_evaluators(cls, data: Any) -> Any:
        if isinstance(data, dict) and "evaluators" in data:
            raise ConfigError("eval.evaluators=DIR is now eval.evaluator=canvas:DIR")
        return data

    @field_validator("evaluator")
    @classmethod
    def _evaluator_spec(cls, value: str | None) -> str | None:
        from diffunlearn.metrics.evaluators.spec import parse_evaluator

        parse_evaluator(value)  # a bad name or a missing PATH: a one-line error before any model loads
        return value

    @field_validator("fid_features")
    @classmethod
    def _fid_features_spec(cls, value: str) -> str:
        from diffunlearn.metrics.evaluators.spec import parse_fid_features

        parse_fid_features(value)
        return value


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
