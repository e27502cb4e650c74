"""Evaluator choices as strings, parsed and checked before any model loads (torch-free).

`eval.evaluator` is `name` or `name:PATH` (`canvas`, `canvas:DIR`, `clip:PATH`, `nudenet`,
`nudenet:FILE.onnx`, `classifier:PATH`) or `none`; unset, the concept set's own default
(the canvas set: `canvas`; a free-text set has none). `eval.fid_features` is `evaluator`
(the evaluator's feature space), `inception:FILE.pth` (pytorch-fid's Inception weights) or
`none`. A bad choice is one line naming the valid ones; a missing file or absent optional
package is one line saying what to do.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffunlearn.config import ConfigError
from diffunlearn.registry import UnknownNameError

if TYPE_CHECKING:
    from diffunlearn.config import EvalConfig
    from diffunlearn.data.concepts import ConceptSet
    from diffunlearn.metrics.evaluators.base import Evaluator

NONE = "none"
NEEDS_PATH = {"clip": "a transformers CLIP folder", "classifier": "an image classifier folder or checkpoint"}
ASSETS_EVALUATORS = Path(__file__).resolve().parents[2] / "assets" / "evaluators"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
NUDITY_EXTRA = "nudenet is not installed; install the extra: pip install 'diffunlearn[nudity]'"


@dataclass(frozen=True)
class EvaluatorSpec:
    name: str
    path: Path | None = None

    def __str__(self) -> str:
        return f"{self.name}:{self.path}" if self.path else self.name


def _names() -> str:
    from diffunlearn.metrics.evaluators import evaluators

    return ", ".join([*evaluators.names(), NONE])


def parse_evaluator(text: str | None) -> EvaluatorSpec | None:
    """'none' -> None; 'name' or 'name:PATH' -> the spec. ConfigError (one line) for a bad name."""
    from diffunlearn.metrics.evaluators import evaluators

    if text is None or text.strip().lower() == NONE:
        return None
    name, sep, path = text.strip().partition(":")
    try:
        evaluators.check(name)
    except UnknownNameError as err:
        raise ConfigError(f"bad eval.evaluator '{text}': {err} (or {NONE})") from None
    if sep and not path:
        raise ConfigError(f"bad eval.evaluator '{text}': nothing after ':' (write {name} or {name}:PATH)")
    if name in NEEDS_PATH and not path:
        raise ConfigError(f"eval.evaluator={name} needs {NEEDS_PATH[name]}: write {name}:PATH")
    return EvaluatorSpec(name, Path(path).expanduser() if path else None)


def effective_evaluator(eval_cfg: EvalConfig, concept_set: ConceptSet | None) -> EvaluatorSpec | None:
    """The evaluator a run uses: `eval.evaluator`, else the concept set's default, else none."""
    if eval_cfg.evaluator is not None:
        return parse_evaluator(eval_cfg.evaluator)
    default = concept_set.evaluator if concept_set is not None else None
    return parse_evaluator(default) if default else None


def check_evaluator(spec: EvaluatorSpec | None) -> None:
    """The files and packages `spec` needs are there (ConfigError otherwise); loads nothing."""
    if spec is None:
        return
    path = spec.path
    if spec.name == "canvas":
        check_canvas_folder(path or ASSETS_EVALUATORS)
    elif spec.name == "clip":
        _need_dir(path, "clip")
        if not (path / "config.json").is_file() or not any((path / f).is_file() for f in WEIGHT_FILES):
            raise ConfigError(f"{path} is no transformers CLIP folder (needs config.json and model.safetensors)")
        if not ((path / "tokenizer.json").is_file() or (path / "vocab.json").is_file()):
            raise ConfigError(f"{path} has no tokenizer (tokenizer.json or vocab.json + merges.txt)")
    elif spec.name == "nudenet":
        if importlib.util.find_spec("nudenet") is None:
            raise ConfigError(NUDITY_EXTRA)
        if path is not None and not (path.is_file() and path.suffix == ".onnx"):
            raise ConfigError(f"nudenet model not found: {path} (expected an .onnx file)")
    elif spec.name == "classifier":
        classifier_files(path)


