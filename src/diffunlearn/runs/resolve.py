"""Resolving and validating a run's configuration, all before torch is imported and before
anything is written (the run directory's life is in runs/common.py).

Precedence: the method's built-in defaults < its profile (`paper` or `testbed`) < the YAML
file < command-line flags and `key=value` overrides. Every key given takes effect or is an
error; a user's `steps` replaces a profile's `epochs`. The run id hashes the resolved
config, the model's content hash and the package versions (not the output path, thread
count or whether pickles may be read), so a finished run is recognised and an interrupted
one resumes.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import Field

from diffunlearn.backends.model_dir import ModelDirError, check_model_dir, model_content_hash
from diffunlearn.backends.single_file import is_single_file
from diffunlearn.config import (
    MAX_SEED,
    ConfigError,
    EvalConfig,
    StrictModel,
    TaskConfig,
    TrainConfig,
    apply_overrides,
    build,
    check_keys,
    config_hash,
    deep_merge,
    did_you_mean,
    load_yaml,
    shown,
)
from diffunlearn.data.concepts import ConceptSet, resolve_concept_set
from diffunlearn.data.tasks import TaskError, build_anchor_map

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TESTBED_DIR = ASSETS / "testbed"
# the models shipped inside the package, by the short names `--model` accepts; the first is the default
SHIPPED_MODELS = {
    "testbed": (TESTBED_DIR, "pixel-space UNet on 16x16 canvas images, word-level tokenizer (the default)"),
    "testbed-sd": (ASSETS / "testbed-sd", "Stable Diffusion layout: AutoencoderKL latents 4x8x8, CLIP BPE "
                   "tokenizer, UNet2DConditionModel; loads with StableDiffusionPipeline"),
}
TESTBED_KINDS = ("testbed", "testbed-sd")
PROFILES = ("paper", "testbed")
TOP_LEVEL_KEYS = ("method", "task", "eval", "model", "seed")
MAX_THREADS = 1024


class RunDirError(ValueError):
    """The output directory holds something we must not overwrite, or is in use."""


class RunDirBusy(RunDirError):
    """The output directory is in use: another process holds its lock (a grid runner waits and
    comes back; a command exits 2 like for any other RunDirError)."""


def check_threads(threads: int | None) -> None:
    """`--threads`: None (torch's default) or a positive count; checked before anything loads."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise ConfigError(f"bad value for --threads: expected an integer from 1 to {MAX_THREADS}, "
                          f"got {shown(repr(threads))}")


def package_versions() -> dict[str, str]:
    """The versions a run id pins (a copy: callers may keep it in their configs)."""
    return dict(_package_versions())


