"""A recipe expanded into grid nodes (torch-free), and the runner that executes them in order.

Expansion: each group gives one erase node per method x forget set x variant x seed (its run
id resolved by `runs/resolve.py`, so a finished run is recognised and skipped), one evaluate
node per forget set for the `original` control (seedless: its evaluation is deterministic),
and one attack node per attack step on each of them, which depends on its erase node.
Node ids are labels (`group/variant/method/forget/s<seed>[/attack]`); run directories are
derived from the recipe and the run id (`<root>/<recipe>/runs/<method>-<run id>`, attacks in
`<erase run>/attacks/<attack>-<key>`, the key hashing the attack's resolved `attack` section, so a
changed testbed profile gives new directories), so two nodes with the same resolved config share
one directory and run it once (the worker's lock serialises them; the second finds it done).

The runner registers the nodes in the store, skips those recorded complete with the same
spec, and hands ready nodes (dependencies done) to an executor (`bench/executors.py`) at most
`jobs` at a time, retrying failures, until every node is done, failed or blocked by a failed
dependency. A diverged run (NaN/inf; its `run.json` says `diverged`) counts as failed and is
never retried, in this session or the next (the same settings diverge again); a node whose
lock or run directory another process holds is handed back 30 s later. A progress line shows
done / running / failed and the time left.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffunlearn.bench.recipe import CONCEPT_SET_KEYS, ORIGINAL, Group, Recipe
from diffunlearn.config import ConfigError, config_hash, parse_override

ERASE_SECTIONS = ("method", "task", "eval", "seed")
ATTACK_SECTIONS = ("attack", "eval", "seed")
EVALUATE_SECTIONS = ("eval",)
DEFAULT_ROOT = Path("runs/bench")
BUSY_RETRY_SECONDS = 30.0
SPEED_PRIOR_SECONDS = 600.0  # the progress line trusts the estimates for their first ten minutes of work
# a node done in under this fraction of its estimate found its work done (a cached retrain pretraining, a run
# made under another label): it says nothing about this machine's speed
FOUND_DONE_FRACTION = 0.2


def sections_for(overrides: list[str], sections: tuple[str, ...]) -> list[str]:
    """The overrides whose top-level section a run kind accepts (shared recipe overrides)."""
    return [o for o in overrides if parse_override(o)[0][0] in sections]


def check_overrides(overrides: list[str], allowed: tuple[str, ...], where: str, recipe_wide: bool = False) -> None:
    """Each override's section is one these runs take; the concept set is the recipe's `task:`
    block, never an override (the control, the attacks and the claims compare runs of one set)."""
    set_keys = (*CONCEPT_SET_KEYS, "task.anchor") if recipe_wide else CONCEPT_SET_KEYS
    for text in overrides:
        keys = parse_override(text)[0]
        section = keys[0]
        if section not in allowed:
            raise ConfigError(f"{where}: override '{text}' sets '{section}', which these runs do not take "
                              f"(allowed: {', '.join(allowed)})")
        if ".".join(keys[:2]) in set_keys:
            raise ConfigError(f"{where}: override '{text}' sets the concept set, which is the recipe's `task:` block "
                              f"(task: {{{keys[1]}: ...}}) or --{keys[1]} on the command line")


@dataclass
class Node:
    """One run of the grid; `spec()` is what the worker receives."""

    recipe: str
    node: str
    kind: str  # erase | attack | evaluate
    group: str
    variant: str
    method: str
    forget: str
    concepts: list[str]
    seed: int | None
    overrides: list[str]
    out: Path
    model: str | None
    run_id: str | None = None
    attack: str = "none"
    attack_name: str | None = None
    depends: str | None = None
    attack_model: str | None = None
    attack_forget: list[str] | None = None
    est_seconds: float = 0.0
    registered: str | None = None  # the registered method behind the label `method`
    task_options: dict[str, str] = field(default_factory=dict)  # the recipe's concept set (TaskKeys)
    # an attack's resolved `attack` section (its profile with the overrides), which its run key hashes
    attack_config: dict[str, Any] | None = None
    # where the attack ran when keys hashed its overrides alone (`adopt_overrides_keyed_attacks`)
    overrides_keyed_out: Path | None = None

    @property
    def spec_hash(self) -> str:
        """What makes this node's result: its directory (the run id), its overrides and concept set.
        The directory counts from the results folder, so `--root runs/bench` and the same folder
        spelled from elsewhere (`--root /work/x/runs/bench`) recognise the same finished runs."""
        data: dict[str, Any] = {"out": str(DEFAULT_ROOT / self.within_root), "overrides": self.overrides,
                                "kind": self.kind}
        if self.task_options:
            data["task"] = self.task_options
        return config_hash(data)

    @property
    def within_root(self) -> Path:
        """The run directory from the results folder on: `<recipe>/runs/...`."""
        parts = self.out.parts
        for i in range(len(parts) - 2, -1, -1):
            if parts[i] == self.recipe and parts[i + 1] == "runs":
                return Path(*parts[i:])
        raise ValueError(f"{self.out} is not under a '{self.recipe}/runs' folder")

    def spec(self, root: Path, threads: int | None, extra: dict[str, Any]) -> dict[str, Any]:
        return {"recipe": self.recipe, "node": self.node, "spec": self.spec_hash, "kind": self.kind,
                "grp": self.group, "variant": self.variant, "method": self.method, "attack": self.attack,
                "attack_name": self.attack_name, "forget": self.forget, "concepts": self.concepts,
                "seed": self.seed, "depends": self.depends, "run_id": self.run_id, "out": str(self.out.resolve()),
                "model": self.model, "overrides": self.overrides, "attack_model": self.attack_model,
                "attack_forget": self.attack_forget, "threads": threads, "est_seconds": self.est_seconds,
                "method_name": self.registered or self.method, "task_options": self.task_options,
                "store": str((root / "results.sqlite").resolve()),
                "records": str((root / self.recipe / "records").resolve()), **extra}


# ---- expansion ---------------------------------------------------------------------------------

def expand(recipe: Recipe, root: str | Path = DEFAULT_ROOT, model: str | Path | None = None,
           protocol: str = "fast", seeds: list[int] | None = None, groups: list[str] | None = None) -> list[Node]:
    """Every node of the recipe, dependencies first. Resolves (validates) every run as its
    command would: each forget set against the recipe's concept set, each erase run with
    `resolve_erase`, each attack with `resolve_attack` (on the original model, since the erase
    run it attacks does not exist yet). Raises ConfigError / TaskError / UnknownNameError /
    ModelDirError with one line. Imports no torch."""
    from diffunlearn.backends.model_dir import check_model_dir, model_content_hash
    from diffunlearn.bench.costs import Costs
    from diffunlearn.runs.resolve import model_folder, package_versions

    if protocol not in recipe.protocols:
        raise ConfigError(f"unknown protocol '{protocol}'; recipe {recipe.name} defines: "
                          f"{', '.join(recipe.protocols)}")
    if groups:
        unknown = [g for g in groups if g not in {x.id for x in recipe.groups}]
        if unknown:
            raise ConfigError(f"unknown group '{unknown[0]}'; recipe {recipe.name} has: "
                              f"{', '.join(g.id for g in recipe.groups)}")
    root = Path(root)
    model_value = str(model) if model else recipe.model
    model_dir = model_folder(model_value)
    meta = check_model_dir(model_dir)
    model_hash = model_content_hash(model_dir)
    context = _Context(recipe, root, model_value, model_dir, model_hash, package_versions(),
                       [*recipe.protocols[protocol], *recipe.overrides], seeds, Costs.load(), recipe.task.options(),
                       node_scope(model_value, model_dir, model_folder(recipe.model), model_hash)
                       + recipe._concept_scope)
    check_overrides(recipe.overrides, ("method", "task", "eval", "seed", "attack"), f"recipe {recipe.name}",
                    recipe_wide=True)
    used = [g for g in recipe.groups if not groups or g.id in groups]
    for name in dict.fromkeys(f for g in used for f in g.forget):
        context.concept_sets[name] = _check_forget_set(recipe, name, model_dir, meta, context.task_options)
    nodes: list[Node] = []
    seen: set[str] = set()
    directories: set[Path] = set()
    for group in used:
        for node in _group_nodes(context, group):
            if node.node in seen:
                raise ConfigError(f"recipe {recipe.name}: node {node.node} appears twice")
            seen.add(node.node)
            if node.out in directories:  # the same run under a second label: it finds the run done
                node.est_seconds = context.costs.startup
            directories.add(node.out)
            nodes.append(node)
    return nodes


@dataclass
class _Context:
    """What every node of one expansion shares."""

    recipe: Recipe
    root: Path
    model: str | None  # as given (None: the testbed), passed on to the runs
    model_dir: Path
    model_hash: str
    versions: dict[str, str]
    base: list[str]  # the protocol's and the recipe's overrides
    seeds: list[int] | None
    costs: Any
    task_options: dict[str, str]
    scope: str  # prefixes every node name: empty on the recipe's own model (see `node_scope`)
    concept_sets: dict[str, Any] = field(default_factory=dict)  # per forget set: its resolved concept set
    checked_attacks: dict[str, dict[str, Any]] = field(default_factory=dict)


def node_scope(model: str | None, model_dir: Path, recipe_model_dir: Path, model_hash: str) -> str:
    """What a node's name starts with on `model`: nothing on the recipe's own model, else the
    model's name and a colon (`testbed-sd:strength/gentle/esd/dotted/s0`; a folder by its name and
    content hash), because the store and the record files are keyed by the node's name: without
    it, a run on another model would replace the recipe's rows of the same label."""
    from diffunlearn.runs.resolve import SHIPPED_MODELS

    if model_dir.resolve() == recipe_model_dir.resolve():
        return ""
    text = str(model)
    return f"{text}:" if text in SHIPPED_MODELS else f"{model_dir.resolve().name}-{model_hash[:8]}:"