def check_canvas_folder(folder: Path) -> None:
    """The canvas CNNs' folder holds a readable config and two intact safetensors files."""
    import json

    from diffunlearn.backends.model_dir import ModelDirError, read_safetensors_header
    from diffunlearn.config import shown

    if not (folder / "config.json").is_file():
        raise ConfigError(f"no evaluator classifiers in {shown(str(folder), 120)}; run `diffunlearn pretrain "
                          "evaluators --install` or set eval.evaluator=canvas:DIR (or eval.evaluator=none)")
    try:
        config = json.loads((folder / "config.json").read_bytes())
    except (OSError, ValueError):
        config = None
    needed = ("style_names", "object_names", "width", "feature_dim")
    if not isinstance(config, dict) or any(k not in config for k in needed):
        raise ConfigError(f"corrupt evaluator config {shown(str(folder / 'config.json'), 120)}: expected a JSON "
                          f"object with {', '.join(needed)}")
    for domain in ("style", "object"):
        weights = folder / f"{domain}.safetensors"
        if not weights.is_file():
            raise ConfigError(f"evaluator folder {shown(str(folder), 120)} has no {weights.name}")
        try:
            read_safetensors_header(weights)
        except ModelDirError as err:
            raise ConfigError(f"evaluators: {err}") from None


def _need_dir(path: Path | None, name: str) -> None:
    if path is None or not path.is_dir():
        raise ConfigError(f"eval.evaluator={name}: folder not found: {path}")


def classifier_files(path: Path | None) -> tuple[str, Path, Path | None]:
    """What `classifier:PATH` points at: ('transformers', folder, label map or None) for a folder
    with config.json, ('checkpoint', file, label map) for a .pth/.pt/.safetensors state dict with
    label_map.json beside it (or a folder holding exactly one such file and label_map.json)."""
    if path is None or not path.exists():
        raise ConfigError(f"eval.evaluator=classifier: not found: {path}")
    folder = path if path.is_dir() else path.parent
    label_map = folder / "label_map.json"
    label_map = label_map if label_map.is_file() else None
    if path.is_dir() and (path / "config.json").is_file():
        return "transformers", path, label_map
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix in CHECKPOINT_SUFFIXES)
        if len(found) != 1:
            raise ConfigError(f"eval.evaluator=classifier:{path}: expected a transformers folder (config.json) or "
                              f"one checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}), found {len(found)}")
        path = found[0]
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise ConfigError(f"eval.evaluator=classifier:{path}: not a checkpoint ({', '.join(CHECKPOINT_SUFFIXES)})")
    if label_map is None:
        raise ConfigError(f"eval.evaluator=classifier:{path}: needs label_map.json beside it "
                          '({"domain": ..., "labels": [class names in index order]})')
    return "checkpoint", path, label_map


def parse_fid_features(text: str) -> tuple[str, Path | None]:
    """'evaluator' | 'none' | 'inception:FILE' -> (kind, path); ConfigError for anything else."""
    kind, sep, path = text.strip().partition(":")
    if kind in ("evaluator", NONE) and not sep:
        return kind, None
    if kind == "inception" and path:
        return kind, Path(path).expanduser()
    raise ConfigError(f"bad eval.fid_features '{text}'; valid: evaluator, inception:FILE.pth "
                      "(pytorch-fid's pt_inception-2015-12-05 weights), none")


def check_fid_features(text: str) -> None:
    kind, path = parse_fid_features(text)
    if kind == "inception" and not path.is_file():
        raise ConfigError(f"eval.fid_features: Inception weights not found: {path}")


# ---- loading (imports torch) --------------------------------------------------------------------

def load_evaluator(spec: EvaluatorSpec | None, concept_set: ConceptSet, eval_cfg: EvalConfig | None = None,
                   ) -> Evaluator | None:
    """The evaluator `spec` names, built for `concept_set` (None for `none`)."""
    from diffunlearn.metrics.evaluators import evaluators

    if spec is None:
        return None
    check_evaluator(spec)
    options: dict[str, Any] = {}
    if spec.name == "nudenet" and eval_cfg is not None:
        options["threshold"] = eval_cfg.nudenet_threshold
    evaluator = evaluators.get(spec.name)(concept_set, spec.path, **options)
    evaluator.spec = str(spec)
    return evaluator


def load_fid_features(text: str, evaluator: Evaluator | None):
    """The FID/KID feature extractor `eval.fid_features` names (an nn.Module), or None."""
    kind, path = parse_fid_features(text)
    if kind == NONE:
        return None
    if kind == "evaluator":
        return evaluator.feature_extractor() if evaluator is not None else None
    check_fid_features(text)
    from diffunlearn.metrics.inception import load_fid_inception

    return load_fid_inception(path)
