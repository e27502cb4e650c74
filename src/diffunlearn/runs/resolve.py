"""Resolving a run's configuration and its directory, all before torch is imported.

Precedence: the method's built-in defaults < its profile (`paper` or `testbed`) < the YAML
file < command-line flags and `key=value` overrides. The run id hashes the resolved
config, the model's content hash and the package versions (not the output path or thread
count), so a finished run is recognised and an interrupted one resumes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from diffunlearn.backends.model_dir import check_model_dir, model_content_hash
from diffunlearn.config import (
    ConfigError,
    EvalConfig,
    StrictModel,
    TaskConfig,
    apply_overrides,
    build,
    config_hash,
    deep_merge,
    dump_yaml,
    load_yaml,
)
from diffunlearn.data.tasks import validate_anchor_scheme, validate_concepts
from diffunlearn.io import atomic_write_text

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


class RunDirError(ValueError):
    """The output directory holds something we must not overwrite."""


def package_versions() -> dict[str, str]:
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
    `testbed-sd`) its folder in the package, a run directory its model/ folder, any other path
    itself. A value that is neither a shipped name nor an existing path but looks like a name
    (no path separator) is an UnknownNameError listing the shipped models."""
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
    if (path / "run.json").exists() and (path / "model").is_dir():
        return path / "model"
    return path


def is_testbed(model_dir: Path, meta: dict) -> bool:
    """A shipped testbed or a model trained by its recipe: the `testbed` profiles apply."""
    return meta.get("kind") in TESTBED_KINDS or any(
        Path(model_dir).resolve() == folder.resolve() for folder, _ in SHIPPED_MODELS.values())


class ModelSection(StrictModel):
    path: str


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
    versions: dict[str, str] = field(default_factory=package_versions)

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": {"name": self.method, "profile": self.profile, **self.method_config.model_dump()},
            "task": self.task.model_dump(),
            "eval": self.eval.model_dump(),
            "model": {"path": str(self.model_dir), "hash": self.model_hash},
            "seed": self.seed,
        }

    @property
    def run_id(self) -> str:
        data = self.as_dict()
        data["model"] = {"hash": self.model_hash}  # the path may differ between machines
        return config_hash({"config": data, "versions": self.versions})

    def default_out(self) -> Path:
        return Path("runs") / f"{self.method}-{self.run_id}"


def read_config_file(config_file: str | Path | None, keys: tuple[str, ...] = TOP_LEVEL_KEYS) -> dict[str, Any]:
    data = load_yaml(config_file) if config_file else {}
    unknown = sorted(set(data) - set(keys))
    if unknown:
        raise ConfigError(f"unknown config key '{unknown[0]}'; valid top-level keys: {', '.join(keys)}")
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


