"""The `diffunlearn` command line: a thin layer over the Python API (api.py, runs/).

Input is validated before torch is imported; an error a user can cause prints one line on
stderr and exits with status 2, having written nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from diffunlearn.backends.model_dir import ModelDirError
from diffunlearn.config import ConfigError
from diffunlearn.data.tasks import TaskError
from diffunlearn.registry import UnknownNameError
from diffunlearn.runs.resolve import RunDirError

app = typer.Typer(
    help="Erase concepts from text-to-image diffusion models, measure what was erased and kept, "
         "and attack the result to see whether it lasts.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
pretrain_app = typer.Typer(help="Train the shipped testbed (model or evaluator classifiers).", no_args_is_help=True)
app.add_typer(pretrain_app, name="pretrain")
attack_app = typer.Typer(help="Attack an unlearned model and watch whether the erased concepts come back "
                              "(see `diffunlearn ls attacks`).", no_args_is_help=True)
app.add_typer(attack_app, name="attack")

USER_ERRORS = (ConfigError, TaskError, ModelDirError, UnknownNameError, RunDirError, FileNotFoundError)
# CheckpointError (engine/checkpoint.py) imports torch, so it is matched by name in guarded().
T = TypeVar("T")


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def guarded(fn: Callable[[], T]) -> T:
    """Run `fn`, turning errors a user can cause into one line and exit status 2."""
    try:
        return fn()
    except USER_ERRORS as err:
        fail(str(err))
    except ValueError as err:
        if type(err).__name__ != "CheckpointError":
            raise
        fail(str(err))
    except KeyboardInterrupt:
        typer.echo("interrupted; rerun the same command to resume from the last checkpoint", err=True)
        raise typer.Exit(130) from None


def split_names(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


ForgetOpt = Annotated[str | None, typer.Option("--forget", "-f", help="Concept(s) to erase, comma-separated.")]
ModelOpt = Annotated[Path | None, typer.Option(
    "--model", "-m", help="Model folder (diffusers layout) or an erase run's directory; default: the shipped testbed.")]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help="torch CPU threads (not part of the run id).")]
OverridesArg = Annotated[list[str] | None, typer.Argument(
    help="Overrides as dotted key=value, e.g. method.lr=1e-5 eval.images_per_prompt=4 task.anchor_scheme=next.",
    show_default=False)]


@app.command()
def erase(
    method: Annotated[str, typer.Argument(help="Method name (see `diffunlearn ls methods`).")],
    forget: ForgetOpt = None,
    retain: Annotated[str | None, typer.Option(help="Retain concepts, comma-separated; default: all others.")] = None,
    model: ModelOpt = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (method/task/eval/model).")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory; default runs/<method>-<id>.")] = None,
    threads: ThreadsOpt = None,
    overrides: OverridesArg = None,
) -> None:
    """Erase concepts with a method, evaluate before and after, and write a run directory.

    Precedence: method defaults < profile (paper | testbed) < --config YAML < flags and key=value.
    Rerunning a finished run is a no-op; an interrupted one resumes from its last checkpoint.
    """
    from diffunlearn import api

    result = guarded(lambda: api.erase(method, split_names(forget), split_names(retain), model, config,
                                       out, overrides or [], threads, progress=sys.stderr.isatty(),
                                       notify=lambda line: typer.echo(line, err=True)))
    if not result.skipped:
        _print_summary(result.metrics, result.out)


def _attack_command(name: str, summary: str):
    def command(
        model: ModelOpt = None,
        forget: Annotated[str | None, typer.Option(
            "--forget", "-f", help="Erased concept(s), comma-separated; needed when the model is not an erase run "
                                   "(the original model or a retrain, as controls).")] = None,
        config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (attack/task/eval/model).")
                          ] = None,
        out: Annotated[Path | None, typer.Option(
            "--out", "-o", help="Run directory; default: <attacked run>/attacks/<attack>-<id>.")] = None,
        original: Annotated[Path | None, typer.Option(
            help="The model before unlearning (distances, generated data); default: the run's base.")] = None,
        erase_method: Annotated[str | None, typer.Option(
            "--erase", help="Chain: first erase --forget with this method (method.*/task.* overrides), then attack.")
                                ] = None,
        threads: ThreadsOpt = None,
        overrides: OverridesArg = None,
    ) -> None:
        from diffunlearn import api

        notify = lambda line: typer.echo(line, err=True)  # noqa: E731
        progress = sys.stderr.isatty()
        if erase_method:
            if out or original or config:
                fail("--erase chains two runs in their default directories; drop --out/--original/--config")
            _, result = guarded(lambda: api.erase_then_attack(erase_method, name, split_names(forget) or [],
                                                              model, overrides or [], threads, progress, notify))
        else:
            result = guarded(lambda: api.attack(name, model, split_names(forget), config, out, overrides or [],
                                                threads, progress, original, notify))
        if not result.skipped:
            _print_attack_summary(result.metrics, result.out)

    command.__doc__ = (f"{summary}\n\nOverrides: attack.<option>=value (see `diffunlearn ls attacks`), "
                       "eval.<key>=value, task.<key>=value. Writes model/, metrics.json (curve and summary), "
                       "attack_curve.csv, curves.csv, samples.png; reruns skip or resume.")
    return command


attack_app.command("relearn")(_attack_command(
    "relearn", "DiMRA ([002]): fine-tune on the retain set (attack.data=retain, assumption i) or same-distribution "
               "data without the concept (attack.data=heldout|generated, assumption ii)."))
attack_app.command("resurgence")(_attack_command(
    "resurgence", "Benign fine-tuning ([000]): full or LoRA (attack.mode=lora) on random in-domain concepts, a "
                  "similarity tercile (attack.data=terciles) or out-of-domain concepts."))


def _print_attack_summary(metrics: dict, out: Path) -> None:
    s = metrics.get("summary", {})
    parts = [f"{k}={s[k]:.1f}" for k in ("AR_MU_top1", "AR_DiMRA_top1", "AR_DiMRA_top3", "AR_CL_min",
                                         "retain_acc_before", "retain_acc_after", "FID_before", "FID_after")
             if isinstance(s.get(k), int | float)]
    if isinstance(s.get("travelled_back_fraction"), int | float):
        parts.append(f"travelled_back={100 * s['travelled_back_fraction']:.1f}%")
    typer.echo(" ".join(parts))
    typer.echo(f"written to {out}")


@app.command()
def evaluate(
    model: ModelOpt = None,
    forget: ForgetOpt = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for evaluation.json.")] = None,
    threads: ThreadsOpt = None,
    overrides: OverridesArg = None,
) -> None:
    """Evaluate a model on forget concepts: UA, IRA, CRA, AR, FID/KID, with confidence intervals."""
    from diffunlearn import api

    metrics = guarded(lambda: api.evaluate(model, split_names(forget), out, overrides or [], threads,
                                           progress=sys.stderr.isatty()))
    _print_summary(metrics, out)


@app.command("ls")
def ls(what: Annotated[str, typer.Argument(help="methods | attacks | concepts | metrics")]) -> None:
    """List the registered methods, the attacks and their options, the testbed's concepts, or the metrics."""
    from diffunlearn.data import canvas
    from diffunlearn.methods import methods

    if what == "methods":
        for name in methods.names():
            typer.echo(f"{name:14s} {methods.help(name)}")
    elif what == "concepts":
        typer.echo("style:  " + " ".join(canvas.STYLES) + f"   (neutral: {canvas.NEUTRAL_STYLE})")
        typer.echo("object: " + " ".join(canvas.OBJECTS) + f"   (neutral: {canvas.NEUTRAL_OBJECT})")
    elif what == "attacks":
        from diffunlearn.attacks import attacks

        for name in attacks.names():
            typer.echo(f"{name:12s} {attacks.help(name)}")
            for profile, values in attacks.get(name).profiles.items():
                typer.echo(f"    profile {profile}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
            for field, info in attacks.get(name).Config.model_fields.items():
                default = info.default if info.default_factory is None else info.default_factory()
                typer.echo(f"    attack.{field:18s} {default!s:10s} {info.description or ''}")
    elif what == "metrics":
        from diffunlearn.metrics import METRIC_HELP

        for name, text in METRIC_HELP.items():
            typer.echo(f"{name:12s} {text}")
    else:
        fail(f"unknown listing '{what}'; valid: methods, attacks, concepts, metrics")


@app.command()
def validate(config: Annotated[Path, typer.Argument(help="YAML config to check.")]) -> None:
    """Check a config file (method, task, eval, model) without loading any model."""
    from diffunlearn.runs.resolve import resolve_erase

    resolved = guarded(lambda: resolve_erase(None, config_file=config))
    typer.echo(f"ok: {resolved.method} (profile {resolved.profile}), forget {','.join(resolved.task.forget)}, "
               f"run id {resolved.run_id}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Demo directory.")] = Path("runs/demo"),
    threads: ThreadsOpt = None,
) -> None:
    """Erase one style with CORE from the shipped model and write a report (about 3 minutes)."""
    from diffunlearn import api

    report = guarded(lambda: api.demo(out, threads, progress=sys.stderr.isatty()))
    typer.echo(f"report: {report}")


