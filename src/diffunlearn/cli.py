"""The `diffunlearn` command line: a thin layer over the Python API (api.py, runs/).

Input is validated before torch is imported; an error a user can cause (including a usage
error such as an unknown option) prints one line of at most MAX_ERROR_CHARS characters on
stderr and exits with status 2, having written nothing. Exit statuses: 0 done (or already
done), 2 bad input, 3 training diverged (the run is marked `diverged`), 130 interrupted.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from typer.core import TyperGroup

try:  # typer >= 0.20 ships its own copy of click; older ones use click itself
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover
    from click import exceptions as click_exceptions

from diffunlearn.backends.model_dir import ModelDirError
from diffunlearn.config import ConfigError
from diffunlearn.data.tasks import TaskError
from diffunlearn.engine.errors import CheckpointError, TrainingDiverged
from diffunlearn.registry import UnknownNameError
from diffunlearn.runs.resolve import RunDirError, check_threads

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130
MAX_ERROR_CHARS = 280  # the whole line, "error: " included


class OneLineErrors(TyperGroup):
    """Click's usage errors (unknown option, missing argument, bad --threads) as one line and
    exit status 2, like every other user error, instead of a usage block and a framed panel."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_exceptions.NoArgsIsHelpError as err:
            if not standalone_mode:
                raise
            err.show()  # the help text, as click shows it
            sys.exit(err.exit_code)
        except click_exceptions.ClickException as err:
            if not standalone_mode:
                raise
            hint = f"; see `{err.ctx.command_path} --help`" if getattr(err, "ctx", None) else ""
            typer.echo(one_line(f"error: {err.format_message().rstrip('.')}", len(hint)) + hint, err=True)
            sys.exit(EXIT_BAD_INPUT)
        except typer.Abort:  # click's Abort, wherever this typer keeps it
            if not standalone_mode:
                raise
            typer.echo("aborted", err=True)
            sys.exit(1)
        if not standalone_mode:
            return result
        sys.exit(result if isinstance(result, int) else 0)  # click returns an Exit's code in this mode