@functools.cache
def _package_versions() -> dict[str, str]:
    out = {}
    for name in ("diffunlearn", "torch", "diffusers", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def default_model_dir() -> Path:
    return TESTBED_DIR


def model_folder(path: str | Path | None) -> Path:
    """The model folder a `--model` value stands for: a shipped model's short name (`testbed`,
    `testbed-sd`) its folder in the package, a run directory its model/ folder once the run is
    complete (a running one's model/ may be half written or belong to nothing yet), any other
    path itself. A value that is neither a shipped name nor an existing path but looks like a
    name (no path separator) is an UnknownNameError listing the shipped models."""
    if not path:
        return default_model_dir()
    text = str(path)
    if not Path(text).exists():
        if text in SHIPPED_MODELS:
            return SHIPPED_MODELS[text][0]
        if "/" not in text and "\\" not in text and not text.startswith("."):
            from diffunlearn.registry import UnknownNameError

            err = UnknownNameError("model", text, list(SHIPPED_MODELS))
            err.message += " (or the path of a model folder or run directory)"
            raise err
    path = Path(text)
    marker = path / "run.json"
    if marker.is_file():
        info = read_marker(marker)
        if info is None:
            raise ModelDirError(f"{path} holds a corrupt run.json; it cannot be used as a model")
        if info.get("status") != "complete":
            raise ModelDirError(f"{path} is a run that is not complete (status {shown(info.get('status'), 20)}); "
                                "rerun its command to finish it, then use it as a model")
        if (path / "model").is_dir():
            return path / "model"
    return path


def read_marker(marker: Path) -> dict[str, Any] | None:
    """A run.json's content, or None if it is not a JSON object."""
    try:
        info = json.loads(marker.read_bytes())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def is_testbed(model_dir: Path, meta: dict) -> bool:
    """A shipped testbed or a model trained by its recipe: the `testbed` profiles apply."""
    return meta.get("kind") in TESTBED_KINDS or any(
        Path(model_dir).resolve() == folder.resolve() for folder, _ in SHIPPED_MODELS.values())


class ModelSection(StrictModel):
    path: str | None = Field(None, description="model folder, run directory or single-file checkpoint "
                             "(.safetensors; .ckpt with allow_pickle); default: the shipped testbed")
    allow_pickle: bool = Field(False, description="load .bin/.ckpt (pickle) weights with torch.load(weights_only=True) "
                               "where there is no safetensors file")
    config: str | None = Field(None, description="for a single-file checkpoint: the Stable Diffusion folder its "
                               "configs and tokenizer come from (its weights are not read)")


class SeedSection(StrictModel):
    seed: int = Field(0, ge=0, le=MAX_SEED, description="training seed")


@dataclass
class ResolvedRun:
    """Everything needed to run an erase, validated; nothing has been written yet."""

    method: str
    method_config: Any  # the method's MethodConfig subclass instance
    profile: str
    task: TaskConfig
    eval: EvalConfig
    model_dir: Path
    model_hash: str
    seed: int
    concept_set: ConceptSet
    allow_pickle: bool = False  # how the model may be loaded; not part of the run id
    versions: dict[str, str] = field(default_factory=package_versions)

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": {"name": self.method, "profile": self.profile, **self.method_config.model_dump()},
            "task": self.task.model_dump(),
            "concept_set": self.concept_set.describe(),
            "eval": self.eval.model_dump(),
            "model": model_entry(self.model_dir, self.model_hash, self.allow_pickle),
            "seed": self.seed,
        }

    @property
    def run_id(self) -> str:
        data = self.as_dict()
        data["model"] = {"hash": self.model_hash}  # the path may differ between machines
        _drop_resource_settings(data["method"])
        _drop_unset_additions(data["eval"])
        return config_hash({"config": data, "versions": self.versions})

    def default_out(self) -> Path:
        return Path("runs") / f"{self.method}-{self.run_id}"


# settings that change memory or speed but not a single number of the result: like --threads and
# --device they are recorded in config.yaml but not hashed into the run id
RESOURCE_SETTINGS = ("gradient_checkpointing",)


# eval settings added after runs existed whose unset value (None) reproduces the earlier protocol
# exactly: left out of the run id while unset, so that finished and cached runs keep their ids
NEUTRAL_WHEN_UNSET = ("forget_images_per_prompt",)


def _drop_resource_settings(section: dict[str, Any]) -> None:
    for key in RESOURCE_SETTINGS:
        section.pop(key, None)


def _drop_unset_additions(eval_section: dict[str, Any]) -> dict[str, Any]:
    for key in NEUTRAL_WHEN_UNSET:
        if eval_section.get(key) is None:
            eval_section.pop(key, None)
    return eval_section


def eval_identity(eval_cfg: EvalConfig) -> dict[str, Any]:
    """What of an evaluation protocol is hashed (run ids, the evaluation cache)."""
    return _drop_unset_additions(eval_cfg.model_dump())


def model_entry(model_dir: Path, model_hash: str, allow_pickle: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"path": str(model_dir), "hash": model_hash}
    if allow_pickle:
        entry["allow_pickle"] = True
    return entry