def _check_forget_set(recipe: Recipe, name: str, model_dir: Path, meta: dict, task_options: dict[str, str]):
    """The forget set's concepts are concepts of the recipe's set on this model (canvas names on
    the testbed; a real model's set comes from task.concepts / --concepts, or is free text)."""
    from diffunlearn.config import TaskConfig, build
    from diffunlearn.runs.resolve import resolve_task_concepts

    try:
        task = build(TaskConfig, {**task_options, "forget": list(recipe.forget_sets[name])}, "task.")
        return resolve_task_concepts(task, model_dir, meta)
    except ConfigError as err:
        raise ConfigError(f"recipe {recipe.name}, forget set '{name}': {err}") from None


def _group_nodes(ctx: _Context, group: Group) -> list[Node]:
    from diffunlearn.runs.resolve import resolve_erase

    recipe, base, costs = ctx.recipe, ctx.base, ctx.costs
    out_root = ctx.root / recipe.name / "runs"
    where = f"recipe {recipe.name}, group {group.id}"
    check_overrides(group.overrides, ("method", "task", "eval"), where)
    for step in group.attacks:
        check_overrides(step.overrides, ("attack", "eval"), f"{where}, attack {step.id}")
    nodes: list[Node] = []
    run_seeds = ctx.seeds or group.seeds or recipe.seeds
    for forget in group.forget:
        concepts = recipe.forget_sets[forget]
        for variant in group.variants:
            for method, registered, entry_overrides in group.entries():
                variant_overrides = [*entry_overrides, *group.variant_overrides(variant, method)]
                check_overrides(variant_overrides, ("method", "task", "eval"), f"{where}, variant {variant}")
                if method == ORIGINAL:
                    eval_overrides = sections_for([*base, *group.overrides, *variant_overrides], EVALUATE_SECTIONS)
                    identity: dict[str, Any] = {"model": ctx.model_hash, "forget": concepts, "eval": eval_overrides,
                                                "versions": ctx.versions}
                    if ctx.task_options:
                        identity["task"] = ctx.task_options
                    key = config_hash(identity)
                    control = Node(recipe.name, f"{ctx.scope}{group.id}/{variant}/{ORIGINAL}/{forget}", "evaluate",
                                   group.id, variant, ORIGINAL, forget, list(concepts), None, eval_overrides,
                                   out_root / f"{ORIGINAL}-{key}", ctx.model, run_id=key,
                                   est_seconds=costs.evaluate_seconds(eval_overrides, ctx.concept_sets[forget],
                                                                      list(concepts)),
                                   task_options=dict(ctx.task_options))
                    nodes.append(control)
                    for seed in run_seeds:
                        nodes += _attacks(ctx, group, control, seed, attack_forget=list(concepts),
                                          attack_model=ctx.model)
                    continue
                for seed in [None] if group.seedless else run_seeds:
                    overrides = [*sections_for(base, ERASE_SECTIONS), *group.overrides, *variant_overrides]
                    overrides += [] if seed is None else [f"seed={seed}"]
                    try:
                        resolved = resolve_erase(registered, list(concepts), None, ctx.model, None, overrides,
                                                 ctx.task_options)
                    except ConfigError as err:
                        raise ConfigError(f"{where}, {method} on '{forget}' ({variant}): {err}") from None
                    label = f"{ctx.scope}{group.id}/{variant}/{method}/{forget}" + ("" if seed is None else f"/s{seed}")
                    erase = Node(recipe.name, label, "erase", group.id, variant, method, forget, list(concepts), seed,
                                 overrides, out_root / f"{registered}-{resolved.run_id}", ctx.model,
                                 run_id=resolved.run_id, est_seconds=costs.erase_seconds(resolved),
                                 registered=registered, task_options=dict(ctx.task_options))
                    nodes.append(erase)
                    for attack_seed in run_seeds if seed is None else [seed]:
                        nodes += _attacks(ctx, group, erase, attack_seed, attack_forget=None)
    return nodes