app = typer.Typer(
    cls=OneLineErrors,
    help="Erase concepts from text-to-image diffusion models, measure what was erased and kept, "
         "and attack the result to see whether it lasts. Exit status: 0 done (or already done); 2 bad input "
         "(one line on stderr, nothing written); 3 training diverged (NaN/inf; run.json says 'diverged', the "
         "last good checkpoint is kept); 130 interrupted (rerun the same command to resume).",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
pretrain_app = typer.Typer(help="Train the shipped testbed (model or evaluator classifiers).", no_args_is_help=True)
app.add_typer(pretrain_app, name="pretrain")
attack_app = typer.Typer(help="Attack an unlearned model and watch whether the erased concepts come back "
                              "(see `diffunlearn ls attacks`).", no_args_is_help=True)
app.add_typer(attack_app, name="attack")

USER_ERRORS = (ConfigError, TaskError, ModelDirError, UnknownNameError, RunDirError, CheckpointError,
               FileNotFoundError)
T = TypeVar("T")


def one_line(message: str, reserve: int = 0) -> str:
    """`message` on one line, cut to MAX_ERROR_CHARS (less `reserve`): an error never floods a terminal."""
    text = " ".join(str(message).split())
    limit = MAX_ERROR_CHARS - reserve
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fail(message: str, status: int = EXIT_BAD_INPUT) -> None:
    typer.echo(one_line(f"error: {message}"), err=True)
    raise typer.Exit(status)


def guarded(fn: Callable[[], T]) -> T:
    """Run `fn`, turning errors a user can cause into one line and exit status 2, a diverged
    run into one line and status 3."""
    try:
        return fn()
    except USER_ERRORS as err:
        fail(str(err))
    except TrainingDiverged as err:
        fail(str(err), EXIT_DIVERGED)
    except KeyboardInterrupt:
        typer.echo("interrupted; rerun the same command to resume from the last checkpoint", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None


def split_names(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


ForgetOpt = Annotated[str | None, typer.Option("--forget", "-f", help="Concept(s) to erase, comma-separated.")]
ModelOpt = Annotated[Path | None, typer.Option(
    "--model", "-m", help="A shipped model's name (testbed, testbed-sd: `diffunlearn ls models`), a model folder "
                          "(diffusers layout) or an erase run's directory; default: the shipped testbed.")]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help="torch CPU threads, at least 1 (not part of the "
                                                                  "run id).")]
ConceptsOpt = Annotated[str | None, typer.Option(
    "--concepts", help="Concept set: a YAML file (see README 'Concept sets') or a built-in name (canvas); default: "
                       "the shipped testbeds' canvas, else a free-text set of the --forget/--retain words.")]
AnchorOpt = Annotated[str | None, typer.Option(
    "--anchor", help="Text or concept the forget concepts are steered to (CORE, CA, SalUn, DiMUM, ...); default: "
                     "the anchor scheme, else the empty prompt.")]
DomainOpt = Annotated[str | None, typer.Option(
    "--domain", help="Domain of free-text concepts, which picks their default prompts: concept (default), style, "
                     "object, celebrity, nudity.")]
PickleOpt = Annotated[bool, typer.Option(
    "--allow-pickle", help="Load model weights given only as pickles (.bin) with torch.load(weights_only=True); "
                           "refused otherwise (same as model.allow_pickle=true).")]

DeviceOpt = Annotated[str | None, typer.Option(
    "--device", help="cpu, cuda, cuda:N or mps; default: CUDA when this torch build sees a GPU (each process its own "
                     "under `accelerate launch`), else the CPU. Not part of the run id.")]

OverridesArg = Annotated[list[str] | None, typer.Argument(
    help="Overrides as dotted key=value, e.g. method.lr=1e-5 eval.images_per_prompt=4 task.anchor_scheme=next.",
    show_default=False)]


def with_pickle(overrides: list[str] | None, allow_pickle: bool) -> list[str]:
    return [*(overrides or []), *(["model.allow_pickle=true"] if allow_pickle else [])]


@app.command()
def erase(
    method: Annotated[str, typer.Argument(help="Method name (see `diffunlearn ls methods`).")],
    forget: ForgetOpt = None,
    retain: Annotated[str | None, typer.Option(help="Retain concepts, comma-separated; default: all others.")] = None,
    model: ModelOpt = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (method/task/eval/model).")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory; default runs/<method>-<id>.")] = None,
    concepts: ConceptsOpt = None,
    anchor: AnchorOpt = None,
    domain: DomainOpt = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = None,
    allow_pickle: PickleOpt = False,
    overrides: OverridesArg = None,
) -> None:
    """Erase concepts with a method, evaluate before and after, and write a run directory.

    Concepts are words of a concept set: the canvas on the shipped testbeds (`diffunlearn ls concepts`),
    any text on other models (`--forget "Van Gogh" --domain style`), or a YAML file (`--concepts FILE`).
    Precedence: method defaults < profile (paper | testbed) < --config YAML < flags and key=value.
    Rerunning a finished run is a no-op; an interrupted one resumes from its last checkpoint.
    The run directory is locked while a command works in it; a second command on it exits 2.
    """
    from diffunlearn import api

    result = guarded(lambda: api.erase(method, split_names(forget), split_names(retain), model, config,
                                       out, with_pickle(overrides, allow_pickle), threads,
                                       progress=sys.stderr.isatty(), notify=lambda line: typer.echo(line, err=True),
                                       concepts=concepts, anchor=anchor, domain=domain, device=device))
    if not result.skipped and result.metrics:  # a data-parallel process other than 0 has nothing to print
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
        concepts: ConceptsOpt = None,
        anchor: AnchorOpt = None,
        domain: DomainOpt = None,
        threads: ThreadsOpt = None,
        device: DeviceOpt = None,
        allow_pickle: PickleOpt = False,
        overrides: OverridesArg = None,
    ) -> None:
        from diffunlearn import api

        notify = lambda line: typer.echo(line, err=True)  # noqa: E731
        progress = sys.stderr.isatty()
        overrides = with_pickle(overrides, allow_pickle)
        options = {"concepts": concepts, "anchor": anchor, "domain": domain, "device": device}
        if erase_method:
            if out or original or config:
                fail("--erase chains two runs in their default directories; drop --out/--original/--config")
            _, result = guarded(lambda: api.erase_then_attack(erase_method, name, split_names(forget) or [],
                                                              model, overrides or [], threads, progress, notify,
                                                              **options))
        else:
            result = guarded(lambda: api.attack(name, model, split_names(forget), config, out, overrides or [],
                                                threads, progress, original, notify, **options))
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
    concepts: ConceptsOpt = None,
    domain: DomainOpt = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = None,
    allow_pickle: PickleOpt = False,
    overrides: OverridesArg = None,
) -> None:
    """Evaluate a model on forget concepts: UA, IRA, CRA, AR, FID/KID, with confidence intervals
    (eval.evaluator chooses the judge: canvas, clip:PATH, nudenet, classifier:PATH).

    Overrides: eval.<key>=value only."""
    from diffunlearn import api

    metrics = guarded(lambda: api.evaluate(model, split_names(forget), out, overrides or [], threads,
                                           progress=sys.stderr.isatty(), allow_pickle=allow_pickle,
                                           concepts=concepts, domain=domain, device=device))
    _print_summary(metrics, out)