def read_config_file(config_file: str | Path | None, keys: tuple[str, ...] = TOP_LEVEL_KEYS) -> dict[str, Any]:
    data = load_yaml(config_file) if config_file else {}
    check_keys(data, keys)
    return data


def merged_config(config_file: str | Path | None, keys: tuple[str, ...], flags: dict[str, Any],
                  overrides: list[str] | None, sections: dict[str, Any]) -> dict[str, Any]:
    """The YAML file < flags < `key=value` overrides, with every top-level key known (an
    override such as `lr=5` or `metod.lr=5` is an error naming the key it was meant to be)."""
    data = read_config_file(config_file, keys)
    if isinstance(data.get("model"), str):  # `model: PATH` is short for `model: {path: PATH}`
        data["model"] = {"path": data["model"]}
    data = apply_overrides(deep_merge(data, flags), overrides or [])
    check_keys(data, keys, sections=sections)
    return data


def named_section(data: dict[str, Any], key: str, given: str | None, registry) -> tuple[str, dict[str, Any]]:
    """The component named on the command line (`given`) or in section `key` (a name or a mapping
    with `name`), checked against `registry`, and the section's other settings."""
    section = data.get(key) or {}
    if isinstance(section, str):
        section = {"name": section}
    if not isinstance(section, dict):
        raise ConfigError(f"config key '{key}' must be a mapping (name, profile and hyperparameters)")
    section = dict(section)
    name = given or section.get("name")
    if not name:
        raise ConfigError(f"no {registry.kind} given; valid {registry.kind}s: {', '.join(registry.names())}")
    if given and section.get("name") not in (None, given):
        raise ConfigError(f"the config names {registry.kind} '{section['name']}' but the command line '{given}'")
    registry.check(name)
    section.pop("name", None)
    return name, section


def resolve_model(data: dict[str, Any]) -> tuple[Path, dict[str, Any], bool]:
    """The model folder of a config's `model` (a path or a mapping with `path` and
    `allow_pickle`), checked, its meta, and whether pickle weights may be loaded."""
    model_value = data.get("model")
    if model_value is not None and not isinstance(model_value, dict | str):
        raise ConfigError(f"bad value for 'model': expected a folder path, got {shown(repr(model_value))}")
    section = build(ModelSection, model_value if isinstance(model_value, dict) else {"path": model_value}, "model.")
    model_dir = model_folder(section.path)
    if is_single_file(model_dir):
        from diffunlearn.backends.single_file import check_single_file, converted_folder
        from diffunlearn.data.tasks import cache_dir

        check_single_file(model_dir, section.config, section.allow_pickle)  # torch-free; then convert once
        model_dir = converted_folder(model_dir, Path(section.config), section.allow_pickle, cache_dir())
    elif section.config is not None:
        raise ConfigError("model.config is for a single-file checkpoint; a model folder holds its own configs")
    return model_dir, check_model_dir(model_dir, section.allow_pickle), section.allow_pickle


def profiled_config(component, section: dict[str, Any], model_dir: Path, meta: dict, prefix: str) -> tuple[str, Any]:
    """A component's config: its profile (default `testbed` on the testbed, else `paper`) < `section`.

    A length the user gives wins over the profile's: `steps` alone replaces a profile's
    `epochs` (which would otherwise decide the length and silently ignore `steps`); both at
    once is an error."""
    section = dict(section)
    profile = section.pop("profile", None) or ("testbed" if is_testbed(model_dir, meta) else "paper")
    if not isinstance(profile, str) or profile not in PROFILES:
        hint = did_you_mean(profile, list(PROFILES)) if isinstance(profile, str) else ""
        raise ConfigError(f"unknown profile '{shown(str(profile))}'{hint}; valid profiles: {', '.join(PROFILES)}")
    defaults = dict(component.profiles.get(profile, {}))
    if "epochs" in component.Config.model_fields:
        if section.get("steps") is not None and section.get("epochs") is not None:
            raise ConfigError(f"both {prefix}steps and {prefix}epochs are set; set one (the other decides "
                              "nothing), e.g. drop the epochs or set them to null")
        if "steps" in section and "epochs" not in section:
            defaults.pop("epochs", None)
    return profile, build(component.Config, deep_merge(defaults, section), prefix)