def _attacks(ctx: _Context, group: Group, parent: Node, seed: int, attack_forget: list[str] | None = None,
             attack_model: str | None = None) -> list[Node]:
    out = []
    for step in group.attacks:
        if step.methods is not None and parent.method not in step.methods:
            continue
        if step.variants is not None and parent.variant not in step.variants:
            continue
        overrides = [*sections_for(ctx.base, ATTACK_SECTIONS), *step.overrides, f"seed={seed}"]
        attack_config = _check_attack(ctx, step.attack, overrides, parent.concepts,
                                      f"recipe {ctx.recipe.name}, group {group.id}, attack {step.id}")
        # the key hashes the resolved `attack` section (a changed profile is a new run), then what else the
        # run reads from its overrides (eval.*, seed)
        identity: dict[str, Any] = {"parent": parent.run_id, "attack": step.attack, "config": attack_config,
                                    "overrides": [o for o in overrides if not o.startswith("attack.")],
                                    "forget": attack_forget}
        overrides_keyed: dict[str, Any] = {"parent": parent.run_id, "attack": step.attack, "overrides": overrides,
                                           "forget": attack_forget}
        if ctx.task_options:
            identity["task"] = overrides_keyed["task"] = ctx.task_options
        key = config_hash(identity)
        attacks_dir = parent.out / "attacks"
        node_id = f"{parent.node}/{step.id}" if parent.seed is not None else f"{parent.node}/s{seed}/{step.id}"
        out.append(Node(ctx.recipe.name, node_id, "attack", group.id, parent.variant, parent.method, parent.forget,
                        parent.concepts, seed, overrides, attacks_dir / f"{step.attack}-{key}",
                        parent.model, attack=step.id, attack_name=step.attack, depends=parent.node,
                        attack_model=str(parent.out.resolve()) if parent.kind == "erase" else attack_model,
                        attack_forget=attack_forget, est_seconds=ctx.costs.attack_seconds(
                            step.attack, overrides, ctx.concept_sets[parent.forget], list(parent.concepts)),
                        task_options=dict(ctx.task_options), attack_config=attack_config,
                        overrides_keyed_out=attacks_dir / f"{step.attack}-{config_hash(overrides_keyed)}"))
    return out


