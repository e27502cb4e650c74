"""Typed configs: YAML loading, key=value overrides, one-line errors, no torch import."""

from __future__ import annotations

import subprocess
import sys

import pytest

from diffunlearn.config import (
    CONFIG_DIR,
    ConfigError,
    PretrainEvaluatorConfig,
    PretrainModelConfig,
    TrainConfig,
    apply_overrides,
    build,
    config_hash,
    deep_merge,
    dump_yaml,
    load_yaml,
    parse_override,
)

# ---- YAML files ----------------------------------------------------------------------------


def test_load_yaml_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 7\ntrain:\n  lr: 0.5\n  schedule: cosine\n")
    assert load_yaml(path) == {"steps": 7, "train": {"lr": 0.5, "schedule": "cosine"}}


def test_load_yaml_empty_file_is_empty_mapping(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# only a comment\n")
    assert load_yaml(path) == {}


def test_load_yaml_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found") as info:
        load_yaml(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(info.value)


def test_load_yaml_malformed_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("steps: 3\ntrain: [1, 2\nlr: 4\n")
    with pytest.raises(ConfigError) as info:
        load_yaml(path)
    msg = str(info.value)
    assert msg.startswith(f"malformed YAML in {path}")
    assert "(line " in msg and "column " in msg
    assert "\n" not in msg


@pytest.mark.parametrize("text, kind", [("- 1\n- 2\n", "list"), ("just a string\n", "str"), ("3\n", "int")])
def test_load_yaml_top_level_must_be_mapping(tmp_path, text, kind):
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"top level must be a mapping, got {kind}"):
        load_yaml(path)


# ---- overrides -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, keys, value",
    [
        ("method.lr=1e-5", ["method", "lr"], 1e-5),
        ("lr=1.0e5", ["lr"], 1e5),
        ("lr=-2E-3", ["lr"], -2e-3),
        ("lr=.5", ["lr"], 0.5),
        ("steps=5", ["steps"], 5),
        ("bf16=true", ["bf16"], True),
        ("grad_clip=null", ["grad_clip"], None),
        ("task.forget=[circle, striped]", ["task", "forget"], ["circle", "striped"]),
        ("name=abc", ["name"], "abc"),
        ("name=", ["name"], ""),
        ("name=a=b", ["name"], "a=b"),  # only the first '=' splits
        ("name=1e", ["name"], "1e"),  # not a number
        ("name=nan", ["name"], "nan"),  # stays a string
        ("raw={a: 1", ["raw"], "{a: 1"),  # malformed YAML falls back to the raw text
    ],
)
def test_parse_override(text, keys, value):
    got_keys, got = parse_override(text)
    assert got_keys == keys
    assert got == value
    assert type(got) is type(value)


def test_scientific_notation_is_float():
    _, value = parse_override("train.lr=1e-5")
    assert isinstance(value, float) and value == pytest.approx(1e-5)


@pytest.mark.parametrize("bad", ["lr", "=3", "a..b=1", ".a=1", "a.=1"])
def test_parse_override_errors(bad):
    with pytest.raises(ConfigError, match="bad override") as info:
        parse_override(bad)
    assert "\n" not in str(info.value)


def test_apply_overrides_nested_without_mutating_input():
    data = {"train": {"lr": 0.1, "steps": 3}, "name": "x", "flat": 1}
    out = apply_overrides(data, ["train.lr=1e-5", "new.deep.key=4", "flat.sub=2", "name=y"])
    assert out == {"train": {"lr": 1e-5, "steps": 3}, "name": "y", "flat": {"sub": 2},
                   "new": {"deep": {"key": 4}}}
    assert data == {"train": {"lr": 0.1, "steps": 3}, "name": "x", "flat": 1}


def test_later_override_wins():
    assert apply_overrides({}, ["a.b=1", "a.b=2"]) == {"a": {"b": 2}}


def test_deep_merge():
    base = {"a": {"x": 1, "y": 2}, "b": 1}
    assert deep_merge(base, {"a": {"y": 3}, "c": 4}) == {"a": {"x": 1, "y": 3}, "b": 1, "c": 4}
    assert base == {"a": {"x": 1, "y": 2}, "b": 1}


def test_precedence_defaults_yaml_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("steps: 50\nlr: 0.01\nschedule: cosine\n")
    cfg = build(TrainConfig, apply_overrides(load_yaml(path), ["lr=1e-5"]))
    assert cfg.steps == 50  # YAML over default
    assert cfg.lr == 1e-5 and isinstance(cfg.lr, float)  # override over YAML
    assert cfg.schedule == "cosine"
    assert cfg.batch_size == TrainConfig().batch_size == 4  # default