@app.command("ls")
def ls(what: Annotated[str, typer.Argument(help="methods | attacks | concepts | metrics | evaluators | models")],
       concepts: ConceptsOpt = None) -> None:
    """List the registered methods, the attacks and their options, a concept set's concepts (the canvas,
    or --concepts FILE), the metrics, the evaluators (`eval.evaluator=NAME[:PATH]`), or the shipped models
    (their `--model` names and folders)."""
    from diffunlearn.methods import methods

    if what == "models":
        from diffunlearn.runs.resolve import SHIPPED_MODELS

        for name, (folder, text) in SHIPPED_MODELS.items():
            missing = "" if (folder / "unet" / "config.json").exists() else " [not installed]"
            typer.echo(f"{name:12s} {folder}{missing}\n{'':12s} {text}")
    elif what == "methods":
        for name in methods.names():
            typer.echo(f"{name:14s} {methods.help(name)}")
    elif what == "concepts":
        _list_concepts(concepts)
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
    elif what == "evaluators":
        from diffunlearn.metrics.evaluators import evaluators

        for name in evaluators.names():
            typer.echo(f"{name:12s} {evaluators.help(name)}")
        typer.echo(f"{'none':12s} no evaluator: runs still erase, save and write samples; metrics are not computed")
        typer.echo("FID/KID features: eval.fid_features=evaluator | inception:FILE.pth | none")
    else:
        fail(f"unknown listing '{what}'; valid: methods, attacks, concepts, metrics, evaluators, models")


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


ForgetSetOpt = Annotated[list[str] | None, typer.Option(
    "--forget-set", help="NAME=C1,C2: the recipe's forget set NAME holds these concepts instead (repeatable; for a "
                         "real model's concept set, with --concepts).")]


def _bench_recipe(recipe: str, concepts: str | None, domain: str | None, anchor: str | None,
                  forget_set: list[str] | None):
    """The recipe, on the concept set the flags give (the recipe's `task:` block otherwise)."""
    from diffunlearn.bench.recipe import load_recipe as load_bench_recipe
    from diffunlearn.bench.recipe import with_concepts

    loaded = guarded(lambda: load_bench_recipe(recipe))
    sets: dict[str, list[str]] = {}
    for text in forget_set or []:
        name, sep, names = text.partition("=")
        if not sep or not name.strip() or not split_names(names):
            fail(f"--forget-set takes NAME=CONCEPT[,CONCEPT...], got '{text}'")
        sets[name.strip()] = split_names(names) or []
    if concepts is None and domain is None and anchor is None and not sets:
        return loaded
    return guarded(lambda: with_concepts(loaded, concepts, domain, anchor, sets))


