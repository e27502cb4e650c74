"""A catalogue of bad and edge-case invocations, as a hostile but fair user would try them.

Every case must exit with status 2, print exactly one line of fewer than 300 characters on
stderr, and leave the tree under its working directory (the parent of every --out) exactly
as it was: no file or folder created, changed or removed. Cases marked `torch=False` must
also fail before torch is imported (checked in one fresh interpreter for all of them).
Placeholders in arguments: {w} the case's working directory, {model} a tiny model folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffunlearn.cli import app

MAX_LINE = 300


@dataclass
class Case:
    id: str
    args: list[str]
    expect: str  # a fragment of the error line
    setup: Callable[[Path, Path], Callable[[], None] | None] | None = None  # (workdir, model) -> cleanup
    torch: bool = False  # True: the error can only show at load time (torch is imported)


E = ["erase", "core", "--forget", "dotted", "--model", "{model}"]
A = ["attack", "relearn", "--forget", "dotted", "--model", "{model}"]


# ---- setups: each builds the bad input inside the working directory ---------------------------

def write(name: str, content: str | bytes):
    def setup(w: Path, model: Path):
        path = w / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content.replace("{w}", str(w)).replace("{model}", str(model)))
    return setup


def nested_yaml(depth: int) -> str:
    return "method:\n  lr: " + "[" * depth + "1" + "]" * depth + "\n"


def alias_bomb() -> str:
    """About 400 bytes that expand to 9**7 values (a 'billion laughs')."""
    lines = ["  x0: &a0 [lol,lol,lol,lol,lol,lol,lol,lol,lol]"]
    lines += [f"  x{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 7)]
    return "method:\n  name: core\n" + "\n".join(lines) + "\n  lr: *a6\ntask: {forget: [dotted]}\n"


def bad_model(name: str, edit: Callable[[Path], None]):
    def setup(w: Path, model: Path):
        folder = w / name
        shutil.copytree(model, folder)
        edit(folder)
    return setup


def remove(part: str) -> Callable[[Path], None]:
    def edit(folder: Path):
        target = folder / part
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return edit


def truncate(part: str, keep: int = 1000) -> Callable[[Path], None]:
    def edit(folder: Path):
        target = folder / part
        target.write_bytes(target.read_bytes()[:keep])
    return edit


def edit_json(part: str, **changes) -> Callable[[Path], None]:
    def edit(folder: Path):
        target = folder / part
        data = json.loads(target.read_text())
        data.update(changes)
        target.write_text(json.dumps(data))
    return edit


def pickle_text_encoder(folder: Path):
    """The text encoder given only as pytorch_model.bin; its bytes would run code if unpickled."""
    (folder / "text_encoder" / "model.safetensors").unlink()
    (folder / "text_encoder" / "pytorch_model.bin").write_bytes(b"cos\nsystem\n(S'touch pwned'\ntR.")


def base_is(path_of: Callable[[Path], str]) -> Callable[[Path], None]:
    def edit(folder: Path):
        (folder / "diffunlearn.json").write_text(json.dumps({"base": {"path": path_of(folder), "hash": "x"}}))
    return edit


def base_cycle(w: Path, model: Path):
    for name, other in (("a", "b"), ("b", "a")):
        shutil.copytree(model, w / name)
        (w / name / "diffunlearn.json").write_text(json.dumps({"base": {"path": str(w / other), "hash": "x"}}))


def run_model_with_stale_base(w: Path, model: Path):
    """A run's model folder whose base no longer has the hash it was trained from (load time)."""
    folder = w / "stale"
    (folder / "unet").mkdir(parents=True)
    shutil.copy(model / "unet" / "diffusion_pytorch_model.safetensors", folder / "unet")
    (folder / "diffunlearn.json").write_text(json.dumps({"base": {"path": str(model), "hash": "0" * 16}}))


def foreign_model(pipeline: str, component: str):
    """A folder of another model family as diffusers saves one: model_index.json and a component."""
    def setup(w: Path, model: Path):
        folder = w / "m"
        (folder / component).mkdir(parents=True)
        (folder / component / "config.json").write_text("{}")
        (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline,
                                                             component: ["diffusers", "SomeModel"]}))
    return setup