# ---- benchmark grids -------------------------------------------------------------------------

RootOpt = Annotated[Path, typer.Option("--root", help="Results folder: results.sqlite and <recipe>/ run folders.")]


def _bench_guarded(fn: Callable[[], T]) -> T:
    from diffunlearn.bench.executors import MissingExtra

    try:
        return guarded(fn)
    except MissingExtra as err:
        fail(str(err))


@app.command()
def bench(
    recipe: Annotated[str, typer.Argument(help="A shipped recipe (see `diffunlearn bench ls`), a YAML file, or 'ls'.")],
    jobs: Annotated[int | None, typer.Option("--jobs", "-j", help="Runs at once; default: one per core (max 8).")
                    ] = None,
    executor: Annotated[str, typer.Option(help="local | ray | slurm (the last two are optional extras).")] = "local",
    address: Annotated[str | None, typer.Option(help="ray: cluster address (default: a local cluster).")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads per run; default 1 when --jobs > 1.")] = None,
    model: ModelOpt = None,
    protocol: Annotated[str, typer.Option(help="Evaluation protocol of the recipe: fast (default) or full.")
                        ] = "fast",
    seeds: Annotated[str | None, typer.Option(help="Comma-separated seeds; default: the recipe's.")] = None,
    groups: Annotated[str | None, typer.Option(help="Only these groups of the recipe, comma-separated.")] = None,
    root: RootOpt = Path("runs/bench"),
    retries: Annotated[int, typer.Option(help="Times a failed run is retried.")] = 1,
    gpus_per_run: Annotated[float, typer.Option(help="ray/slurm: GPUs each run asks for.")] = 0.0,
    cluster: Annotated[str | None, typer.Option(help="slurm: submitit cluster (slurm, local, debug); default: "
                                                     "Slurm when available, else local.")] = None,
    partition: Annotated[str | None, typer.Option(help="slurm: partition.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the runs and the estimated time; run nothing.")
                       ] = False,
) -> None:
    """Run a benchmark recipe: expand it into erase/attack/evaluate runs, skip finished ones, resume
    interrupted ones, run attacks after their erase runs, record everything in the results store.

    `diffunlearn bench ls` lists the shipped recipes; `diffunlearn results RECIPE` prints the
    leaderboard and the claims; `diffunlearn report RECIPE --out report.html` writes the report.
    """
    from diffunlearn.bench import default_jobs, expand, load_recipe, run_bench, shipped_recipes

    if recipe == "ls":
        for name in shipped_recipes():
            r = guarded(lambda name=name: load_recipe(name))
            first = r.description.split(". ")[0].split(": ")[0]
            typer.echo(f"{name:12s} {r.estimate.runs:4d} runs  ~{r.estimate.minutes:4.0f} min  {r.paper}: "
                       f"{first[:90]}")
        return
    loaded = guarded(lambda: load_recipe(recipe))
    seed_list = [int(s) for s in split_names(seeds)] if seeds else None
    group_list = split_names(groups)
    if executor not in ("local", "ray", "slurm"):
        fail(f"unknown executor '{executor}'; valid: local, ray, slurm")
    if dry_run:
        nodes = guarded(lambda: expand(loaded, root, model=model, protocol=protocol, seeds=seed_list,
                                       groups=group_list))
        for n in nodes:
            typer.echo(f"{n.kind:8s} {n.node}  ~{n.est_seconds:.0f} s  {n.out}")
        n_jobs = jobs or default_jobs()
        total = sum(n.est_seconds for n in nodes)
        typer.echo(f"{len(nodes)} runs, ~{total / 60 / n_jobs:.0f} min with {n_jobs} jobs (cold caches; "
                   "finished runs are skipped)")
        return
    result = _bench_guarded(lambda: run_bench(loaded, jobs=jobs, executor=executor, root=root, model=model,
                                              protocol=protocol, seeds=seed_list, groups=group_list,
                                              threads=threads, retries=retries, address=address,
                                              gpus_per_run=gpus_per_run, cluster=cluster, partition=partition))
    typer.echo(f"{loaded.name}: {len(result.done)} run, {len(result.skipped)} already done, "
               f"{len(result.failed)} failed, {len(result.blocked)} blocked by a failed run "
               f"({result.seconds / 60:.1f} min); `diffunlearn results {loaded.name}` for the leaderboard")
    if result.failed:
        typer.echo("failed: " + ", ".join(result.failed) + f" (logs in {root / loaded.name / 'logs'})", err=True)
    if not result.ok:
        raise typer.Exit(1)


@app.command()
def results(
    recipe: Annotated[str, typer.Argument(help="A shipped recipe or a YAML file.")],
    root: RootOpt = Path("runs/bench"),
    model: ModelOpt = None,
    protocol: Annotated[str, typer.Option(help="The protocol the recipe ran with.")] = "fast",
    csv: Annotated[Path | None, typer.Option(help="Also write one row per run (all metrics) to this CSV.")] = None,
) -> None:
    """Print a recipe's leaderboard (means with 95% t-intervals over seeds) and its claims' verdicts."""
    from diffunlearn.bench import load_recipe
    from diffunlearn.bench.results import results as frame_of
    from diffunlearn.bench.results import summary_text

    loaded = guarded(lambda: load_recipe(recipe))
    frame = guarded(lambda: frame_of(loaded, root, model=model, protocol=protocol))
    typer.echo(summary_text(loaded, frame))
    if csv:
        frame.to_csv(csv, index=False)
        typer.echo(f"runs written to {csv}")


@app.command()
def report(
    recipe: Annotated[str, typer.Argument(help="A shipped recipe or a YAML file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The HTML file to write.")] = Path("report.html"),
    root: RootOpt = Path("runs/bench"),
    model: ModelOpt = None,
    protocol: Annotated[str, typer.Option(help="The protocol the recipe ran with.")] = "fast",
) -> None:
    """Write a recipe's report: one self-contained HTML file (claims, leaderboard, plots, samples)."""
    from diffunlearn.bench import bench_report, load_recipe

    loaded = guarded(lambda: load_recipe(recipe))
    command = f"diffunlearn bench {recipe}" + (f" --model {model}" if model else "") + (
        f" --protocol {protocol}" if protocol != "fast" else "")
    path = guarded(lambda: bench_report(loaded, out, root, model=model, protocol=protocol, command=command))
    typer.echo(f"report: {path}")


def load_recipe(model_cls, default_name: str, config: Path | None, overrides: list[str] | None):
    """A pretraining recipe: the committed YAML (or --config) with key=value overrides, validated."""
    from diffunlearn.config import CONFIG_DIR, apply_overrides, build, load_yaml

    return guarded(lambda: build(model_cls, apply_overrides(load_yaml(config or CONFIG_DIR / default_name),
                                                            overrides or [])))


@pretrain_app.command("model")
def pretrain_model(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (resumable).")] = Path("runs/pretrain-model"),
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Default: the committed recipe.")] = None,
    threads: ThreadsOpt = None,
    install: Annotated[bool, typer.Option(help="Copy the result into the package's assets.")] = False,
    overrides: OverridesArg = None,
) -> None:
    """Train the testbed text-to-image model (UNet + text encoder) from the committed recipe."""
    from diffunlearn.config import PretrainModelConfig

    cfg = load_recipe(PretrainModelConfig, "pretrain-model.yaml", config, overrides)
    from diffunlearn.pretrain import install_assets
    from diffunlearn.pretrain import pretrain_model as train
    from diffunlearn.runs.resolve import ASSETS

    train(cfg, out, threads, progress=sys.stderr.isatty())
    if install:
        install_assets(out / "model", None, ASSETS)
    typer.echo(f"model written to {out / 'model'}")


@pretrain_app.command("evaluators")
def pretrain_evaluators(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("runs/pretrain-evaluators"),
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Default: the committed recipe.")] = None,
    threads: ThreadsOpt = None,
    install: Annotated[bool, typer.Option(help="Copy the result into the package's assets.")] = False,
    overrides: OverridesArg = None,
) -> None:
    """Train the style and object evaluator classifiers on real canvas images."""
    from diffunlearn.config import PretrainEvaluatorConfig

    cfg = load_recipe(PretrainEvaluatorConfig, "pretrain-evaluators.yaml", config, overrides)
    from diffunlearn.pretrain import install_assets
    from diffunlearn.pretrain import pretrain_evaluators as train
    from diffunlearn.runs.resolve import ASSETS

    _, figures = train(cfg, out, threads, progress=sys.stderr.isatty())
    if install:
        install_assets(None, out / "evaluators", ASSETS)
    typer.echo(f"evaluators written to {out / 'evaluators'}: {figures}")


def _print_summary(metrics: dict, out: Path | None) -> None:
    after = metrics.get("after", metrics)
    before = metrics.get("before")
    keys = ("UA", "UA_partial", "IRA", "CRA", "SFID", "Total", "FID")
    typer.echo(" ".join(f"{k}={after[k]:.1f}" for k in keys if isinstance(after.get(k), int | float)))
    if before:
        shown = [k for k in keys if isinstance(before.get(k), int | float)]
        typer.echo("before: " + " ".join(f"{k}={before[k]:.1f}" for k in shown))
    if out:
        typer.echo(f"written to {out}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