def _recipe_flags(model: Path | None, protocol: str, concepts: str | None, domain: str | None, anchor: str | None,
                  forget_set: list[str] | None) -> str:
    """The flags that select a recipe's runs, as the command that made them shows them."""
    import shlex

    flags = [("--model", model), ("--protocol", None if protocol == "fast" else protocol), ("--concepts", concepts),
             ("--domain", domain), ("--anchor", anchor), *(("--forget-set", f) for f in forget_set or [])]
    return "".join(f" {flag} {shlex.quote(str(value))}" for flag, value in flags if value is not None)


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
    concepts: ConceptsOpt = None,
    domain: DomainOpt = None,
    anchor: AnchorOpt = None,
    forget_set: ForgetSetOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the runs and the estimated time; run nothing.")
                       ] = False,
    refresh: Annotated[bool, typer.Option(
        "--refresh", help="Re-read the figures of finished runs from their run directories into the results store "
                          "(after an upgrade changes what is read from a run); run nothing.")] = False,
    prune: Annotated[bool, typer.Option(
        "--prune", help="Delete the recipe's run directories that neither the results store nor the recipe names "
                        "any more (left by changed settings or upgrades); with --dry-run, list them; run nothing.")
                     ] = False,
) -> None:
    """Run a benchmark recipe: expand it into erase/attack/evaluate runs, skip finished ones, resume
    interrupted ones, run attacks after their erase runs, record everything in the results store.

    `diffunlearn bench ls` lists the shipped recipes; `diffunlearn results RECIPE` prints the
    leaderboard and the claims; `diffunlearn report RECIPE --out report.html` writes the report.
    On a real model (`--model`), name its concept set with --concepts (or --domain for free text)
    and each forget set's concepts with --forget-set; give the same flags to `results` and `report`.
    """
    from diffunlearn.bench import default_jobs, expand, load_recipe, run_bench, shipped_recipes

    if recipe == "ls":
        for name in shipped_recipes():
            r = guarded(lambda name=name: load_recipe(name))
            first = r.description.split(". ")[0].split(": ")[0]
            typer.echo(f"{name:12s} {r.estimate.runs:4d} runs  ~{r.estimate.minutes:4.0f} min  {r.paper}: "
                       f"{first[:90]}")
        return
    loaded = _bench_recipe(recipe, concepts, domain, anchor, forget_set)
    seed_list = [int(s) for s in split_names(seeds)] if seeds else None
    group_list = split_names(groups)
    if executor not in ("local", "ray", "slurm"):
        fail(f"unknown executor '{executor}'; valid: local, ray, slurm")
    if refresh:
        from diffunlearn.bench import refresh_bench

        count = guarded(lambda: refresh_bench(loaded, root, model=model, protocol=protocol, seeds=seed_list,
                                              groups=group_list))
        typer.echo(f"{loaded.name}: the figures of {count} finished runs re-read into {root / 'results.sqlite'}")
        return
    if prune:
        _prune(loaded, root, model, seed_list, dry_run)
        return
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
    if result.diverged:
        typer.echo("diverged (NaN/inf; not retried: change the settings, e.g. a lower method.lr): "
                   + ", ".join(result.diverged), err=True)
    if not result.ok:
        raise typer.Exit(bench_exit_status(result))


def _prune(recipe, root: Path, model: Path | None, seeds: list[int] | None, dry_run: bool) -> None:
    """`bench --prune`: what the recipe names under every protocol (all groups) is kept, with
    everything the store records; the rest is listed, and deleted unless --dry-run."""
    from diffunlearn.bench import expand
    from diffunlearn.bench.prune import orphaned_runs, remove

    named = [n.out for protocol in recipe.protocols
             for n in guarded(lambda protocol=protocol: expand(recipe, root, model=model, protocol=protocol,
                                                               seeds=seeds))]
    orphans = orphaned_runs(recipe.name, root, named)
    for orphan in orphans:
        typer.echo(f"{orphan.bytes / 2**20:9.1f} MB  {orphan.path}")
    total = sum(o.bytes for o in orphans) / 2**20
    if dry_run or not orphans:
        typer.echo(f"{recipe.name}: {len(orphans)} run directories no node names, {total:.1f} MB"
                   + (" (--prune without --dry-run deletes them)" if orphans else ""))
        return
    freed = remove(orphans)
    typer.echo(f"{recipe.name}: deleted {len(orphans)} run directories no node names, {freed / 2**20:.1f} MB")