def _check_attack(ctx: _Context, name: str, overrides: list[str], concepts: list[str], where: str) -> None:
    """An attack step resolved as its command would resolve it, on the original model (the
    erase run it attacks does not exist yet): every attack.*, eval.* and task key accepted.
    Once per distinct step (seeds aside)."""
    from diffunlearn.runs.resolve import resolve_attack

    key = repr((name, [o for o in overrides if not o.startswith("seed=")], concepts))
    if key not in ctx.checked_attacks:
        try:
            resolved = resolve_attack(name, ctx.model_dir, list(concepts), overrides=overrides,
                                      task_options=ctx.task_options)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        ctx.checked_attacks[key] = resolved.attack_config.model_dump(mode="json")
    return ctx.checked_attacks[key]


def same_as_recorded(recorded: dict[str, Any], now: dict[str, Any]) -> bool:
    """A resolved section equals a recorded one (keys the recorded one lacks were added since, at
    their defaults)."""
    return all(recorded[k] == v for k, v in now.items() if k in recorded)


def adopt_overrides_keyed_attacks(nodes: list[Node], root: str | Path) -> None:
    """Move attack runs made when attack keys hashed the overrides alone to their directory under
    today's key (which hashes the resolved `attack` section), when the `attack` section the run
    recorded equals what the attack resolves to now, and point their record files there (the store
    imports them at its next sync). A run made under another profile stays where it is, and its
    node runs again."""
    from diffunlearn.bench.worker import NodeBusy, _save_record, node_lock, record_path
    from diffunlearn.config import load_yaml

    for n in nodes:
        old, new = n.overrides_keyed_out, n.out
        if n.kind != "attack" or old is None or old == new:
            continue
        if not new.exists() and (old / "config.yaml").is_file():
            try:
                recorded = load_yaml(old / "config.yaml").get("attack") or {}
            except ConfigError:
                continue
            if not same_as_recorded(recorded, n.attack_config or {}):
                continue
            try:
                with node_lock(old):
                    old.rename(new)
                    old.with_name(old.name + ".lock").unlink()  # no run uses the old key any more
            except NodeBusy:
                continue
        where = {"records": str(Path(root) / n.recipe / "records"), "node": n.node}
        path = record_path(where)
        if old.exists() or not new.is_dir() or not path.is_file():
            continue
        record = json.loads(path.read_text())
        if record.get("out") == str(old.resolve()):
            _save_record(where, record | {"out": str(new.resolve()), "spec": n.spec_hash})