def single_file(name: str, key: str = "model.diffusion_model.conv_in.weight", config: bool = True):
    """A (tiny, fake) single-file checkpoint, and a config folder copied from the tiny model."""
    def setup(w: Path, model: Path):
        import numpy as np
        from safetensors.numpy import save_file

        if name.endswith(".safetensors"):
            save_file({key: np.zeros((2, 2), dtype=np.float32)}, str(w / name))
        else:
            (w / name).write_bytes(b"cos\nsystem\n(S'touch pwned'\ntR.")
        if config:
            shutil.copytree(model, w / "cfg")
    return setup


def garbage(name: str):
    def setup(w: Path, model: Path):
        (w / name).write_bytes(b"\x10" * 12)
    return setup


def add_part(part: str) -> Callable[[Path], None]:
    def edit(folder: Path):
        (folder / part).mkdir()
        (folder / part / "config.json").write_text("{}")
    return edit


def evaluators(edit: Callable[[Path], None] | None = None):
    def setup(w: Path, model: Path):
        from diffunlearn.metrics.classifier import EVALUATOR_DIR

        shutil.copytree(EVALUATOR_DIR, w / "ev")
        if edit:
            edit(w / "ev")
    return setup


def erase_run_id(model: Path) -> str:
    from diffunlearn.runs.resolve import resolve_erase

    return resolve_erase("core", ["dotted"], model=model).run_id


def out_with_marker(status: str | None = None, raw: str | None = None, same_run: bool = True, checkpoint=None):
    def setup(w: Path, model: Path):
        out = w / "out"
        out.mkdir()
        run_id = erase_run_id(model) if same_run else "0123456789ab"
        text = raw if raw is not None else json.dumps({"run_id": run_id, "kind": "erase", "status": status,
                                                       "step": 7})
        (out / "run.json").write_text(text)
        if checkpoint:
            checkpoint(out / "checkpoint")
    return setup