def bench_exit_status(result) -> int:
    """3 when every failed run diverged (as `erase` exits on divergence; the runs they block
    included), else 1: a crashed run needs a look at its log, a diverged one new settings."""
    return 3 if result.diverged and set(result.failed) <= set(result.diverged) else 1


@app.command()
def results(
    recipe: Annotated[str, typer.Argument(help="A shipped recipe or a YAML file.")],
    root: RootOpt = Path("runs/bench"),
    model: ModelOpt = None,
    protocol: Annotated[str, typer.Option(help="The protocol the recipe ran with.")] = "fast",
    csv: Annotated[Path | None, typer.Option(help="Also write one row per run (all metrics) to this CSV.")] = None,
    concepts: ConceptsOpt = None,
    domain: DomainOpt = None,
    anchor: AnchorOpt = None,
    forget_set: ForgetSetOpt = None,
) -> None:
    """Print a recipe's leaderboard (means with 95% intervals over seeds) and its claims' verdicts."""
    from diffunlearn.bench.results import results as frame_of
    from diffunlearn.bench.results import summary_text

    loaded = _bench_recipe(recipe, concepts, domain, anchor, forget_set)
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
    concepts: ConceptsOpt = None,
    domain: DomainOpt = None,
    anchor: AnchorOpt = None,
    forget_set: ForgetSetOpt = None,
    figures: Annotated[Path | None, typer.Option(
        "--figures", help="Also write each figure of the report as a PNG file into this folder "
                          "(<group>-<figure>.png, e.g. for a README).")] = None,
) -> None:
    """Write a recipe's report: one self-contained HTML file (claims, leaderboard, plots, samples)."""
    from diffunlearn.bench import bench_report

    loaded = _bench_recipe(recipe, concepts, domain, anchor, forget_set)
    command = f"diffunlearn bench {recipe}" + _recipe_flags(model, protocol, concepts, domain, anchor, forget_set)
    path = guarded(lambda: bench_report(loaded, out, root, model=model, protocol=protocol, command=command,
                                        figures_dir=figures))
    typer.echo(f"report: {path}" + (f"; figures: {figures}" if figures is not None else ""))


def load_recipe(model_cls, default_name: str, config: Path | None, overrides: list[str] | None):
    """A pretraining recipe: the committed YAML (or --config) with key=value overrides, validated."""
    from diffunlearn.config import CONFIG_DIR, apply_overrides, build, load_yaml

    return guarded(lambda: build(model_cls, apply_overrides(load_yaml(config or CONFIG_DIR / default_name),
                                                            overrides or [])))


MODEL_KINDS = ("testbed", "testbed-sd")