def sync_store(root: str | Path, recipe: str, nodes: list[Node] | None = None):
    """The results store under `root` with the recipe's record files imported (and, given the
    recipe's nodes, its attack runs keyed the old way adopted first)."""
    from diffunlearn.bench.store import Store

    root = Path(root)
    store = Store(root / "results.sqlite")
    if nodes:
        adopt_overrides_keyed_attacks(nodes, root)
    store.sync(root / recipe / "records")
    return store


# ---- running -----------------------------------------------------------------------------------

@dataclass
class GridResult:
    done: list[str]
    skipped: list[str]
    failed: list[str]  # diverged ones included
    blocked: list[str]
    seconds: float
    diverged: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.blocked


def git_hash() -> str | None:
    """The commit of the diffunlearn checkout in use (editable installs), else None."""
    import subprocess

    source = Path(__file__).resolve().parents[3]
    try:
        out = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def critical_path_first(nodes: list[Node]) -> list[str]:
    """Node ids, the longest estimated chain (a node and the runs that wait for it) first, ties in
    recipe order: a retrain pretraining (about an hour) starts at once instead of after the short runs
    listed before it, so the grid does not end with one core idle behind it."""
    children: dict[str, list[Node]] = {}
    for n in nodes:
        if n.depends:
            children.setdefault(n.depends, []).append(n)
    chain: dict[str, float] = {}

    def length(n: Node) -> float:
        if n.node not in chain:
            chain[n.node] = n.est_seconds + max((length(c) for c in children.get(n.node, [])), default=0.0)
        return chain[n.node]

    order = {n.node: i for i, n in enumerate(nodes)}
    return [n.node for n in sorted(nodes, key=lambda n: (-length(n), order[n.node]))]