def resolve_model(data: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The model folder of a config's `model` (a path or a mapping with `path`), checked, and its meta."""
    model_value = data.get("model")
    if isinstance(model_value, dict):
        model_value = build(ModelSection, model_value, "model.").path
    model_dir = model_folder(model_value)
    return model_dir, check_model_dir(model_dir)


def profiled_config(component, section: dict[str, Any], model_dir: Path, meta: dict, prefix: str) -> tuple[str, Any]:
    """A component's config: its profile (default `testbed` on the testbed, else `paper`) < `section`."""
    profile = section.pop("profile", None) or ("testbed" if is_testbed(model_dir, meta) else "paper")
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile '{profile}'; valid profiles: {', '.join(PROFILES)}")
    return profile, build(component.Config, deep_merge(component.profiles.get(profile, {}), section), prefix)


def resolve_seed(data: dict[str, Any]) -> int:
    seed = data.get("seed", 0)
    if not isinstance(seed, int):
        raise ConfigError(f"bad value for 'seed': expected an integer, got {seed!r}")
    return seed


def resolve_erase(method: str | None, forget: list[str] | None = None, retain: list[str] | None = None,
                  model: str | Path | None = None, config_file: str | Path | None = None,
                  overrides: list[str] | None = None) -> ResolvedRun:
    """Validate and resolve an erase run; raises ConfigError / TaskError / ModelDirError /
    UnknownNameError with a one-line message. Imports no torch."""
    from diffunlearn.methods import methods

    data = read_config_file(config_file)
    flags: dict[str, Any] = {}
    if forget:
        flags.setdefault("task", {})["forget"] = list(forget)
    if retain is not None:
        flags.setdefault("task", {})["retain"] = list(retain)
    if model:
        flags["model"] = str(model)
    data = apply_overrides(deep_merge(data, flags), overrides or [])

    name, method_data = named_section(data, "method", method, methods)
    model_dir, meta = resolve_model(data)
    profile, method_config = profiled_config(methods.get(name), method_data, model_dir, meta, "method.")

    task = build(TaskConfig, data.get("task") or {}, "task.")
    validate_concepts(task.forget, task.retain)
    validate_anchor_scheme(task.anchor_scheme)
    eval_cfg = build(EvalConfig, data.get("eval") or {}, "eval.")
    check_evaluators(eval_cfg)
    return ResolvedRun(name, method_config, profile, task, eval_cfg, model_dir, model_content_hash(model_dir),
                       resolve_seed(data))


def check_evaluators(eval_cfg: EvalConfig) -> None:
    folder = Path(eval_cfg.evaluators) if eval_cfg.evaluators else ASSETS / "evaluators"
    if eval_cfg.enabled and not (folder / "config.json").is_file():
        raise ConfigError(f"no evaluator classifiers in {folder}; run `diffunlearn pretrain evaluators --install` "
                          "or set eval.evaluators=DIR (or eval.enabled=false)")


def prepare_run_dir(out: Path, run_id: str, kind: str) -> str:
    """'new', 'resume' or 'done' for `out`; RunDirError if it holds anything else. Writes nothing."""
    if not out.exists():
        return "new"
    if not out.is_dir():
        raise RunDirError(f"output path {out} exists and is not a directory")
    marker = out / "run.json"
    if not marker.exists():
        if any(out.iterdir()):
            raise RunDirError(f"output directory {out} is not empty and holds no diffunlearn run; "
                              "choose another --out")
        return "new"
    try:
        info = json.loads(marker.read_text())
    except json.JSONDecodeError:
        raise RunDirError(f"output directory {out} holds a corrupt run.json; choose another --out") from None
    if info.get("run_id") != run_id or info.get("kind") != kind:
        raise RunDirError(f"output directory {out} already holds a different run ({info.get('kind')} "
                          f"{info.get('run_id')}); choose another --out")
    return "done" if info.get("status") == "complete" else "resume"


def write_run_marker(out: Path, run_id: str, kind: str, status: str) -> None:
    atomic_write_text(out / "run.json", json.dumps({"run_id": run_id, "kind": kind, "status": status}))


def write_config(out: Path, resolved_dict: dict[str, Any]) -> None:
    (out / "config.yaml").write_text(dump_yaml(resolved_dict))


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
    versions: dict[str, str] = field(default_factory=package_versions)

    def as_dict(self) -> dict[str, Any]:
        return {
            "attack": {"name": self.attack, "profile": self.profile, **self.attack_config.model_dump()},
            "task": self.task.model_dump(),
            "eval": self.eval.model_dump(),
            "model": {"path": str(self.model_dir), "hash": self.model_hash},
            "original": str(self.original_dir),
            "alternatives": self.alternatives,
            "seed": self.seed,
        }

    @property
    def run_id(self) -> str:
        data = self.as_dict()
        data["model"] = {"hash": self.model_hash}
        data.pop("original")  # a path; the attacked model's hash already pins its base
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
        if meta.get(key):
            path = Path(meta[key]["path"])
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
                   original: str | Path | None = None) -> ResolvedAttack:
    """Validate and resolve an attack run (torch-free). The task (forget and retain concepts,
    D_r) defaults to the attacked run's own; `forget` names the concepts for a model that is
    not an erase run (the original model or a retrain, as controls)."""
    from diffunlearn.attacks import attacks

    data = read_config_file(config_file, ATTACK_KEYS)
    flags: dict[str, Any] = {}
    if model:
        flags["model"] = str(model)
    if original:
        flags["original"] = str(original)
    data = apply_overrides(deep_merge(data, flags), overrides or [])

    name, attack_data = named_section(data, "attack", attack, attacks)
    model_dir, meta = resolve_model(data)
    source_run = source_run_of(model_dir)
    original_dir = model_folder(data["original"]) if data.get("original") else original_of(model_dir, meta)
    check_model_dir(original_dir)

    profile, attack_config = profiled_config(attacks.get(name), attack_data, model_dir, meta, "attack.")

    task_data = _source_task(source_run)
    task_data = deep_merge(task_data, data.get("task") or {})
    if forget:
        task_data["forget"] = list(forget)
        if not (data.get("task") or {}).get("retain"):
            task_data.pop("retain", None)  # the source run's retain set excluded other concepts
    if not task_data.get("forget") and meta.get("forget"):
        task_data["forget"] = list(meta["forget"])
    if not task_data.get("forget"):
        from diffunlearn.data.tasks import TaskError

        raise TaskError("no forget concept: the model is not an erase run, so name the erased concepts with "
                        "--forget (e.g. --forget dotted)")
    task = build(TaskConfig, task_data, "task.")
    validate_concepts(task.forget, task.retain)
    eval_cfg = build(EvalConfig, data.get("eval") or {}, "eval.")
    check_evaluators(eval_cfg)
    alternatives = alternatives_of(meta, source_run)
    if alternatives is not None:
        alternatives = {c: list(a) for c, a in alternatives.items() if c in task.forget} or None
    return ResolvedAttack(name, attack_config, profile, task, eval_cfg, model_dir, model_content_hash(model_dir),
                          original_dir, alternatives, source_run, resolve_seed(data))


def _source_task(source_run: Path | None) -> dict[str, Any]:
    if source_run is None:
        return {}
    import yaml

    try:
        config = yaml.safe_load((source_run / "config.yaml").read_text()) or {}
    except yaml.YAMLError:
        return {}
    task = config.get("task")
    return dict(task) if isinstance(task, dict) else {}