@pretrain_app.command("model")
def pretrain_model(
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Output folder (resumable); default runs/pretrain-model[-sd].")] = None,
    kind: Annotated[str, typer.Option(
        "--kind", help="testbed: the pixel-space model (configs/pretrain-model.yaml); testbed-sd: Stable Diffusion "
                       "layout (configs/pretrain-model-sd.yaml: VAE first, in OUT/vae-stage, then tokenizer, UNet "
                       "and text encoder).")] = "testbed",
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Default: the kind's committed recipe.")
                      ] = None,
    threads: ThreadsOpt = None,
    install: Annotated[bool, typer.Option(help="Copy the result into the package's assets.")] = False,
    overrides: OverridesArg = None,
) -> None:
    """Train a testbed text-to-image model (UNet + text encoder; testbed-sd: and its VAE) from the committed recipe."""
    from diffunlearn.config import PretrainModelConfig, PretrainSDModelConfig

    guarded(lambda: check_threads(threads))
    if kind not in MODEL_KINDS:
        fail(f"unknown model kind '{kind}'; valid kinds: {', '.join(MODEL_KINDS)}")
    sd = kind == "testbed-sd"
    cfg = load_recipe(PretrainSDModelConfig if sd else PretrainModelConfig,
                      "pretrain-model-sd.yaml" if sd else "pretrain-model.yaml", config, overrides)
    out = out or Path("runs/pretrain-model-sd" if sd else "runs/pretrain-model")
    from diffunlearn.pretrain import install_assets
    from diffunlearn.pretrain import pretrain_model as train
    from diffunlearn.runs.resolve import ASSETS

    if sd:
        from diffunlearn.pretrain_sd import pretrain_testbed_sd

        guarded(lambda: pretrain_testbed_sd(cfg, out, threads, progress=sys.stderr.isatty()))
    else:
        guarded(lambda: train(cfg, out, threads, progress=sys.stderr.isatty()))
    if install:
        install_assets(out / "model", None, ASSETS, model_name=kind)
    typer.echo(f"model written to {out / 'model'}")


@pretrain_app.command("vae")
def pretrain_vae(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (resumable); `pretrain model --kind "
                                      "testbed-sd --out D` reuses D/vae-stage.")
                   ] = Path("runs/pretrain-model-sd/vae-stage"),
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Default: configs/pretrain-model-sd.yaml "
                                                "(its `vae` section).")] = None,
    threads: ThreadsOpt = None,
    overrides: OverridesArg = None,
) -> None:
    """Train testbed-sd's autoencoder alone and report its reconstructions' evaluator accuracy (overrides: vae.*)."""
    from diffunlearn.config import PretrainSDModelConfig

    cfg = load_recipe(PretrainSDModelConfig, "pretrain-model-sd.yaml", config, overrides)
    from diffunlearn.pretrain_sd import pretrain_vae as train

    _, figures = train(cfg.vae, out, threads, progress=sys.stderr.isatty())
    typer.echo(f"vae written to {out / 'vae'}: {figures}")


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

    guarded(lambda: check_threads(threads))
    cfg = load_recipe(PretrainEvaluatorConfig, "pretrain-evaluators.yaml", config, overrides)
    from diffunlearn.pretrain import install_assets
    from diffunlearn.pretrain import pretrain_evaluators as train
    from diffunlearn.runs.resolve import ASSETS

    _, figures = guarded(lambda: train(cfg, out, threads, progress=sys.stderr.isatty()))
    if install:
        install_assets(None, out / "evaluators", ASSETS)
    typer.echo(f"evaluators written to {out / 'evaluators'}: {figures}")


def _list_concepts(name_or_file: str | None) -> None:
    from diffunlearn.data.concepts import resolve_concept_set

    cset = guarded(lambda: resolve_concept_set(name_or_file, [], None, "testbed" if not name_or_file else None))
    typer.echo(f"concept set {cset.name} ({cset.source}; images: {cset.images.source})")
    for domain in cset.domains.values():
        neutral = f"   (neutral: {domain.neutral.name})" if domain.neutral else ""
        typer.echo(f"{domain.name + ':':8s}" + ", ".join(domain.erasable) + neutral)
    if not name_or_file:
        typer.echo("other models: any words, e.g. --forget \"Van Gogh\" --domain style, or --concepts FILE.yaml")


def _print_summary(metrics: dict, out: Path | None) -> None:
    after = metrics.get("after", metrics)
    before = metrics.get("before")
    keys = ("UA", "UA_partial", "IRA", "CRA", "SFID", "Total", "FID")
    typer.echo(" ".join(f"{k}={after[k]:.1f}" for k in keys if isinstance(after.get(k), int | float)))
    if before:
        shown = [k for k in keys if isinstance(before.get(k), int | float)]
        typer.echo("before: " + " ".join(f"{k}={before[k]:.1f}" for k in shown))
    if after.get("not_computed"):
        typer.echo(after["not_computed"])
    if out:
        typer.echo(f"written to {out}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