def check_trains(component, config, prefix: str) -> None:
    """A run that trains must take at least one step: `steps=0` would be a silent no-op."""
    if getattr(component, "closed_form", False):
        return
    if getattr(config, "epochs", None) is None and config.steps < 1:
        raise ConfigError(f"{prefix}steps=0 trains nothing; set {prefix}steps to at least 1"
                          + (f" (or {prefix}epochs)" if hasattr(config, "epochs") else ""))


def resolve_seed(data: dict[str, Any]) -> int:
    return build(SeedSection, {"seed": data.get("seed", 0)}).seed


def task_flags(**values: str | None) -> dict[str, str]:
    """The `task` settings given as command-line flags (--concepts, --anchor, --domain): given
    ones only, kept apart from key=value parsing so free text is never read as YAML."""
    return {k: v for k, v in values.items() if v is not None}


def resolve_erase(method: str | None, forget: list[str] | None = None, retain: list[str] | None = None,
                  model: str | Path | None = None, config_file: str | Path | None = None,
                  overrides: list[str] | None = None, task_options: dict[str, str] | None = None) -> ResolvedRun:
    """Validate and resolve an erase run; raises ConfigError / TaskError / ModelDirError /
    UnknownNameError with a one-line message. Imports no torch."""
    from diffunlearn.methods import methods

    flags: dict[str, Any] = {}
    if forget:
        flags.setdefault("task", {})["forget"] = list(forget)
    if retain is not None:
        flags.setdefault("task", {})["retain"] = list(retain)
    if task_options:
        flags.setdefault("task", {}).update(task_options)
    if model:
        flags["model"] = {"path": str(model)}
    data = merged_config(config_file, TOP_LEVEL_KEYS, flags, overrides,
                         {"method": TrainConfig, "task": TaskConfig, "eval": EvalConfig, "model": ModelSection})

    name, method_data = named_section(data, "method", method, methods)
    model_dir, meta, allow_pickle = resolve_model(data)
    model_hash = model_content_hash(model_dir)  # a stale or broken model is reported before the task
    component = methods.get(name)
    profile, method_config = profiled_config(component, method_data, model_dir, meta, "method.")
    check_trains(component, method_config, "method.")

    task = build(TaskConfig, section(data, "task"), "task.")
    concept_set = resolve_task_concepts(task, model_dir, meta)
    if component.needs_retain and not _has_retain(task, concept_set):
        raise TaskError(f"{name} trains on retain images, and concept set {concept_set.name} has no retain concept "
                        "here: give --retain CONCEPTS")
    eval_cfg = build(EvalConfig, section(data, "eval"), "eval.")
    check_evaluators(eval_cfg, concept_set)
    check_eval_prompts(eval_cfg, task.forget)
    return ResolvedRun(name, method_config, profile, task, eval_cfg, model_dir, model_hash,
                       resolve_seed(data), concept_set, allow_pickle)


def section(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"config key '{key}' must be a mapping of settings, got {shown(repr(value))}")
    return value


def model_kind(model_dir: Path, meta: dict) -> str | None:
    """'testbed' / 'testbed-sd' for the shipped models (and runs made from them), else None."""
    if is_testbed(model_dir, meta):
        return "testbed"
    return meta.get("kind")


def resolve_task_concepts(task: TaskConfig, model_dir: Path, meta: dict) -> ConceptSet:
    """The task's concept set, with its forget/retain names and anchor map checked (torch-free)."""
    concept_set = resolve_concept_set(task.concepts, task.forget, task.retain, model_kind(model_dir, meta),
                                      task.domain, task.anchor)
    concept_set.validate(task.forget, task.retain)
    retain = task.retain if task.retain is not None else [c for c in concept_set.erasable() if c not in task.forget]
    build_anchor_map(task.forget, retain, task.anchor_scheme, task.seed, concept_set)
    return concept_set