def charge_the_first_of_each_run(nodes: list[Node], order: list[str]) -> None:
    """Nodes that share a run directory (one run under two labels) cost one run: whichever starts
    first does the work, the others find it done. `expand` charges the first in recipe order; the
    run order may start another first (the longest chain), so the full estimate moves to it."""
    by_id = {n.node: n for n in nodes}
    sharing: dict[Path, list[Node]] = {}
    for node_id in order:
        sharing.setdefault(by_id[node_id].out, []).append(by_id[node_id])
    for group in sharing.values():
        if len(group) > 1:
            costs = sorted((n.est_seconds for n in group), reverse=True)
            for n, seconds in zip(group, costs, strict=True):
                n.est_seconds = seconds


def finished_nodes(nodes: list[Node], store) -> list[Node]:
    """The nodes the store records as complete with their current spec (the same run directory,
    overrides and concept set): what a rerun skips and `--refresh` re-reads."""
    complete = store.complete(nodes[0].recipe) if nodes else {}
    return [n for n in nodes if complete.get(n.node) == n.spec_hash]


def run_grid(nodes: list[Node], executor, root: str | Path = DEFAULT_ROOT, jobs: int = 1,
             threads: int | None = None, retries: int = 1, report: Callable[[str], None] | None = None,
             poll_seconds: float = 0.5) -> GridResult:
    """Run `nodes` (from `expand`) with `executor`; return what was done, skipped, failed, blocked."""
    from diffunlearn.runs.resolve import package_versions

    root = Path(root)
    if not nodes:
        return GridResult([], [], [], [], 0.0)
    store = sync_store(root, nodes[0].recipe, nodes)
    extra = {"git": git_hash(), "versions": package_versions()}
    specs = {n.node: n.spec(root, threads, extra) for n in nodes}
    store.register([{k: v for k, v in s.items() if k not in ("overrides",)} for s in specs.values()])
    by_id = {n.node: n for n in nodes}
    skipped = [n.node for n in finished_nodes(nodes, store)]
    done: set[str] = set(skipped)
    failed: dict[str, int] = {}
    diverged: set[str] = set()
    dead: set[str] = set()
    running: dict[str, float] = {}
    not_before: dict[str, float] = {}  # nodes another process is running: look again later
    waiting = critical_path_first([n for n in nodes if n.node not in done])
    charge_the_first_of_each_run(nodes, waiting)
    progress = Progress(nodes, done, report, jobs)
    start = time.time()
    try:
        while waiting or running:
            for node_id in list(waiting):
                if len(running) >= jobs:
                    break
                parent = by_id[node_id].depends
                if parent in dead or (parent and parent not in by_id and parent not in done):
                    waiting.remove(node_id)
                    dead.add(node_id)
                    continue
                if not_before.get(node_id, 0.0) > time.time():
                    continue
                if parent is None or parent in done:
                    waiting.remove(node_id)
                    executor.submit(specs[node_id])
                    running[node_id] = time.time()
            for node_id, status in executor.poll(timeout=poll_seconds):
                started = running.pop(node_id, time.time())
                if status == "complete":
                    done.add(node_id)
                    progress.finished(node_id, time.time() - started)
                elif status == "busy":  # run elsewhere right now: come back to it later
                    waiting.append(node_id)
                    not_before[node_id] = time.time() + BUSY_RETRY_SECONDS
                elif status == "diverged":  # deterministic: the same settings diverge again, never retried
                    failed[node_id] = failed.get(node_id, 0) + 1
                    diverged.add(node_id)
                    dead.add(node_id)
                    progress.failed(node_id)
                else:
                    failed[node_id] = failed.get(node_id, 0) + 1
                    if failed[node_id] <= retries:
                        waiting.insert(0, node_id)
                    else:
                        dead.add(node_id)
                        progress.failed(node_id)
            progress.show(running, dead)
            if not running and waiting:  # only nodes run elsewhere are left: wait for them
                time.sleep(poll_seconds)
    finally:
        executor.shutdown()
        progress.close()
    blocked = sorted(n for n in dead if n not in failed)
    return GridResult(sorted(done - set(skipped)), skipped, sorted(n for n in dead if n in failed), blocked,
                      time.time() - start, sorted(diverged))