# ---- validation ------------------------------------------------------------------------------


def test_unknown_key_is_one_line_error():
    with pytest.raises(ConfigError) as info:
        build(TrainConfig, {"stepz": 3})
    assert str(info.value) == "unknown config key 'stepz' (did you mean 'steps'?)"


def test_unknown_nested_key_names_the_path():
    with pytest.raises(ConfigError) as info:
        build(PretrainModelConfig, {"arch": {"chanels": [8]}})
    assert str(info.value) == "unknown config key 'arch.chanels' (did you mean 'arch.channels'?)"
    with pytest.raises(ConfigError) as info:
        build(TrainConfig, {"stepz": 3}, prefix="train.")
    assert str(info.value) == "unknown config key 'train.stepz' (did you mean 'train.steps'?)"


@pytest.mark.parametrize(
    "data, key, got",
    [
        ({"lr": -1.0}, "lr", "-1.0"),
        ({"lr": "abc"}, "lr", "'abc'"),
        ({"optimizer": "adm"}, "optimizer", "'adm'"),
        ({"param_group": "cross"}, "param_group", "'cross'"),
        ({"steps": -2}, "steps", "-2"),
    ],
)
def test_bad_value_is_one_line_error(data, key, got):
    with pytest.raises(ConfigError) as info:
        build(TrainConfig, data, prefix="train.")
    msg = str(info.value)
    assert msg.startswith(f"bad value for 'train.{key}': ")
    assert msg.endswith(f"(got {got})")
    assert "\n" not in msg


def test_build_valid_and_assignment_validated():
    cfg = build(TrainConfig, {"steps": 3, "param_group": "xattn-kv", "grad_clip": None})
    assert (cfg.steps, cfg.param_group, cfg.grad_clip) == (3, "xattn-kv", None)
    with pytest.raises(ValueError):
        cfg.lr = -1.0  # validate_assignment


def test_shipped_configs_validate():
    model = build(PretrainModelConfig, load_yaml(CONFIG_DIR / "pretrain-model.yaml"))
    assert model.train.schedule in ("constant", "cosine")
    assert len(model.arch.channels) >= 2
    evaluators = build(PretrainEvaluatorConfig, load_yaml(CONFIG_DIR / "pretrain-evaluators.yaml"))
    assert evaluators.steps > 0


def test_config_hash_and_dump():
    a = {"b": 1, "a": {"y": [1, 2], "x": 0.5}}
    b = {"a": {"x": 0.5, "y": [1, 2]}, "b": 1}
    assert config_hash(a) == config_hash(b)
    assert len(config_hash(a)) == 12
    assert config_hash(a) != config_hash({**a, "b": 2})
    import yaml

    assert yaml.safe_load(dump_yaml(TrainConfig().model_dump())) == TrainConfig().model_dump()