def _has_retain(task: TaskConfig, concept_set: ConceptSet) -> bool:
    if task.retain is None:
        return len(concept_set.erasable()) > len(task.forget) or concept_set.combined
    return bool(task.retain) or concept_set.combined


def check_evaluators(eval_cfg: EvalConfig, concept_set: ConceptSet) -> None:
    """The evaluator, FID feature space and prompt file `eval` names are usable (torch-free):
    one-line ConfigError for a missing folder, file or optional package, or a bad prompt CSV."""
    from diffunlearn.metrics.evaluators.spec import check_evaluator, check_fid_features, effective_evaluator
    from diffunlearn.metrics.prompts import read_prompt_csv

    if not eval_cfg.enabled:
        return
    check_evaluator(effective_evaluator(eval_cfg, concept_set))
    check_fid_features(eval_cfg.fid_features)
    if eval_cfg.prompts:
        read_prompt_csv(eval_cfg.prompts)


def check_eval_prompts(eval_cfg: EvalConfig, forget: list[str]) -> None:
    """`eval.prompts` rows each probe one forget concept (a `concept` column, or one forget concept)."""
    if eval_cfg.enabled and eval_cfg.prompts:
        from diffunlearn.metrics.prompts import assign_concepts, read_prompt_csv

        assign_concepts(read_prompt_csv(eval_cfg.prompts), forget)


# ---- attacks ---------------------------------------------------------------------------------

ATTACK_KEYS = ("attack", "task", "eval", "model", "original", "seed")


@dataclass
class ResolvedAttack:
    """An attack on a model, validated; nothing has been written yet."""

    attack: str
    attack_config: Any  # the attack's AttackConfig subclass instance
    profile: str
    task: TaskConfig
    eval: EvalConfig
    model_dir: Path
    model_hash: str
    original_dir: Path
    alternatives: dict[str, list[str]] | None
    source_run: Path | None
    seed: int
    concept_set: ConceptSet
    allow_pickle: bool = False
    versions: dict[str, str] = field(default_factory=package_versions)

    def as_dict(self) -> dict[str, Any]:
        return {
            "attack": {"name": self.attack, "profile": self.profile, **self.attack_config.model_dump()},
            "task": self.task.model_dump(),
            "concept_set": self.concept_set.describe(),
            "eval": self.eval.model_dump(),
            "model": model_entry(self.model_dir, self.model_hash, self.allow_pickle),
            "original": str(self.original_dir),
            "alternatives": self.alternatives,
            "seed": self.seed,
        }

    @property
    def run_id(self) -> str:
        data = self.as_dict()
        data["model"] = {"hash": self.model_hash}
        data.pop("original")  # a path; the attacked model's hash already pins its base
        _drop_resource_settings(data["attack"])
        _drop_unset_additions(data["eval"])
        return config_hash({"config": data, "versions": self.versions})

    def default_out(self) -> Path:
        """Inside the attacked run's directory (attacks/<name>-<id>), else under runs/."""
        if self.source_run is not None:
            return self.source_run / "attacks" / f"{self.attack}-{self.run_id}"
        return Path("runs") / f"attack-{self.attack}-{self.run_id}"


def source_run_of(model_dir: Path) -> Path | None:
    """The run directory a model folder belongs to (erase or attack), if any."""
    parent = model_dir.parent
    return parent if (parent / "run.json").exists() and (parent / "config.yaml").exists() else None


def original_of(model_dir: Path, meta: dict) -> Path:
    """The model before unlearning: an erase run's base, a retrain's recorded original, or the
    model itself (a control attack on the original model)."""
    for key in ("base", "original"):
        entry = meta.get(key)
        if entry:
            if not (isinstance(entry, dict) and isinstance(entry.get("path"), str)):
                raise ModelDirError(f"corrupt {model_dir / 'diffunlearn.json'}: '{key}' must hold a path")
            path = Path(entry["path"])
            return path if path.is_absolute() else (model_dir / path).resolve()
    return model_dir