def truncated_checkpoint(folder: Path):
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir()
    save_file({"param.w": np.zeros((64, 64), dtype=np.float32)}, str(folder / "ckpt-00000002.safetensors"))
    data = (folder / "ckpt-00000002.safetensors").read_bytes()
    (folder / "ckpt-00000002.safetensors").write_bytes(data[: len(data) // 2])
    (folder / "ckpt.json").write_text(json.dumps({"step": 2, "file": "ckpt-00000002.safetensors"}))


def running_run_dir(w: Path, model: Path):
    """An erase run still running (or killed): its model/ must not be attacked or evaluated."""
    run = w / "run"
    shutil.copytree(model, run / "model")
    (run / "run.json").write_text(json.dumps({"run_id": "0123456789ab", "kind": "erase", "status": "running"}))
    (run / "config.yaml").write_text("task: {forget: [dotted]}\n")


def locked_out(w: Path, model: Path):
    """--out held by another live process (here: this test process, through its own descriptor)."""
    import fcntl

    out = w / "out"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps({"pid": 4242, "host": "elsewhere", "since": "today", "command": "diffunlearn erase"})
             .encode())
    return lambda: os.close(fd)


def read_only_parent(w: Path, model: Path):
    (w / "ro").mkdir()
    (w / "ro").chmod(0o555)
    return lambda: (w / "ro").chmod(0o755)


def several(*setups):
    def setup(w: Path, model: Path):
        cleanups = [s(w, model) for s in setups]
        return lambda: [c() for c in cleanups if c]
    return setup


LONG = "x" * 5000
CASES = [
    # names and concepts
    Case("unknown-method", ["erase", "cor", "--forget", "dotted", "--model", "{model}"], "did you mean 'core'"),
    Case("unknown-concept", ["erase", "core", "--forget", "doted", "--model", "{model}"], "did you mean 'dotted'"),
    Case("long-concept-name", ["erase", "core", "--forget", LONG, "--model", "{model}"], "unknown concept"),
    Case("forget-and-retain", [*E, "--retain", "dotted,grid"], "both forget and retain"),
    Case("forget-twice", ["erase", "core", "--forget", "dotted,dotted", "--model", "{model}"], "twice"),
    Case("retain-twice", [*E, "--retain", "grid,grid"], "twice"),
    Case("retain-empty", [*E, "--retain", ""], "task.retain"),
    Case("forget-empty", ["erase", "core", "--forget", "", "--model", "{model}"], "no forget concept"),
    Case("forget-missing", ["erase", "core", "--model", "{model}"], "no forget concept"),
    Case("neutral-concept", ["erase", "core", "--forget", "plain", "--model", "{model}"], "neutral"),
    Case("anchor-scheme", [*E, "task.anchor_scheme=nearest"], "anchor_scheme"),
    Case("anchor-fixed-unknown", [*E, "task.anchor_scheme=fixed:nothing"], "unknown concept"),
    # overrides: every one takes effect or is an error
    Case("misspelt-section", [*E, "metod.lr=5"], "did you mean 'method'"),
    Case("no-section", [*E, "lr=5"], "did you mean 'method.lr'"),
    Case("misspelt-method-key", [*E, "method.alpah=2"], "did you mean 'method.alpha'"),
    Case("misspelt-eval-key", [*E, "eval.imagse_per_prompt=2"], "did you mean 'eval.images_per_prompt'"),
    Case("misspelt-task-key", [*E, "task.foget=[grid]"], "did you mean 'task.forget'"),
    Case("override-no-equals", [*E, "method.lr"], "expected key=value"),
    Case("override-empty-key", [*E, "=5"], "empty key"),
    Case("override-empty-part", [*E, "method..lr=1"], "empty key"),
    Case("lr-text", [*E, "method.lr=abc"], "method.lr"),
    Case("lr-negative", [*E, "method.lr=-1"], "greater than 0"),
    Case("lr-zero", [*E, "method.lr=0"], "greater than 0"),
    Case("lr-inf", [*E, "method.lr=inf"], "finite"),
    Case("lr-nan", [*E, "method.lr=nan"], "finite"),
    Case("lr-yaml-inf", [*E, "method.lr=.inf"], "finite"),
    Case("lr-bool", [*E, "method.lr=true"], "boolean"),
    Case("grad-clip-negative", [*E, "method.grad_clip=-1"], "greater than 0"),
    Case("grad-clip-zero", [*E, "method.grad_clip=0"], "greater than 0"),
    Case("batch-zero", [*E, "method.batch_size=0"], "method.batch_size"),
    Case("batch-huge", [*E, "method.batch_size=100000000"], "less than or equal"),
    Case("steps-negative", [*E, "method.steps=-1"], "method.steps"),
    Case("steps-zero", [*E, "method.epochs=null", "method.steps=0"], "trains nothing"),
    Case("steps-and-epochs", [*E, "method.steps=5", "method.epochs=3"], "both method.steps and method.epochs"),
    Case("epochs-zero", [*E, "method.epochs=0"], "method.epochs"),
    Case("steps-fraction", [*E, "method.steps=2.5"], "method.steps"),
    Case("optimizer-typo", [*E, "method.optimizer=adamm"], "'adam'"),
    Case("param-group-typo", [*E, "method.param_group=xatn"], "method.param_group"),
    Case("profile-typo", [*E, "method.profile=papr"], "did you mean 'paper'"),
    Case("seed-bool", [*E, "seed=true"], "boolean"),
    Case("seed-text", [*E, "seed=abc"], "'seed'"),
    Case("seed-negative", [*E, "seed=-1"], "'seed'"),
    Case("seed-huge", [*E, "seed=100000000000000000000000"], "'seed'"),
    Case("eval-seed-bool", [*E, "eval.seed=true"], "boolean"),
    Case("task-seed-bool", [*E, "task.seed=true"], "boolean"),
    Case("eval-images-zero", [*E, "eval.images_per_prompt=0"], "eval.images_per_prompt"),
    Case("eval-batch-huge", [*E, "eval.batch_size=100000000"], "eval.batch_size"),
    Case("eval-evaluators-missing", [*E, "eval.evaluator=canvas:{w}/nowhere"], "no evaluator classifiers"),
    Case("task-images-zero", [*E, "task.images_per_prompt=0"], "task.images_per_prompt"),
    Case("method-not-mapping", [*E, "method=5"], "must be a mapping"),
    Case("method-name-conflict", [*E, "method.name=esd"], "names method 'esd'"),
    Case("model-path-mapping", [*E, "model.path.x=1"], "model.path"),
    Case("model-unknown-key", [*E, "model.bogus=1"], "model.bogus"),
    Case("task-not-mapping", [*E, "task=3"], "'task'"),
    Case("override-deep", [*E, "method.lr=" + "[" * 5000 + "1" + "]" * 5000], "nested deeper"),
    Case("override-long-value", [*E, "method.lr=" + LONG], "method.lr"),
    Case("override-undefined-alias", [*E, "method.lr=*nothing"], "method.lr"),
    # --threads
    Case("threads-zero", [*E, "--threads", "0"], "--threads"),
    Case("threads-negative", [*E, "--threads", "-1"], "--threads"),
    Case("threads-text", [*E, "--threads", "abc"], "--threads"),
    Case("threads-huge", [*E, "--threads", "100000"], "--threads"),
    # usage
    Case("unknown-option", [*E, "--bogus"], "No such option"),
    Case("missing-method", ["erase"], "Missing argument"),
    Case("unknown-command", ["erse"], "No such command"),
    Case("ls-unknown", ["ls", "nothing"], "unknown listing"),
    # config files
    Case("config-missing", [*E, "--config", "{w}/missing.yaml"], "not found"),
    Case("config-malformed", [*E, "--config", "{w}/c.yaml"], "malformed YAML", write("c.yaml", "method:\n  lr: [1\n")),
    Case("config-binary", [*E, "--config", "{w}/c.yaml"], "not UTF-8",
         write("c.yaml", bytes(range(128, 256)) * 8)),
    Case("config-latin1", [*E, "--config", "{w}/c.yaml"], "not UTF-8",
         write("c.yaml", b"task: {forget: [d\xe9j\xe0]}\n")),
    Case("config-deep", [*E, "--config", "{w}/c.yaml"], "nested deeper", write("c.yaml", nested_yaml(20000))),
    Case("config-alias-bomb", [*E, "--config", "{w}/c.yaml"], "expands to more than", write("c.yaml", alias_bomb())),
    Case("config-recursive-alias", [*E, "--config", "{w}/c.yaml"], "recursive alias",
         write("c.yaml", "method: &m {x: *m}\n")),
    Case("config-top-list", [*E, "--config", "{w}/c.yaml"], "must be a mapping", write("c.yaml", "- a\n- b\n")),
    Case("config-python-tag", [*E, "--config", "{w}/c.yaml"], "malformed YAML",
         write("c.yaml", "method: !!python/object/apply:os.system ['touch {w}/pwned']\n")),
    Case("config-unknown-top", [*E, "--config", "{w}/c.yaml"], "unknown config key 'bogus'",
         write("c.yaml", "bogus: 1\n")),
    Case("config-directory", [*E, "--config", "{w}/adir"], "is a directory", write("adir/keep", "x")),
    Case("config-huge", [*E, "--config", "{w}/c.yaml"], "bytes", write("c.yaml", "# " + "x" * (2 << 20) + "\n")),
    Case("config-nul", [*E, "--config", "{w}/c.yaml"], "malformed YAML", write("c.yaml", "task: \x00\n")),
    Case("config-method-conflict", [*E, "--config", "{w}/c.yaml"], "names method 'esd'",
         write("c.yaml", "method: esd\n")),
    Case("config-model-number", ["erase", "core", "--forget", "dotted", "--config", "{w}/c.yaml"], "'model'",
         write("c.yaml", "model: 5\n")),
    # validate
    Case("validate-missing", ["validate", "{w}/missing.yaml"], "not found"),
    Case("validate-binary", ["validate", "{w}/c.yaml"], "not UTF-8", write("c.yaml", b"\x89PNG\r\n\x1a\n\x00\x00")),
    Case("validate-latin1", ["validate", "{w}/c.yaml"], "not UTF-8", write("c.yaml", b"method: caf\xe9\n")),
    Case("validate-deep", ["validate", "{w}/c.yaml"], "nested deeper", write("c.yaml", nested_yaml(20000))),
    Case("validate-alias-bomb", ["validate", "{w}/c.yaml"], "expands to more than", write("c.yaml", alias_bomb())),
    Case("validate-self-base", ["validate", "{w}/c.yaml"], "loops back",
         several(write("c.yaml", "method: core\ntask: {forget: [dotted]}\nmodel: {w}/self\n"),
                 bad_model("self", base_is(lambda f: ".")))),
    # model folders
    Case("model-missing", ["erase", "core", "--forget", "dotted", "--model", "{w}/nowhere"], "model folder not found"),
    Case("model-is-file", ["erase", "core", "--forget", "dotted", "--model", "{w}/f"], "model folder not found",
         write("f", "x")),
    Case("model-truncated-unet", ["erase", "core", "--forget", "dotted", "--model", "{w}/m"], "corrupt safetensors",
         bad_model("m", truncate("unet/diffusion_pytorch_model.safetensors"))),
    Case("model-no-tokenizer", ["erase", "core", "--forget", "dotted", "--model", "{w}/m"], "tokenizer",
         bad_model("m", remove("tokenizer"))),
    Case("model-no-scheduler", ["erase", "core", "--forget", "dotted", "--model", "{w}/m"], "scheduler",
         bad_model("m", remove("scheduler/scheduler_config.json"))),
    Case("model-no-text-weights", ["erase", "core", "--forget", "dotted", "--model", "{w}/m"],
         "text_encoder/model.safetensors", bad_model("m", remove("text_encoder/model.safetensors"))),
    Case("model-pickle-text-encoder", ["erase", "core", "--forget", "dotted", "--model", "{w}/m"], "--allow-pickle",
         bad_model("m", pickle_text_encoder)),
    Case("model-pickle-allowed-but-malicious", ["erase", "core", "--forget", "dotted", "--model", "{w}/m",
                                                "--allow-pickle"], "cannot load model folder",
         bad_model("m", pickle_text_encoder), torch=True),
    Case("model-unet-cross-attention", ["erase", "core", "--forget", "dotted", "--model", "{w}/m"], "does not match",
         bad_model("m", edit_json("unet/config.json", cross_attention_dim=48))),
    Case("model-unet-layers", ["erase", "core", "--forget", "dotted", "--model", "{w}/m"], "cannot load model folder",
         bad_model("m", edit_json("unet/config.json", layers_per_block=2)), torch=True),
    Case("model-unet-config-corrupt", ["erase", "core", "--forget", "dotted", "--model", "{w}/m"], "corrupt",
         bad_model("m", lambda f: (f / "unet" / "config.json").write_text("{unet"))),
    Case("model-tokenizer-config-corrupt", ["erase", "core", "--forget", "dotted", "--model", "{w}/m"], "corrupt",
         bad_model("m", lambda f: (f / "tokenizer" / "tokenizer_config.json").write_bytes(b"\xff\xfe"))),
    Case("model-meta-not-object", ["erase", "core", "--forget", "dotted", "--model", "{w}/m"], "JSON object",
         bad_model("m", lambda f: (f / "diffunlearn.json").write_text("[1, 2]"))),
    Case("model-self-base", ["erase", "core", "--forget", "dotted", "--model", "{w}/m"], "loops back",
         bad_model("m", base_is(lambda f: "."))),
    Case("model-base-cycle", ["erase", "core", "--forget", "dotted", "--model", "{w}/a"], "loops back", base_cycle),
    Case("model-base-missing", ["erase", "core", "--forget", "dotted", "--model", "{w}/m"], "model folder not found",
         bad_model("m", base_is(lambda f: str(f.parent / "gone")))),
    Case("model-base-changed", ["erase", "core", "--forget", "dotted", "--concepts", "canvas", "--model", "{w}/stale"],
         "now has hash", run_model_with_stale_base, torch=True),
    # model families and layouts diffunlearn does not load
    Case("model-sdxl", ["erase", "core", "--forget", "dotted", "--model", "{w}/m"], "(SDXL), which diffunlearn does",
         bad_model("m", edit_json("model_index.json", _class_name="StableDiffusionXLPipeline"))),
    Case("model-flux", ["erase", "core", "--forget", "dotted", "--model", "{w}/m"], "FluxPipeline model (Flux)",
         foreign_model("FluxPipeline", "transformer")),
    Case("model-sd3", ["erase", "core", "--forget", "dotted", "--model", "{w}/m"], "(SD3)",
         foreign_model("StableDiffusion3Pipeline", "transformer")),
    Case("model-inpainting", ["erase", "core", "--forget", "dotted", "--model", "{w}/m"], "(SD inpainting)",
         bad_model("m", edit_json("model_index.json", _class_name="StableDiffusionInpaintPipeline"))),
    Case("model-text-encoder-2", ["erase", "core", "--forget", "dotted", "--model", "{w}/m"], "SDXL-style",
         bad_model("m", add_part("text_encoder_2"))),
    Case("model-transformer", ["erase", "core", "--forget", "dotted", "--model", "{w}/m"], "diffusion transformer",
         bad_model("m", add_part("transformer"))),
    Case("model-unet-added-conditioning", ["erase", "core", "--forget", "dotted", "--model", "{w}/m"], "text_time",
         bad_model("m", edit_json("unet/config.json", addition_embed_type="text_time"))),
    Case("model-unet-inpainting-channels", ["erase", "core", "--forget", "dotted", "--model", "{w}/m"],
         "inpainting/depth-style", bad_model("m", edit_json("unet/config.json", in_channels=9))),
    Case("model-prediction-type", ["erase", "core", "--forget", "dotted", "--model", "{w}/m"],
         "prediction_type 'flow_prediction' is not supported",
         bad_model("m", edit_json("scheduler/scheduler_config.json", prediction_type="flow_prediction"))),
    # single-file checkpoints
    Case("single-file-no-config", ["erase", "core", "--forget", "dotted", "--model", "{w}/sd.safetensors"],
         "model.config=FOLDER", single_file("sd.safetensors", config=False)),
    Case("single-file-pickle", ["erase", "core", "--forget", "dotted", "--model", "{w}/sd.ckpt",
                                "model.config={w}/cfg"], "--allow-pickle", single_file("sd.ckpt")),
    Case("single-file-not-sd", ["erase", "core", "--forget", "dotted", "--model", "{w}/sd.safetensors",
                                "model.config={w}/cfg"], "no Stable Diffusion UNet",
         single_file("sd.safetensors", key="transformer.x")),
    Case("single-file-config-missing", ["erase", "core", "--forget", "dotted", "--model", "{w}/sd.safetensors",
                                        "model.config={w}/nowhere"], "config folder not found",
         single_file("sd.safetensors", config=False)),
    Case("single-file-config-incomplete", ["erase", "core", "--forget", "dotted", "--model", "{w}/sd.safetensors",
                                           "model.config={w}/cfg"], "lacks vae/config.json",
         single_file("sd.safetensors")),
    Case("single-file-truncated", ["erase", "core", "--forget", "dotted", "--model", "{w}/sd.safetensors",
                                   "model.config={w}/cfg"], "corrupt safetensors",
         several(single_file("sd.safetensors"), garbage("sd.safetensors"))),
    Case("single-file-malicious-ckpt", ["erase", "core", "--forget", "dotted", "--model", "{w}/sd.ckpt",
                                        "model.config={w}/cfg", "--allow-pickle"], "Weights only load failed",
         several(single_file("sd.ckpt"), lambda w, m: add_part("vae")(w / "cfg")), torch=True),
    Case("model-config-for-a-folder", [*E, "model.config={w}"], "model.config is for a single-file checkpoint"),
    Case("evaluate-single-file", ["evaluate", "--model", "{w}/sd.safetensors", "--forget", "dotted"],
         "is a single-file checkpoint", single_file("sd.safetensors", config=False)),
    # evaluators
    Case("evaluators-truncated", [*E, "eval.evaluator=canvas:{w}/ev"], "corrupt safetensors",
         evaluators(truncate("style.safetensors"))),
    Case("evaluators-bad-config", [*E, "eval.evaluator=canvas:{w}/ev"], "corrupt evaluator config",
         evaluators(lambda f: (f / "config.json").write_text("{}"))),
    Case("evaluators-wrong-width", [*E, "eval.evaluator=canvas:{w}/ev"], "cannot load the evaluators",
         evaluators(edit_json("config.json", width=7)), torch=True),
    # the output directory
    Case("out-is-file", [*E, "--out", "{w}/f"], "not a directory", write("f", "x")),
    Case("out-under-file", [*E, "--out", "{w}/f/run"], "cannot create", write("f", "x")),
    Case("out-not-empty", [*E, "--out", "{w}/out"], "not empty", write("out/notes.txt", "mine")),
    Case("out-other-run", [*E, "--out", "{w}/out"], "different run", out_with_marker("complete", same_run=False)),
    Case("out-corrupt-marker", [*E, "--out", "{w}/out"], "corrupt run.json", out_with_marker(raw="{not json")),
    Case("out-marker-not-object", [*E, "--out", "{w}/out"], "corrupt run.json", out_with_marker(raw="[1]")),
    Case("out-unknown-status", [*E, "--out", "{w}/out"], "unknown status", out_with_marker("weird")),
    Case("out-diverged", [*E, "--out", "{w}/out"], "diverged at step 7", out_with_marker("diverged")),
    Case("out-truncated-checkpoint", [*E, "--out", "{w}/out"], "corrupt checkpoint",
         out_with_marker("running", checkpoint=truncated_checkpoint)),
    Case("out-locked", [*E, "--out", "{w}/out"], "in use by pid 4242", locked_out),
    Case("out-read-only-parent", [*E, "--out", "{w}/ro/run"], "not writable", read_only_parent),
    # evaluate
    Case("evaluate-out-file", ["evaluate", "--model", "{model}", "--forget", "dotted", "--out", "{w}/f"],
         "not a directory", write("f", "x")),
    Case("evaluate-out-not-empty", ["evaluate", "--model", "{model}", "--forget", "dotted", "--out", "{w}/out"],
         "not empty", write("out/notes.txt", "mine")),
    Case("evaluate-other-override", ["evaluate", "--model", "{model}", "--forget", "dotted", "method.lr=5"],
         "only eval.*"),
    Case("evaluate-unknown-concept", ["evaluate", "--model", "{model}", "--forget", "dottd"], "did you mean"),
    Case("evaluate-disabled", ["evaluate", "--model", "{model}", "--forget", "dotted", "eval.enabled=false"],
         "nothing to evaluate"),
    Case("evaluate-running-run", ["evaluate", "--model", "{w}/run", "--forget", "dotted"], "not complete",
         running_run_dir),
    Case("evaluate-threads-zero", ["evaluate", "--model", "{model}", "--forget", "dotted", "--threads", "0"],
         "--threads"),
    Case("evaluate-locked", ["evaluate", "--model", "{model}", "--forget", "dotted", "--out", "{w}/out"],
         "in use by pid 4242", locked_out),
    # attacks
    Case("attack-unknown", ["attack", "relern", "--forget", "dotted"], "No such command"),
    Case("attack-unknown-key", [*A, "attack.dat=retain"], "did you mean 'attack.data'"),
    Case("attack-bad-value", [*A, "attack.data=test"], "attack.data"),
    Case("attack-no-forget", ["attack", "relearn", "--model", "{model}"], "--forget"),
    Case("attack-running-run", ["attack", "relearn", "--model", "{w}/run"], "not complete", running_run_dir),
    Case("attack-steps-zero", [*A, "attack.steps=0"], "trains nothing"),
    Case("attack-erase-and-out", ["attack", "relearn", "--erase", "core", "--forget", "dotted", "--out", "{w}/x"],
         "--erase chains"),
    Case("attack-original-not-path", [*A, "original.x=1"], "'original'"),
    Case("attack-threads-negative", [*A, "--threads", "-1"], "--threads"),
    Case("attack-out-other-run", [*A, "--out", "{w}/out"], "different run", out_with_marker("complete")),
    Case("attack-lr-inf", [*A, "attack.lr=inf"], "finite"),
    Case("attack-out-locked", [*A, "--out", "{w}/out"], "in use by pid 4242", locked_out),
    # demo
    Case("demo-out-not-empty", ["demo", "--out", "{w}/d"], "holds no demo", write("d/notes.txt", "mine")),
    Case("demo-threads-zero", ["demo", "--out", "{w}/d", "--threads", "0"], "--threads"),
    Case("pretrain-threads-zero", ["pretrain", "evaluators", "--out", "{w}/p", "--threads", "0"], "--threads"),
]


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` with its kind and, for files, a hash of its bytes."""
    state = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            state[rel] = "link"
        elif path.is_dir():
            state[rel] = "dir"
        else:
            state[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def expand(args: list[str], w: Path, model: Path) -> list[str]:
    return [a.replace("{w}", str(w)).replace("{model}", str(model)) for a in args]


def check_error(exit_code: int, stderr: str, case: Case) -> None:
    assert exit_code == 2, f"{case.id}: exit {exit_code}: {stderr[-2000:]}"
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"{case.id}: {len(lines)} lines: {stderr[:2000]}"
    assert len(lines[0]) < MAX_LINE, f"{case.id}: {len(lines[0])} characters: {lines[0][:400]}"
    assert lines[0].startswith("error: "), lines[0]
    assert case.expect in lines[0], f"{case.id}: {case.expect!r} not in {lines[0]!r}"


def prepare(case: Case, w: Path, model: Path):
    w.mkdir(parents=True, exist_ok=True)
    cleanup = case.setup(w, model) if case.setup else None
    return cleanup, snapshot(w)


def test_catalogue_is_large_and_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 60


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, tiny_model_dir, monkeypatch):
    if case.id == "out-read-only-parent" and os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    w = tmp_path / "w"
    cleanup, before = prepare(case, w, tiny_model_dir)
    monkeypatch.chdir(w)
    try:
        result = CliRunner().invoke(app, expand(case.args, w, tiny_model_dir))
        check_error(result.exit_code, result.stderr, case)
        assert snapshot(w) == before, f"{case.id} changed the tree under its working directory"
    finally:
        if cleanup:
            cleanup()


def test_validation_errors_never_import_torch(tmp_path, tiny_model_dir):
    """All cases that need no model loading fail in one fresh interpreter that never imports torch."""
    cases = [c for c in CASES if not c.torch and not (c.id == "out-read-only-parent" and os.geteuid() == 0)]
    plans, cleanups, snapshots = [], [], []
    for i, case in enumerate(cases):
        w = tmp_path / f"c{i}"
        cleanup, before = prepare(case, w, tiny_model_dir)
        cleanups.append(cleanup)
        snapshots.append((w, before, case))
        plans.append((case.id, str(w), expand(case.args, w, tiny_model_dir)))
    script = textwrap.dedent("""
        import json, os, sys
        from typer.testing import CliRunner
        from diffunlearn.cli import app
        results = []
        for case_id, workdir, args in json.loads(sys.stdin.read()):
            os.chdir(workdir)
            result = CliRunner().invoke(app, args)
            results.append([case_id, result.exit_code, result.stderr])
        results.append(["torch imported", "torch" in sys.modules, ""])
        print(json.dumps(results))
    """)
    proc = subprocess.run([sys.executable, "-c", script], input=json.dumps(plans), capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    try:
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = json.loads(proc.stdout.strip().splitlines()[-1])
        assert results[-1] == ["torch imported", False, ""], "torch was imported before validation finished"
        by_id = {case.id: case for case in cases}
        for case_id, code, stderr in results[:-1]:
            check_error(code, stderr, by_id[case_id])
        for w, before, case in snapshots:
            assert snapshot(w) == before, f"{case.id} changed the tree under its working directory"
    finally:
        for cleanup in cleanups:
            if cleanup:
                cleanup()