def test_config_modules_do_not_import_torch():
    code = (
        "import sys\n"
        "import diffunlearn.config, diffunlearn.registry, diffunlearn.data.canvas, "
        "diffunlearn.backends.model_dir\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ---- hostile YAML, value checks, echo limits -------------------------------------------------


def test_yaml_bounds_refuse_deep_nesting_and_alias_bombs():
    from diffunlearn.config import MAX_YAML_DEPTH, YAMLLimitError, parse_yaml

    assert parse_yaml("a: " + "[" * (MAX_YAML_DEPTH - 2) + "1" + "]" * (MAX_YAML_DEPTH - 2)) is not None
    with pytest.raises(YAMLLimitError, match="nested deeper"):
        parse_yaml("a: " + "[" * 20000 + "]" * 20000)
    shared = "a: &a [1, 2]\nb: *a\nc: *a\n"  # ordinary anchors are fine
    assert parse_yaml(shared) == {"a": [1, 2], "b": [1, 2], "c": [1, 2]}
    bomb = "x0: &a0 [l,l,l,l,l,l,l,l,l]\n" + "".join(
        f"x{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 6))
    assert len(bomb) < 400  # 9**5 = 59049 values once expanded
    with pytest.raises(YAMLLimitError, match="expands to more than"):
        parse_yaml(bomb)
    with pytest.raises(YAMLLimitError, match="recursive alias"):
        parse_yaml("a: &a [*a]")
    import yaml

    with pytest.raises(yaml.YAMLError):  # python tags are never constructed
        parse_yaml("!!python/object/apply:os.system ['true']")


def test_shown_caps_what_an_error_repeats():
    from diffunlearn.config import shown

    assert shown("short") == "short"
    long = shown("a" * 1000 + "/file.yaml", 60)
    assert len(long) == 60 and long.endswith("file.yaml") and "..." in long
    assert shown("two\nlines") == "two lines"
    with pytest.raises(ConfigError) as info:
        build(TrainConfig, {"optimizer": "x" * 100_000})
    assert len(str(info.value)) < 300


@pytest.mark.parametrize("data, fragment", [
    ({"lr": float("inf")}, "finite"),
    ({"lr": float("nan")}, "finite"),
    ({"lr": True}, "boolean"),
    ({"steps": False}, "boolean"),
    ({"grad_clip": -1.0}, "greater than 0"),
    ({"grad_clip": 0}, "greater than 0"),
    ({"batch_size": 10**8}, "less than or equal"),
])
def test_value_checks(data, fragment):
    with pytest.raises(ConfigError, match=fragment):
        build(TrainConfig, data)


def test_bool_fields_still_take_booleans_and_null_grad_clip_disables():
    cfg = build(TrainConfig, {"bf16": True, "grad_clip": None})
    assert cfg.bf16 is True and cfg.grad_clip is None


def test_task_lists_reject_duplicates_and_an_empty_retain():
    from diffunlearn.config import TaskConfig

    with pytest.raises(ConfigError, match="grid twice"):
        build(TaskConfig, {"forget": ["dotted"], "retain": ["grid", "grid"]}, "task.")
    with pytest.raises(ConfigError, match="task.retain"):
        build(TaskConfig, {"forget": ["dotted"], "retain": []}, "task.")
    assert build(TaskConfig, {"forget": ["dotted"], "retain": None}).retain is None


def test_json_writer_turns_non_finite_numbers_into_null(tmp_path):
    import json

    import numpy as np

    from diffunlearn.io import atomic_write_json, dump_json

    data = {"a": float("nan"), "b": [1.5, float("inf"), -float("inf")], "c": np.float32("nan"),
            "d": np.array([1.0, np.nan]), "e": {"f": (2, None)}}
    text = dump_json(data)
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [1.5, None, None], "c": None, "d": [1.0, None], "e": {"f": [2, None]}}
    atomic_write_json(tmp_path / "m.json", data)
    json.loads((tmp_path / "m.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


# ---- resolving a run: every override takes effect or is an error ------------------------------


def test_unknown_top_level_overrides_are_errors(tiny_model_dir):
    from diffunlearn.runs.resolve import resolve_erase

    for override, hint in (("metod.lr=5", "did you mean 'method'"), ("lr=5", "did you mean 'method.lr'"),
                           ("evl.seed=3", "did you mean 'eval'")):
        with pytest.raises(ConfigError, match=hint):
            resolve_erase("core", ["dotted"], model=tiny_model_dir, overrides=[override])


def test_user_steps_beat_a_profiles_epochs(tiny_model_dir):
    from diffunlearn.methods.core import Core
    from diffunlearn.runs.resolve import resolve_erase

    assert Core.profiles["testbed"]["epochs"] is not None  # the profile sets epochs, so steps would be ignored
    default = resolve_erase("core", ["dotted"], model=tiny_model_dir)
    stepped = resolve_erase("core", ["dotted"], model=tiny_model_dir, overrides=["method.steps=5"])
    assert (stepped.method_config.steps, stepped.method_config.epochs) == (5, None)
    assert default.method_config.epochs == Core.profiles["testbed"]["epochs"]
    assert stepped.run_id != default.run_id
    both = resolve_erase("core", ["dotted"], model=tiny_model_dir, overrides=["method.steps=5", "method.epochs=null"])
    assert both.run_id == stepped.run_id
    with pytest.raises(ConfigError, match="both method.steps and method.epochs"):
        resolve_erase("core", ["dotted"], model=tiny_model_dir, overrides=["method.steps=5", "method.epochs=2"])
    with pytest.raises(ConfigError, match="trains nothing"):
        resolve_erase("core", ["dotted"], model=tiny_model_dir, overrides=["method.epochs=null", "method.steps=0"])
    # closed-form methods train no steps by design
    assert resolve_erase("uce", ["dotted"], model=tiny_model_dir).method_config.steps == 0


def test_model_given_as_flag_and_allow_pickle_override(tiny_model_dir):
    from diffunlearn.runs.resolve import resolve_erase

    plain = resolve_erase("core", ["dotted"], model=tiny_model_dir)
    pickled = resolve_erase("core", ["dotted"], model=tiny_model_dir, overrides=["model.allow_pickle=true"])
    assert pickled.model_dir == plain.model_dir and pickled.allow_pickle and not plain.allow_pickle
    assert pickled.run_id == plain.run_id  # how weights may be read is not part of what the run is
