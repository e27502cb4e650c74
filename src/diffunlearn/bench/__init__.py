"""Benchmark grids: recipes (one per headline experiment of the papers), their expansion into
erase / attack / evaluate runs, the executors (local processes, Ray, Slurm via submitit), the
SQLite results store, claims with verdicts, and the HTML report.

    import diffunlearn
    diffunlearn.run_bench("quick", jobs=2)        # = diffunlearn bench quick --jobs 2
    frame = diffunlearn.results("quick")         # pandas DataFrame, one row per run
    diffunlearn.bench_report("quick", "report.html")

Everything up to the executors is torch-free: a bad recipe fails in a second, before any run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from diffunlearn.bench.grid import DEFAULT_ROOT, GridResult, Node, expand, run_grid
from diffunlearn.bench.recipe import Recipe, load_recipe, shipped_recipes


def default_jobs() -> int:
    """One job per core (at most 8): on CPU, two one-thread runs beat one two-thread run."""
    return max(1, min(os.cpu_count() or 1, 8))


def run_bench(recipe: str | Path | Recipe, jobs: int | None = None, executor: str = "local",
              root: str | Path = DEFAULT_ROOT, model: str | Path | None = None, protocol: str = "fast",
              seeds: list[int] | None = None, groups: list[str] | None = None, threads: int | None = None,
              retries: int = 1, address: str | None = None, gpus_per_run: float = 0.0, cluster: str | None = None,
              partition: str | None = None, report: Callable[[str], None] | None = None) -> GridResult:
    """Expand a recipe and run every node not finished yet; returns what was done, skipped,
    failed and blocked. Threads per run default to 1 when several jobs run at once."""
    from diffunlearn.bench.executors import make_executor

    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    jobs = jobs or default_jobs()
    threads = threads if threads is not None else (1 if jobs > 1 else None)
    nodes = expand(recipe, root, model=model, protocol=protocol, seeds=seeds, groups=groups)
    runner = make_executor(executor, Path(root) / recipe.name, jobs, threads, address=address, gpus=gpus_per_run,
                           retries=retries, cluster=cluster, partition=partition)
    # Ray retries failed tasks itself; the runner resubmits for the other executors
    own_retries = 0 if executor == "ray" else retries
    return run_grid(nodes, runner, root, jobs=jobs, threads=threads, retries=own_retries, report=report)


def refresh_bench(recipe: str | Path | Recipe, root: str | Path = DEFAULT_ROOT, model: str | Path | None = None,
                  protocol: str = "fast", seeds: list[int] | None = None, groups: list[str] | None = None) -> int:
    """Re-read the figures of the recipe's finished runs from their directories into the store
    (after an upgrade changes what is read from a run); runs nothing. Returns the runs refreshed."""
    from diffunlearn.bench.grid import finished_nodes, sync_store
    from diffunlearn.bench.worker import refresh_record

    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    root = Path(root)
    nodes = expand(recipe, root, model=model, protocol=protocol, seeds=seeds, groups=groups)
    if not nodes:
        return 0
    store = sync_store(root, recipe.name, nodes)
    return sum(refresh_record(n.spec(root, None, {})) for n in finished_nodes(nodes, store))


def results(recipe: str | Path | Recipe, root: str | Path = DEFAULT_ROOT, model: str | Path | None = None,
            protocol: str = "fast", current: bool = True):
    """The recipe's runs as a pandas DataFrame: one row per run, one column per metric."""
    from diffunlearn.bench.results import results as frame

    return frame(recipe, root, model=model, protocol=protocol, current=current)


def bench_report(recipe: str | Path | Recipe, out: str | Path = "report.html", root: str | Path = DEFAULT_ROOT,
                 model: str | Path | None = None, protocol: str = "fast", command: str | None = None,
                 figures_dir: str | Path | None = None) -> Path:
    """Write the recipe's self-contained HTML report (and, with `figures_dir`, each figure as a PNG)."""
    from diffunlearn.bench.report import render_report

    return render_report(recipe, out, root, model=model, protocol=protocol, command=command,
                         figures_dir=figures_dir)


__all__ = ["DEFAULT_ROOT", "GridResult", "Node", "Recipe", "bench_report", "default_jobs", "expand",
           "load_recipe", "refresh_bench", "results", "run_bench", "run_grid", "shipped_recipes"]