class Progress:
    """done / running / failed and the time left: the estimated seconds of the nodes left
    (bench/costs.py), scaled by this machine's measured / estimated seconds so far; a running
    node counts what it has left, and the longest of those bounds the wait from below."""

    def __init__(self, nodes: list[Node], done: set[str], report: Callable[[str], None] | None, jobs: int = 1):
        self.estimates = {n.node: max(n.est_seconds, 1.0) for n in nodes}
        self.total, self.done, self.report, self.jobs = len(nodes), set(done), report, max(jobs, 1)
        self.skipped = len(done)
        self.finished_estimate = 0.0
        self.finished_measured = 0.0
        self.failures = 0
        self.last: tuple[int, ...] = ()
        self.live = report is None and sys.stderr.isatty()

    def finished(self, node_id: str, seconds: float) -> None:
        self.done.add(node_id)
        if seconds >= FOUND_DONE_FRACTION * self.estimates[node_id]:
            self.finished_estimate += self.estimates[node_id]
            self.finished_measured += seconds

    def failed(self, node_id: str) -> None:
        self.failures += 1

    def speed(self) -> float:
        """Measured / estimated seconds of the nodes finished here (but those that found their work
        done), shrunk toward 1 by SPEED_PRIOR_SECONDS of estimate, so one short node's start-up
        does not rescale the grid."""
        return (self.finished_measured + SPEED_PRIOR_SECONDS) / (self.finished_estimate + SPEED_PRIOR_SECONDS)

    def left_seconds(self, running: dict[str, float], dead: set[str], now: float | None = None) -> float:
        now = time.time() if now is None else now
        speed = self.speed()
        pending = sum(s for n, s in self.estimates.items() if n not in self.done and n not in dead
                      and n not in running)
        ongoing = [max(self.estimates[n] * speed - (now - started), 0.0) for n, started in running.items()]
        return max((pending * speed + sum(ongoing)) / self.jobs, max(ongoing, default=0.0))

    def line(self, running: dict[str, float], dead: set[str]) -> str:
        return (f"bench: {len(self.done)}/{self.total} done ({self.skipped} skipped), {len(running)} running, "
                f"{self.failures} failed, {len(dead) - self.failures} blocked, "
                f"~{self.left_seconds(running, dead) / 60:.0f} min left")

    def show(self, running: dict[str, float], dead: set[str]) -> None:
        """A live line on a terminal; elsewhere one line each time a count changes."""
        counts = (len(self.done), len(running), self.failures, len(dead))
        if not self.live and counts == self.last:
            return
        self.last = counts
        text = self.line(running, dead)
        if self.report is not None:
            self.report(text)
        elif self.live:
            sys.stderr.write("\r" + text.ljust(100))
            sys.stderr.flush()
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.live:
            sys.stderr.write("\n")


def write_spec(spec: dict[str, Any], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (spec["node"].replace("/", "__") + ".spec.json")
    path.write_text(json.dumps(spec, default=str))
    return path