def alternatives_of(meta: dict, source_run: Path | None) -> dict[str, list[str]] | None:
    """The concepts an unlearned model was steered to (AR_CL), where its method uses anchors."""
    if meta.get("alternatives"):
        return meta["alternatives"]
    if source_run is None or not (source_run / "metrics.json").exists():
        return None
    from diffunlearn.methods import methods

    try:
        metrics = json.loads((source_run / "metrics.json").read_text())
    except json.JSONDecodeError:
        return None
    method = metrics.get("method")
    if method in methods and methods.get(method).uses_anchor:
        return metrics.get("anchor_map")
    return None


def resolve_attack(attack: str | None, model: str | Path | None = None, forget: list[str] | None = None,
                   config_file: str | Path | None = None, overrides: list[str] | None = None,
                   original: str | Path | None = None, task_options: dict[str, str] | None = None) -> ResolvedAttack:
    """Validate and resolve an attack run (torch-free). The task (forget and retain concepts,
    D_r) defaults to the attacked run's own; `forget` names the concepts for a model that is
    not an erase run (the original model or a retrain, as controls)."""
    from diffunlearn.attacks import attacks

    flags: dict[str, Any] = {}
    if model:
        flags["model"] = {"path": str(model)}
    if original:
        flags["original"] = str(original)
    data = merged_config(config_file, ATTACK_KEYS, flags, overrides,
                         {"attack": TrainConfig, "task": TaskConfig, "eval": EvalConfig, "model": ModelSection})

    name, attack_data = named_section(data, "attack", attack, attacks)
    model_dir, meta, allow_pickle = resolve_model(data)
    model_hash = model_content_hash(model_dir)
    source_run = source_run_of(model_dir)
    original_value = data.get("original")
    if original_value is not None and not isinstance(original_value, str):
        raise ConfigError(f"bad value for 'original': expected a folder path, got {shown(repr(original_value))}")
    original_dir = model_folder(original_value) if original_value else original_of(model_dir, meta)
    check_model_dir(original_dir, allow_pickle)

    component = attacks.get(name)
    profile, attack_config = profiled_config(component, attack_data, model_dir, meta, "attack.")
    check_trains(component, attack_config, "attack.")

    task_data = _source_task(source_run)
    task_data = deep_merge(task_data, {**section(data, "task"), **(task_options or {})})
    if forget:
        task_data["forget"] = list(forget)
        if not section(data, "task").get("retain"):
            task_data.pop("retain", None)  # the source run's retain set excluded other concepts
    if not task_data.get("forget") and meta.get("forget"):
        task_data["forget"] = list(meta["forget"])
    if not task_data.get("forget"):
        raise TaskError("no forget concept: the model is not an erase run, so name the erased concepts with "
                        "--forget (e.g. --forget dotted)")
    task = build(TaskConfig, task_data, "task.")
    concept_set = resolve_task_concepts(task, model_dir, meta)
    eval_cfg = build(EvalConfig, section(data, "eval"), "eval.")
    check_evaluators(eval_cfg, concept_set)
    check_eval_prompts(eval_cfg, task.forget)
    alternatives = alternatives_of(meta, source_run)
    if alternatives is not None:
        alternatives = {c: list(a) for c, a in alternatives.items() if c in task.forget and a} or None
    return ResolvedAttack(name, attack_config, profile, task, eval_cfg, model_dir, model_hash,
                          original_dir, alternatives, source_run, resolve_seed(data), concept_set,
                          allow_pickle)


def _source_task(source_run: Path | None) -> dict[str, Any]:
    if source_run is None:
        return {}
    try:
        config = load_yaml(source_run / "config.yaml")
    except ConfigError:
        return {}
    task = config.get("task")
    return dict(task) if isinstance(task, dict) else {}
