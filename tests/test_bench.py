"""Benchmark grids without running a model: recipes, expansion, claims, the store, the runner's
order and skipping (with a fake executor), report escaping."""

from __future__ import annotations

import base64
import multiprocessing
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from bench_helpers import FakeExecutor, tiny_recipe
from typer.testing import CliRunner

from diffunlearn.bench import expand, load_recipe, shipped_recipes
from diffunlearn.bench.claims import (
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    NO_DATA,
    Interval,
    evaluate_claim,
    evaluate_claims,
    t_quantile,
)
from diffunlearn.bench.costs import grid_minutes
from diffunlearn.bench.grid import run_grid
from diffunlearn.bench.recipe import Claim
from diffunlearn.bench.store import Store
from diffunlearn.cli import app

runner = CliRunner()


# ---- recipes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", shipped_recipes())
def test_every_shipped_recipe_validates_expands_and_states_its_size(name, tmp_path):
    recipe = load_recipe(name)
    assert recipe.claims or not recipe.headline, f"{name} states no claim"
    nodes = expand(recipe, tmp_path)
    assert len(nodes) == recipe.estimate.runs, "estimate.runs must match the expansion"
    minutes = grid_minutes(nodes, jobs=2)
    assert recipe.estimate.minutes == pytest.approx(minutes, rel=0.1, abs=1.0), f"estimate: ~{minutes:.0f} min"
    if recipe.headline:
        assert minutes <= (15 if name == "quick" else 120), "a recipe's default grid must fit its time budget"
    assert len({n.node for n in nodes}) == len(nodes)
    order = {n.node: i for i, n in enumerate(nodes)}
    for n in nodes:
        if n.depends:
            assert order[n.depends] < order[n.node] and n.kind == "attack"
            assert str(n.out).startswith(str(next(p.out for p in nodes if p.node == n.depends)))
    erase = [n for n in nodes if n.kind == "erase"]
    assert all(n.run_id and n.run_id in n.out.name for n in erase)  # the directory is derived from the run id


@pytest.mark.parametrize("name", [n for n in shipped_recipes() if load_recipe(n).claims])
def test_every_claim_of_a_shipped_recipe_finds_its_runs(name, tmp_path):
    """Every run of the recipe finished (a fake executor records each claim's figures on every
    run, and each curve point at its step): no slice of any claim may say `no data`, which is
    what a selection that picks no run (say, erase runs for an attack's figure, or a control
    narrowed to a method it does not have) can only ever say."""
    import diffunlearn
    from diffunlearn.bench.extract import curve_point

    recipe = load_recipe(name)
    names = {m for c in recipe.claims for m in (c.metric, c.from_metric) if m}
    figures = {m: 1.0 for m in names if not curve_point(m)} | {"AR_resolution": 1.0}
    points = [curve_point(m) for m in names if curve_point(m)]
    root = tmp_path / "root"
    run_grid(expand(recipe, root), FakeExecutor(metrics=lambda spec: figures, curves=lambda spec: [
        ["attack", step, curve, 1.0] for curve, step in points] if spec["kind"] == "attack" else []), root,
        jobs=2, report=lambda line: None)
    frame = diffunlearn.results(recipe, root)
    for result in evaluate_claims(recipe, frame):
        for part in result.slices:
            assert part.verdict != NO_DATA, f"claim {result.claim.id} {part.key}: {part.numbers}"


def test_bench_ls_and_expansion_without_torch():
    """Listing and expanding (every run resolved with resolve_erase / resolve_attack) import no torch."""
    code = ("import sys; from typer.testing import CliRunner; from diffunlearn.cli import app; "
            "r = CliRunner().invoke(app, ['bench', 'ls']); print(r.stdout); assert r.exit_code == 0; "
            "d = CliRunner().invoke(app, ['bench', 'quick', '--dry-run', '--root', '/nonexistent/bench']); "
            "assert d.exit_code == 0 and '16 runs' in d.stdout, d.output; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in shipped_recipes():
        assert name in out.stdout


BAD_RECIPES = {
    "unknown key": ("colour: red", "unknown key 'colour'"),
    "unknown method": ("groups: [{id: g, methods: [cor], forget: [one]}]", "unknown method 'cor'"),
    "unknown concept": ("forget_sets: {one: [doted]}", "unknown concept 'doted'"),
    "unknown forget set": ("groups: [{id: g, methods: [core], forget: [two]}]", "unknown forget set 'two'"),
    "bad claim metric": ("claims: [{id: c, paper: p, finding: f, metric: Totl, kind: at_least, value: 1, "
                         "subject: {method: core}}]", "unknown metric 'Totl'"),
    "claim on a missing group": ("claims: [{id: c, paper: p, finding: f, metric: UA, kind: at_least, value: 1, "
                                 "subject: {group: nope}}]", "subject.group 'nope'"),
    "claim without operand": ("claims: [{id: c, paper: p, finding: f, metric: UA, kind: greater, "
                              "subject: {method: core}}]", "needs 'other'"),
    "bad override section": ("groups: [{id: g, methods: [core], forget: [one], overrides: [attack.steps=1]}]",
                             "sets 'attack'"),
    "bad method value": ("groups: [{id: g, methods: [core], forget: [one], overrides: [method.lr=-1]}]",
                         "method.lr"),
    # every override passes the strict checks of the run it reaches (attacks: resolve_attack)
    "unknown method key": ("groups: [{id: g, methods: [mace], forget: [one], overrides: [method.mapping_object=x]}]",
                           "unknown config key 'method.mapping_object'"),
    "unknown attack key": ("groups: [{id: g, methods: [core], forget: [one], attacks: [{id: a, attack: relearn, "
                           "overrides: [attack.stepz=1]}]}]", "unknown config key 'attack.stepz'"),
    "bad attack value": ("groups: [{id: g, methods: [original], forget: [one], attacks: [{id: a, attack: relearn, "
                         "overrides: [attack.data=nowhere]}]}]", "attack.data"),
    "the old evaluator key": ("protocols: {fast: ['eval.evaluators=/x']}", "eval.evaluator=canvas:DIR"),
    "the old task key": ("overrides: [task.images_per_pair=1]", "task.images_per_pair"),
    "concept set as an override": ("overrides: [task.concepts=canvas]", "recipe's `task:` block"),
    "bad curve point": ("claims: [{id: c, paper: p, finding: f, metric: AR_MU_top1@x, kind: at_least, value: 1, "
                        "subject: {method: core}}]", "NAME@STEP"),
    "unknown curve figure": ("claims: [{id: c, paper: p, finding: f, metric: Total@400, kind: at_least, value: 1, "
                             "subject: {method: core}}]", "unknown metric 'Total@400'"),
    "attack figure on erase runs": ("claims: [{id: c, paper: p, finding: f, metric: AR_DiMRA_top1, kind: at_least, "
                                    "value: 1, subject: {method: core}}]", "selects erase runs; give its attack"),
    "unknown shared attack": ("groups: [{id: g, methods: [core], forget: [one], attacks: [relearn]}]",
                              "attack 'relearn' is not one of the recipe's attacks (none)"),
    "shared attack with its own overrides": (
        "groups: [{id: g, methods: [core], forget: [one], attacks: [{use: a, overrides: [attack.steps=1]}]}]",
        "takes only 'methods' and 'variants' beside 'use' (got 'overrides')"),
    "unknown concept set": ("task: {concepts: no-such-set.yaml}", "forget set 'one'"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_recipes_exit_2_with_one_line(case, tmp_path):
    change, expected = BAD_RECIPES[case]
    base = {"name": "bad", "description": "d", "paper": "p", "forget_sets": "{one: [dotted]}",
            "groups": "[{id: g, methods: [core], forget: [one]}]",
            "estimate": "{runs: 1, minutes: 1, basis: b}"}
    key = change.split(":", 1)[0]
    lines = [f"{k}: {v}" for k, v in base.items() if k != key] + [change]
    path = tmp_path / "bad.yaml"
    path.write_text("\n".join(lines) + "\n")
    result = runner.invoke(app, ["bench", str(path), "--root", str(tmp_path / "out"), "--dry-run"])
    assert result.exit_code == 2, result.output
    out = [line for line in result.output.strip().splitlines() if line]
    assert len(out) == 1 and expected in out[0], result.output
    assert not (tmp_path / "out").exists()


def test_unknown_recipe_name_suggests_the_close_one():
    result = runner.invoke(app, ["bench", "quik"])
    assert result.exit_code == 2 and "did you mean 'quick'" in result.output


# ---- expansion -----------------------------------------------------------------------------------

def test_a_recipe_on_another_concept_set(tmp_path, tiny_model_dir, tiny_evaluator_dir):
    """The recipe's `task:` block (or --concepts / --forget-set) reaches every run: erase runs
    resolve with it, the control evaluates with it, the attacks get it; a set file named by the
    recipe is read beside the recipe."""
    import shutil

    import diffunlearn
    from diffunlearn.bench.recipe import with_concepts
    from diffunlearn.config import ConfigError
    from diffunlearn.data.concepts import SETS_DIR
    from diffunlearn.runs.resolve import resolve_erase

    path = tiny_recipe(tmp_path, tiny_model_dir, tiny_evaluator_dir, methods=("original", "core"))
    default = load_recipe(path)
    plain = expand(default, tmp_path / "root")
    assert all(n.task_options == {} for n in plain)

    moved = with_concepts(default, concepts="canvas", forget_sets={"dotted": ["grid"]})
    nodes = expand(moved, tmp_path / "root")
    labels = [(n.group, n.variant, n.method, n.forget, n.seed, n.attack) for n in nodes]
    assert labels == [(n.group, n.variant, n.method, n.forget, n.seed, n.attack) for n in plain]  # claims apply
    # node names (the store's keys) name the concept set, so neither grid replaces the other's rows
    assert [n.node.split(":", 1) for n in nodes] == [[nodes[0].node.split(":")[0], n.node] for n in plain]
    assert nodes[0].node.startswith("concepts-")
    run_grid(plain, FakeExecutor(metrics=lambda spec: {"UA": 10.0}), tmp_path / "root", report=lambda line: None)
    run_grid(nodes, FakeExecutor(metrics=lambda spec: {"UA": 90.0}), tmp_path / "root", report=lambda line: None)
    for recipe_on, ua in ((default, 10.0), (moved, 90.0)):
        frame = diffunlearn.results(recipe_on, tmp_path / "root")
        assert (frame["status"] == "complete").all() and (frame["UA"] == ua).all()
    assert all(n.concepts == ["grid"] and n.task_options == {"concepts": "canvas"} for n in nodes)
    erase = next(n for n in nodes if n.kind == "erase")
    resolved = resolve_erase("core", ["grid"], None, str(tiny_model_dir), None, erase.overrides, {"concepts": "canvas"})
    assert erase.run_id == resolved.run_id and resolved.task.concepts == "canvas"
    assert not {n.out for n in nodes} & {n.out for n in plain}  # other runs, other directories
    spec = next(n for n in nodes if n.kind == "evaluate").spec(tmp_path, None, {})
    assert spec["task_options"] == {"concepts": "canvas"} and spec["concepts"] == ["grid"]
    with pytest.raises(ConfigError, match="no forget set 'nope'"):
        with_concepts(default, forget_sets={"nope": ["grid"]})
    # flags that repeat the recipe's own set name its own runs (before: a scope, and every run again)
    assert expand(with_concepts(default, forget_sets={"dotted": ["dotted"]}), tmp_path / "root") == plain

    # a concept-set file named in the recipe is found beside it, from any working directory
    shutil.copy(SETS_DIR / "canvas.yaml", tmp_path / "myset.yaml")
    path.write_text(path.read_text() + "task: {concepts: myset.yaml}\n")
    recipe = load_recipe(path)
    assert recipe.task.concepts == str((tmp_path / "myset.yaml").resolve())
    assert all(n.task_options == {"concepts": recipe.task.concepts} for n in expand(recipe, tmp_path / "root"))

    # the command line: --forget-set NAME=C1,C2 (malformed: exit 2, one line) and --concepts
    result = runner.invoke(app, ["bench", str(path), "--root", str(tmp_path / "root"), "--dry-run",
                                 "--concepts", "canvas", "--forget-set", "dotted=grid,wavy"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["bench", str(path), "--dry-run", "--forget-set", "dotted"])
    assert result.exit_code == 2 and "NAME=CONCEPT" in result.output
    result = runner.invoke(app, ["bench", str(path), "--dry-run", "--forget-set", "dotted=doted"])
    assert result.exit_code == 2 and "unknown concept 'doted'" in result.output


def test_a_run_on_another_model_keeps_the_recipes_own_results(tmp_path, tiny_model_dir, tiny_evaluator_dir):
    """The store and the record files are keyed by node name: the same recipe on another model
    (`--model`) names its nodes after that model, so neither run replaces the other's rows (it
    did: `organism --model testbed-sd` overwrote the pixel testbed's records of the same labels)."""
    import shutil

    import diffunlearn

    other_model = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other_model)
    recipe = load_recipe(tiny_recipe(tmp_path, tiny_model_dir, tiny_evaluator_dir, methods=("original", "core")))
    root = tmp_path / "root"
    own, other = expand(recipe, root), expand(recipe, root, model=other_model)
    assert all(n.node.startswith("other-model-") and ":" in n.node for n in other)
    assert [n.node.split(":", 1)[1] for n in other] == [n.node for n in own]  # same labels after the model
    assert [n.node for n in expand(recipe, root, model=tiny_model_dir)] == [n.node for n in own]
    run_grid(own, FakeExecutor(metrics=lambda spec: {"UA": 10.0}), root, report=lambda line: None)
    run_grid(other, FakeExecutor(metrics=lambda spec: {"UA": 90.0}), root, report=lambda line: None)
    for model, ua in ((None, 10.0), (other_model, 90.0)):
        frame = diffunlearn.results(recipe, root, model=model)
        assert (frame["status"] == "complete").all() and (frame["UA"] == ua).all()
    assert len(list((root / recipe.name / "records").glob("*.json"))) == 2 * len(own)


def test_expansion_crosses_methods_seeds_and_attacks(tmp_path, tiny_model_dir, tiny_evaluator_dir):
    path = tiny_recipe(tmp_path, tiny_model_dir, tiny_evaluator_dir, seeds=(0, 1), methods=("original", "core", "esd"))
    nodes = expand(load_recipe(path), tmp_path / "root")
    kinds = [(n.kind, n.node) for n in nodes]
    assert ("evaluate", "g/default/original/dotted") in kinds  # the control is seedless: evaluated once
    assert sum(k == "erase" for k, _ in kinds) == 4  # 2 methods x 2 seeds
    assert sum(k == "attack" for k, _ in kinds) == 6  # relearn after each erase run and on the original per seed
    erase = {n.node: n for n in nodes if n.kind == "erase"}
    assert erase["g/default/core/dotted/s0"].run_id != erase["g/default/core/dotted/s1"].run_id  # seed in the id
    assert "seed=1" in erase["g/default/core/dotted/s1"].overrides
    attack = next(n for n in nodes if n.node == "g/default/core/dotted/s1/relearn-i")
    assert attack.depends == "g/default/core/dotted/s1" and attack.attack_model == str(
        erase["g/default/core/dotted/s1"].out.resolve())
    control = next(n for n in nodes if n.node == "g/default/original/dotted/s0/relearn-i")
    assert control.attack_forget == ["dotted"] and control.depends == "g/default/original/dotted"
    # the same recipe expands to the same run ids (finished runs are recognised)
    again = expand(load_recipe(path), tmp_path / "root")
    assert [(n.node, n.out) for n in again] == [(n.node, n.out) for n in nodes]


def test_a_shared_attack_expands_as_the_same_attack_written_in_the_group(tmp_path, tiny_model_dir,
                                                                        tiny_evaluator_dir):
    """`attacks:` at the recipe level, listed by id (or `{use: id, methods: [...]}`) in a group,
    gives the very runs (node ids, run ids, directories) the inline definition gives."""
    inline = tiny_recipe(tmp_path, tiny_model_dir, tiny_evaluator_dir, methods=("core", "esd"))
    text = inline.read_text()
    step = text[text.index("    attacks:\n"):text.index("\n\nestimate:")]
    shared = text.replace(step, "    attacks: [relearn-i]")
    shared = shared.replace("groups:\n", "attacks:\n" + "\n".join(line[4:] for line in step.splitlines()[1:])
                            + "\ngroups:\n")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "tiny.yaml").write_text(shared)
    expected = [(n.node, n.run_id, n.out) for n in expand(load_recipe(inline), tmp_path / "root")]
    assert [(n.node, n.run_id, n.out) for n in expand(load_recipe(tmp_path / "shared" / "tiny.yaml"),
                                                       tmp_path / "root")] == expected
    only_esd = shared.replace("attacks: [relearn-i]", "attacks: [{use: relearn-i, methods: [esd]}]")
    (tmp_path / "shared" / "tiny.yaml").write_text(only_esd)
    nodes = expand(load_recipe(tmp_path / "shared" / "tiny.yaml"), tmp_path / "root")
    assert [n.node for n in nodes if n.kind == "attack"] == ["g/default/esd/dotted/s0/relearn-i"]


# ---- claims ---------------------------------------------------------------------------------------

def test_t_interval_matches_hand_computation():
    # values 1, 2, 3: mean 2, s = 1, t(0.975, 2) = 4.303 -> half width 4.303 / sqrt(3) = 2.4843
    interval = Interval.of([1.0, 2.0, 3.0])
    assert interval.mean == 2.0 and interval.lo == pytest.approx(2 - 2.4843, abs=1e-3)
    assert interval.hi == pytest.approx(2 + 2.4843, abs=1e-3)
    assert t_quantile(1) == 12.706 and t_quantile(120) == pytest.approx(1.980, abs=2e-3)  # table value 1.980
    assert Interval.of([5.0]).lo is None and Interval.of([5.0], exact=True).lo == 5.0


def _frame(rows):
    base = {"kind": "erase", "group": "g", "variant": "default", "forget": "one", "attack": "none",
            "status": "complete"}
    return pd.DataFrame([{**base, **r} for r in rows])


def _claim(**kw):
    data = {"id": "c", "paper": "p", "finding": "f", "metric": "Total", "subject": {"method": "core"}}
    return Claim(**{**data, **kw})


def test_claim_kinds_give_holds_fails_and_inconclusive():
    rows = [{"method": "core", "seed": s, "Total": v} for s, v in enumerate([390.0, 392.0, 394.0])]
    rows += [{"method": "esd", "seed": s, "Total": v} for s, v in enumerate([300.0, 310.0, 305.0])]
    rows += [{"method": "salun", "seed": s, "Total": v} for s, v in enumerate([380.0, 400.0, 395.0])]
    rows += [{"method": "original", "seed": None, "Total": 299.0}]
    frame = _frame(rows)
    assert evaluate_claim(_claim(kind="greater", other={"method": "esd"}), frame).verdict == HOLDS
    assert evaluate_claim(_claim(kind="less", other={"method": "esd"}), frame).verdict == FAILS
    assert evaluate_claim(_claim(kind="greater", other={"method": "salun"}), frame).verdict == INCONCLUSIVE
    best = evaluate_claim(_claim(kind="best", among={"method": ["core", "esd", "salun"]}), frame)
    assert best.verdict == INCONCLUSIVE and "salun" in best.slices[0].numbers  # separates from esd, not salun
    assert evaluate_claim(_claim(kind="worst", among={"method": ["core", "esd"]}), frame).verdict == FAILS
    assert evaluate_claim(_claim(kind="at_least", value=380), frame).verdict == HOLDS  # [387.0, 397.0]
    assert evaluate_claim(_claim(kind="at_most", value=380), frame).verdict == FAILS
    assert evaluate_claim(_claim(kind="at_least", value=392), frame).verdict == INCONCLUSIVE
    # the seedless control is an exact point: core's interval is wholly above it
    assert evaluate_claim(_claim(kind="greater", other={"method": "original"}), frame).verdict == HOLDS
    # exact ties are not "greater"
    tie = _frame([{"method": "a", "seed": None, "Total": 100.0}, {"method": "b", "seed": None, "Total": 100.0}])
    assert evaluate_claim(_claim(kind="greater", subject={"method": "a"}, other={"method": "b"}), tie).verdict == FAILS
    assert evaluate_claim(_claim(kind="greater", other={"method": "nobody"}), frame).verdict == NO_DATA


def test_a_difference_inside_one_generation_is_inconclusive():
    """AR on 20 forget images moves in steps of 5 points: 3 points above a control evaluated at
    that resolution separate as intervals (zero spread on both sides) but are one generation's
    noise; 6 points are not. Worked by hand: means 3 and 6 against 0, all spreads 0."""
    def rows(ar: float, res: float, method: str) -> list[dict]:
        return [{"method": method, "attack": "relearn", "kind": "attack", "seed": s, "AR_DiMRA_top1": ar,
                 "AR_resolution": res, "AR_MU_top1": 0.0} for s in range(3)]

    claim = _claim(metric="AR_DiMRA_top1", kind="greater", subject={"method": "a", "attack": "relearn"},
                   other={"method": "retrain", "attack": "relearn"})
    close = evaluate_claim(claim, _frame(rows(3.0, 1.0, "a") + rows(0.0, 5.0, "retrain")))
    assert close.verdict == INCONCLUSIVE and "(resolution 5 points)" in close.slices[0].numbers
    # 15 points (45 of 300 generations: Wilson [11.40, 19.48]) against 0 of 60 ([0, 6.02]): apart
    assert evaluate_claim(claim, _frame(rows(15.0, 1.0, "a") + rows(0.0, 5.0, "retrain"))).verdict == HOLDS
    rise = _claim(metric="AR_DiMRA_top1", kind="rises", from_metric="AR_MU_top1",
                  subject={"method": "a", "attack": "relearn"})
    assert evaluate_claim(rise, _frame(rows(3.0, 5.0, "a"))).verdict == INCONCLUSIVE
    assert evaluate_claim(rise, _frame(rows(5.0, 5.0, "a"))).verdict == HOLDS  # one whole generation
    assert evaluate_claim(_claim(kind="greater", other={"method": "esd"}), _frame(  # Total: no resolution
        [{"method": "core", "seed": s, "Total": 3.0} for s in range(3)]
        + [{"method": "esd", "seed": s, "Total": 0.0} for s in range(3)])).verdict == HOLDS


def test_shares_of_generations_get_at_least_the_wilson_interval():
    """Seeds that agree give a t-interval of width 0; the generations behind a share bound how
    narrow it can be. Worked by hand (z = 1.959964, z^2 = 3.841459), Wilson's interval
    (k + z^2/2) / (n + z^2) +/- z / (n + z^2) * sqrt(k (n - k) / n + z^2 / 4):
    - 0 of 60: centre 1.92073 / 63.84146 = 0.030086, half 0.030701 * 0.979982 = 0.030086 -> [0, 6.017]
    - 45 of 300: centre 46.92073 / 303.84146 = 0.154425, half 0.0064506 * sqrt(38.25 + 0.960365)
      = 0.040393 -> [11.403, 19.482]"""
    from diffunlearn.bench.claims import interval, wilson
    from diffunlearn.bench.results import leaderboard

    assert wilson(0, 60) == (pytest.approx(0.0, abs=1e-9), pytest.approx(6.017, abs=1e-3))
    lo, hi = wilson(45, 300)
    assert lo == pytest.approx(11.403, abs=1e-3) and hi == pytest.approx(19.482, abs=1e-3)

    def rows(ar: float, res: float | None, method: str = "a") -> list[dict]:
        return [{"method": method, "attack": "relearn", "kind": "attack", "seed": s, "AR_DiMRA_top1": ar,
                 "AR_resolution": res, "Total": 7.0} for s in range(3)]

    agree = _frame(rows(15.0, 1.0))
    floored = interval(agree, "AR_DiMRA_top1")  # three runs of 100 generations, each 15: t-interval [15, 15]
    assert (floored.lo, floored.hi) == (pytest.approx(11.403, abs=1e-3), pytest.approx(19.482, abs=1e-3))
    assert "Wilson interval of 300 generations" in floored.text()
    assert interval(agree, "Total").lo == 7.0  # not a share: the t-interval alone
    assert interval(_frame(rows(15.0, None)), "AR_DiMRA_top1").lo == 15.0  # no resolution recorded: unchanged
    spread = _frame([{**r, "AR_DiMRA_top1": v} for r, v in zip(rows(15.0, 1.0), (0.0, 15.0, 30.0), strict=True)])
    wide = interval(spread, "AR_DiMRA_top1")  # t: 15 +/- 4.303 * 15 / sqrt(3) = [-22.3, 52.3], wider than Wilson
    assert wide.hi == pytest.approx(15 + 4.303 * 15 / 3 ** 0.5, abs=1e-2) and wide.generations is None
    assert wide.lo == 0.0  # cut to the range of a share
    assert interval(_frame([{**r, "Total": v} for r, v in zip(rows(15.0, 1.0), (0.0, 15.0, 30.0), strict=True)]),
                    "Total").lo < 0  # not a share: not cut
    board = leaderboard(agree, ["AR_DiMRA_top1"], "attack")  # the leaderboard shows the same interval
    assert board.loc[0, "AR_DiMRA_top1_lo"] == pytest.approx(11.403, abs=1e-3)
    # a control evaluated once (seedless, exact) at 0 of 22 generations is not exactly 0 either
    control = _frame([{"method": "original", "seed": None, "AR_MU_top1": 0.0, "AR_resolution": 100 / 22}])
    assert interval(control, "AR_MU_top1").hi == pytest.approx(14.865, abs=1e-3)  # Wilson, 0 of 22
    claim = _claim(metric="AR_MU_top1", kind="at_most", value=10, subject={"method": "original"})
    assert evaluate_claim(claim, control).verdict == INCONCLUSIVE  # 0 of 22: up to 14.9% is possible


def test_ua_and_erase_acc_are_shares_of_the_forget_generations_too():
    """UA ([001]) and erase ACC ([003]) count the same full-forget-prompt generations as AR_MU, so
    three seeds at UA 100 on 20 images each are 60 of 60: by the symmetry of Wilson's interval,
    [100 - 6.017, 100] (0 of 60 is [0, 6.017], worked by hand above). UA_partial (other images)
    and IRA without its count of retain images (runs before 2026-12-07) keep their t-interval."""
    from diffunlearn.bench.claims import interval

    rows = _frame([{"method": "core", "seed": s, "UA": 100.0, "UA_partial": 100.0, "IRA": 100.0, "erase_ACC": 0.0,
                    "AR_resolution": 5.0} for s in range(3)])
    ua = interval(rows, "UA")
    assert (ua.lo, ua.hi) == (pytest.approx(93.983, abs=1e-3), 100.0)
    assert interval(rows, "erase_ACC").hi == pytest.approx(6.017, abs=1e-3)
    assert interval(rows, "UA_partial").lo == 100.0 and interval(rows, "IRA").lo == 100.0
    # one generation's difference in UA (95 against 100 at 5 points each) is noise, a whole one is not
    claim = _claim(metric="UA", kind="greater", subject={"method": "core"}, other={"method": "esd"})
    esd = [{"method": "esd", "seed": s, "UA": 96.0, "AR_resolution": 5.0} for s in range(3)]
    assert "(resolution 5 points)" in evaluate_claim(claim, _frame(rows.to_dict("records") + esd)).slices[0].numbers


def test_per_method_judges_each_listed_method_apart():
    """`per: [method]` over a subject listing two methods gives each its own verdict on its own
    runs (they were pooled: n=6 for both); the other side, the original, stays the original."""
    rows = [{"method": "a", "seed": s, "Total": v} for s, v in enumerate([10.0, 11.0, 12.0])]
    rows += [{"method": "b", "seed": s, "Total": v} for s, v in enumerate([50.0, 52.0, 54.0])]
    rows += [{"method": "original", "seed": None, "Total": 30.0}]
    claim = _claim(kind="less", subject={"method": ["a", "b"]}, other={"method": "original"}, per=["method"])
    result = evaluate_claim(claim, _frame(rows))
    verdicts = {s.key["method"]: s.verdict for s in result.slices}
    assert verdicts == {"a": HOLDS, "b": FAILS} and result.verdict == FAILS
    a = next(s for s in result.slices if s.key["method"] == "a")
    assert "a 11 [" in a.numbers and "(n=3)" in a.numbers and "original 30" in a.numbers


def test_rises_pairs_by_seed_and_per_slices():
    rows = [{"method": "esd", "attack": "relearn-i", "kind": "attack", "seed": s, "forget": f,
             "AR_MU_top1": mu, "AR_DiMRA_top1": dimra}
            for s, f, mu, dimra in [(0, "one", 0, 10), (1, "one", 5, 20), (2, "one", 0, 12),
                                    (0, "three", 10, 10), (1, "three", 20, 20), (2, "three", 5, 5)]]
    frame = _frame(rows)
    claim = _claim(metric="AR_DiMRA_top1", kind="rises", from_metric="AR_MU_top1",
                   subject={"method": "esd", "attack": "relearn-i"}, per=["forget"])
    result = evaluate_claim(claim, frame)
    verdicts = {s.key["forget"]: s.verdict for s in result.slices}
    # one: differences 10, 15, 12 -> mean 12.33, s 2.52, half 6.25: [6.1, 18.6] > 0; three: all 0 -> no rise
    assert verdicts == {"one": HOLDS, "three": FAILS} and result.verdict == FAILS
    assert "12.33" in next(s.numbers for s in result.slices if s.key["forget"] == "one")
    falls = _claim(metric="AR_MU_top1", kind="falls", other={"method": "esd", "attack": "relearn-i"},
                   subject={"method": "esd", "attack": "relearn-i"})
    assert evaluate_claim(falls, frame[frame["forget"] == "three"]).verdict == FAILS  # identical: no fall


# ---- the store ------------------------------------------------------------------------------------

def _write_records(path: str, writer: int, count: int) -> None:
    store = Store(path)
    for i in range(count):
        node = f"w{writer}/n{i}"
        store.record({"recipe": "r", "node": node, "spec": "s", "kind": "erase", "status": "complete",
                      "metrics": {f"m{k}": float(writer * 1000 + i + k) for k in range(20)} | {"nan": float("nan")},
                      "curves": [("loss", step, "loss", float(step)) for step in range(30)]})


def test_store_survives_four_concurrent_writers(tmp_path):
    path = str(tmp_path / "results.sqlite")
    Store(path)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_write_records, args=(path, w, 25)) for w in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
        assert w.exitcode == 0
    store = Store(path)
    assert store.journal == "wal"
    runs = store.runs("r")
    assert len(runs) == 100 and {r["status"] for r in runs} == {"complete"}
    metrics = store.metrics("r")
    assert len(metrics) == 100 * 20  # NaN never stored
    assert len(store.curves("r")) == 100 * 30
    # a rerun replaces a node's row and figures, never duplicates them
    _write_records(path, 0, 1)
    assert len(store.runs("r")) == 100 and len(store.metrics("r")) == 2000


# ---- the runner (fake executor: order, skipping, failures) -----------------------------------------

def test_the_longest_chain_of_runs_starts_first(tmp_path, tiny_model_dir, tiny_evaluator_dir):
    """Estimated seconds (erase, then its attack): s0 30 + 5, s1 10 + 50, s2 40 + 0, the control
    1. Chains: s1 60, s2 40, s0 35, control 1 (+ its attack 1: 2). With one job, s1's erase
    starts first, though the recipe lists it second; an attack still waits for its erase run."""
    from diffunlearn.bench.grid import critical_path_first

    path = tiny_recipe(tmp_path, tiny_model_dir, tiny_evaluator_dir, seeds=(0, 1, 2), methods=("original", "core"))
    nodes = expand(load_recipe(path), tmp_path / "root")
    seconds = {"g/default/core/dotted/s0": 30, "g/default/core/dotted/s0/relearn-i": 5,
               "g/default/core/dotted/s1": 10, "g/default/core/dotted/s1/relearn-i": 50,
               "g/default/core/dotted/s2": 40, "g/default/core/dotted/s2/relearn-i": 0}
    for n in nodes:
        n.est_seconds = seconds.get(n.node, 1)
    assert critical_path_first(nodes)[:4] == ["g/default/core/dotted/s1", "g/default/core/dotted/s1/relearn-i",
                                              "g/default/core/dotted/s2", "g/default/core/dotted/s0"]
    fake = FakeExecutor()
    run_grid(nodes, fake, tmp_path / "root", jobs=1, report=lambda line: None)
    assert fake.submitted[:3] == ["g/default/core/dotted/s1", "g/default/core/dotted/s1/relearn-i",
                                  "g/default/core/dotted/s2"]


def test_a_run_listed_twice_is_charged_to_the_node_that_starts_it(tmp_path, tiny_model_dir, tiny_evaluator_dir):
    """Two nodes on one run directory: `expand` charges the first in recipe order (45 s) and the
    other a start-up (8 s); when the run order starts the second first, it does the work, so it
    carries the 45 s (the progress line had counted 8 s for a run that took 45)."""
    from diffunlearn.bench.grid import charge_the_first_of_each_run

    path = tiny_recipe(tmp_path, tiny_model_dir, tiny_evaluator_dir, seeds=(0, 1), methods=("core",))
    by_id = {n.node: n for n in expand(load_recipe(path), tmp_path / "root")}
    first, second = by_id["g/default/core/dotted/s0"], by_id["g/default/core/dotted/s1"]
    second.out = first.out
    first.est_seconds, second.est_seconds = 45.0, 8.0
    charge_the_first_of_each_run(list(by_id.values()), [second.node, first.node])
    assert (second.est_seconds, first.est_seconds) == (45.0, 8.0)


def test_time_left_scales_the_estimates_by_the_speed_measured_so_far():
    """Worked by hand: A (estimate 200 s) finished in 1000 s, so speed = (1000 + 600) / (200 + 600)
    = 2 (600 s of estimate taken at face value). Pending C 50 and D 150: 400 s at that speed;
    B (300 s) has run 100 s: 300 * 2 - 100 = 500 s left. Two jobs: max((400 + 500) / 2, 500) = 500;
    one job: 900. Before anything finished, the estimates as they are: (50+150+300+200)/2 = 350.
    A node done in under a fifth of its estimate found its work done and leaves the speed alone."""
    from types import SimpleNamespace

    from diffunlearn.bench.grid import Progress

    nodes = [SimpleNamespace(node=k, est_seconds=v) for k, v in (("A", 200), ("B", 300), ("C", 50), ("D", 150))]
    fresh = Progress(nodes, set(), report=lambda line: None, jobs=2)
    assert fresh.left_seconds({}, set(), now=0.0) == pytest.approx(350.0)
    for jobs, expected in ((2, 500.0), (1, 900.0)):
        progress = Progress(nodes, set(), report=lambda line: None, jobs=jobs)
        progress.finished("A", 1000.0)
        assert progress.speed() == pytest.approx(2.0)
        assert progress.left_seconds({"B": 1000.0}, set(), now=1100.0) == pytest.approx(expected)
    assert progress.left_seconds({"B": 1000.0}, {"C", "D"}, now=1100.0) == pytest.approx(500.0)  # blocked: none
    # a retrain whose pretraining was cached (estimate 3300 s, done in 30) found its work done: the speed stays 2
    progress.estimates["R"] = 3300.0
    progress.finished("R", 30.0)
    assert progress.speed() == pytest.approx(2.0)


def test_an_attack_run_is_keyed_on_its_resolved_profile(tmp_path, tiny_model_dir, tiny_evaluator_dir,
                                                       monkeypatch):
    """A changed testbed profile (the overrides unchanged) gives the attack a new run directory,
    so the runner runs it again rather than taking the run made under the old profile for done;
    the erase run it attacks stays done."""
    from diffunlearn.attacks.relearn import Relearn

    path = tiny_recipe(tmp_path, tiny_model_dir, tiny_evaluator_dir, seeds=(0,))
    recipe, root = load_recipe(path), tmp_path / "root"
    before = expand(recipe, root)
    run_grid(before, FakeExecutor(), root, jobs=1, report=lambda line: None)
    attack = next(n for n in before if n.kind == "attack")
    profile = next(p for p in ("testbed", "paper") if Relearn.profiles[p]["lr"] == attack.attack_config["lr"])
    monkeypatch.setitem(Relearn.profiles, profile, {**Relearn.profiles[profile], "lr": attack.attack_config["lr"] / 2})
    after = expand(recipe, root)
    moved = next(n for n in after if n.kind == "attack")
    assert moved.attack_config["lr"] == attack.attack_config["lr"] / 2
    assert moved.out != attack.out and moved.out.parent == attack.out.parent
    assert moved.overrides_keyed_out == attack.overrides_keyed_out  # the overrides alone did not change
    again = FakeExecutor()
    run_grid(after, again, root, jobs=1, report=lambda line: None)
    assert again.submitted == [attack.node]


def test_attack_runs_keyed_on_their_overrides_are_adopted_when_their_config_still_holds(
        tmp_path, tiny_model_dir, tiny_evaluator_dir):
    """Attack runs recorded when keys hashed the overrides alone move to today's directory, and
    count as done, when the `attack` section they recorded is what the attack resolves to now;
    one made under another profile (400 steps) stays where it was and runs again."""
    import json

    from diffunlearn.bench.worker import record_path

    path = tiny_recipe(tmp_path, tiny_model_dir, tiny_evaluator_dir, seeds=(0, 1))
    recipe, root = load_recipe(path), tmp_path / "root"
    nodes = expand(recipe, root)
    run_grid(nodes, FakeExecutor(), root, jobs=1, report=lambda line: None)
    attacks = [n for n in nodes if n.kind == "attack"]
    assert len(attacks) == 2 and all(n.overrides_keyed_out != n.out for n in attacks)
    kept, stale = attacks
    assert kept.attack_config["steps"] != 400
    for node, steps in ((kept, kept.attack_config["steps"]), (stale, 400)):
        node.overrides_keyed_out.mkdir(parents=True)
        (node.overrides_keyed_out / "config.yaml").write_text(json.dumps({"attack": {**node.attack_config,
                                                                                    "steps": steps}}))
        spec = node.spec(root, 1, {})
        record = json.loads(record_path(spec).read_text())
        record_path(spec).write_text(json.dumps(record | {"out": str(node.overrides_keyed_out.resolve()),
                                                          "spec": "keyed-on-overrides"}))
    Store(root / "results.sqlite").mark(recipe.name, kept.node, "pending")  # the store reads the records again
    again = FakeExecutor()
    result = run_grid(expand(recipe, root), again, root, jobs=1, report=lambda line: None)
    assert again.submitted == [stale.node]
    assert kept.node in result.skipped
    assert (kept.out / "config.yaml").is_file() and not kept.overrides_keyed_out.exists()
    assert (stale.overrides_keyed_out / "config.yaml").is_file() and not stale.out.exists()
    rows = {r["node"]: r for r in Store(root / "results.sqlite").runs(recipe.name)}
    assert rows[kept.node]["out"] == str(kept.out.resolve()) and rows[kept.node]["spec"] == kept.spec_hash


def test_runner_orders_dependencies_skips_finished_and_blocks_after_failures(tmp_path, tiny_model_dir,
                                                                              tiny_evaluator_dir):
    path = tiny_recipe(tmp_path, tiny_model_dir, tiny_evaluator_dir, seeds=(0, 1))
    recipe, root = load_recipe(path), tmp_path / "root"
    nodes = expand(recipe, root)
    fake = FakeExecutor()
    result = run_grid(nodes, fake, root, jobs=4, report=lambda line: None)
    assert sorted(result.done) == sorted(n.node for n in nodes) and result.ok
    for n in nodes:
        if n.depends:  # an attack is submitted only after its erase run finished
            assert fake.finished.index(n.depends) < fake.submitted.index(n.node)
    again = FakeExecutor()
    result = run_grid(expand(recipe, root), again, root, jobs=4, report=lambda line: None)
    assert again.submitted == [] and len(result.skipped) == len(nodes)

    # a changed config is a new run: its node runs again; a failure blocks its attack
    changed = path.read_text().replace("method.steps=2", "method.steps=3")
    path.write_text(changed)
    failing = FakeExecutor(fail={"g/default/core/dotted/s0"})
    result = run_grid(expand(load_recipe(path), root), failing, root, jobs=4, retries=1, report=lambda line: None)
    assert failing.submitted.count("g/default/core/dotted/s0") == 2  # retried once
    assert result.failed == ["g/default/core/dotted/s0"] and result.blocked == ["g/default/core/dotted/s0/relearn-i"]
    assert "g/default/core/dotted/s1/relearn-i" in result.done
    rows = {r["node"]: r for r in Store(root / "results.sqlite").runs(recipe.name)}
    assert len(rows) == len(nodes) and rows["g/default/core/dotted/s0"]["status"] == "failed"
    assert rows["g/default/core/dotted/s0/relearn-i"]["status"] == "pending"


def test_a_diverged_run_counts_as_failed_and_is_never_retried(tmp_path, tiny_model_dir, tiny_evaluator_dir):
    path = tiny_recipe(tmp_path, tiny_model_dir, tiny_evaluator_dir, seeds=(0, 1))
    root = tmp_path / "root"
    diverging = FakeExecutor(diverge={"g/default/core/dotted/s0"})
    result = run_grid(expand(load_recipe(path), root), diverging, root, jobs=4, retries=3, report=lambda line: None)
    assert diverging.submitted.count("g/default/core/dotted/s0") == 1  # deterministic: no retry
    assert result.failed == result.diverged == ["g/default/core/dotted/s0"] and not result.ok
    assert result.blocked == ["g/default/core/dotted/s0/relearn-i"]
    assert sorted(result.done) == ["g/default/core/dotted/s1", "g/default/core/dotted/s1/relearn-i"]
    rows = {r["node"]: r for r in Store(root / "results.sqlite").runs("tiny")}
    assert rows["g/default/core/dotted/s0"]["status"] == "diverged"


def test_bench_exits_3_when_every_failure_diverged_and_1_when_a_run_crashed():
    from diffunlearn.bench.grid import GridResult
    from diffunlearn.cli import bench_exit_status

    diverged = GridResult(done=["b"], skipped=[], failed=["a"], blocked=["a/relearn-i"], seconds=1.0, diverged=["a"])
    crashed = GridResult(done=[], skipped=[], failed=["a", "c"], blocked=[], seconds=1.0, diverged=["a"])
    assert bench_exit_status(diverged) == 3 and bench_exit_status(crashed) == 1


def test_worker_reports_diverged_runs_and_run_directories_in_use(tmp_path, tiny_model_dir, tiny_evaluator_dir,
                                                                 monkeypatch):
    """The worker's side, without training: a run that raises TrainingDiverged, or whose run.json
    already says `diverged`, is recorded `diverged` (exit 3, never raised for Ray/submitit to
    retry); a run directory another command holds makes the node busy, not failed."""
    import json

    import diffunlearn
    from diffunlearn.bench.executors import EXIT_STATUS
    from diffunlearn.bench.grid import write_spec
    from diffunlearn.bench.worker import EXIT_DIVERGED, NodeBusy, main, run_node
    from diffunlearn.engine.errors import TrainingDiverged
    from diffunlearn.runs.common import claimed_dir

    path = tiny_recipe(tmp_path, tiny_model_dir, tiny_evaluator_dir, attacks=False)
    root = tmp_path / "root"
    node = expand(load_recipe(path), root)[0]
    spec = node.spec(root, 1, {})

    def diverges(*args, **kwargs):
        raise TrainingDiverged(4, "loss is nan", None)

    monkeypatch.setattr(diffunlearn, "erase", diverges)
    record = run_node(spec, raise_on_failure=True)  # returned, not raised
    assert record["status"] == "diverged" and "step 4" in record["error"]
    monkeypatch.undo()

    node.out.mkdir(parents=True)
    (node.out / "run.json").write_text(json.dumps({"run_id": node.run_id, "kind": "erase", "status": "diverged",
                                                   "step": 7, "reason": "gradient norm is inf"}))
    assert main([str(write_spec(spec, tmp_path / "specs"))]) == EXIT_DIVERGED and EXIT_STATUS[3] == "diverged"
    saved = json.loads(next((root / "tiny" / "records").glob("*.json")).read_text())
    assert saved["status"] == "diverged" and "step 7" in saved["error"]

    (node.out / "run.json").unlink()
    with claimed_dir(node.out), pytest.raises(NodeBusy, match="in use"):  # `diffunlearn erase --out` holds it
        run_node(spec)


# ---- results and the report (fake records) -----------------------------------------------------------

SCRIPT = "<script>alert(1)</script>"


def test_report_escapes_user_strings(tmp_path, tiny_model_dir, tiny_evaluator_dir):
    import diffunlearn
    from diffunlearn.bench.report import render_report

    claims = textwrap.dedent(f"""\
        claims:
          - id: c1
            paper: "[001] <b>Table 1</b>"
            finding: "{SCRIPT} erases"
            metric: UA
            kind: at_least
            value: 10
            subject: {{method: core}}
        """)
    path = tiny_recipe(tmp_path, tiny_model_dir, tiny_evaluator_dir, seeds=(0, 1), forget_name=SCRIPT,
                       claims=claims)
    recipe, root = load_recipe(path), tmp_path / "root"
    fake = FakeExecutor()
    run_grid(expand(recipe, root), fake, root, jobs=2, report=lambda line: None)
    frame = diffunlearn.results(path, root)
    assert set(frame["forget"]) == {SCRIPT} and (frame["status"] == "complete").all()
    html = render_report(recipe, tmp_path / "report.html", root).read_text()
    assert SCRIPT not in html and "<b>Table 1</b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert html.count("<script>") == 1  # the report's own sorter, nothing else
    assert "holds" in html  # UA 50 in both seeds: an exact interval above 10


def test_the_results_folder_spelled_two_ways_holds_the_same_finished_runs(tmp_path, tiny_model_dir,
                                                                         tiny_evaluator_dir, monkeypatch):
    """A grid run with `--root runs/bench` from its folder is the same grid as `--root
    /abs/.../runs/bench` from anywhere: its runs are recognised (skipped, and shown by results)."""
    import diffunlearn

    path = tiny_recipe(tmp_path, tiny_model_dir, tiny_evaluator_dir, seeds=(0, 1))
    monkeypatch.chdir(tmp_path)
    relative = Path("runs") / "bench"
    first = run_grid(expand(load_recipe(path), relative), FakeExecutor(), relative, report=lambda line: None)
    assert first.ok and first.done
    monkeypatch.chdir(tiny_model_dir)
    absolute = tmp_path / "runs" / "bench"
    frame = diffunlearn.results(path, absolute)
    assert len(frame) == len(first.done) and (frame["status"] == "complete").all()
    again = run_grid(expand(load_recipe(path), absolute), FakeExecutor(), absolute, report=lambda line: None)
    assert not again.done and sorted(again.skipped) == sorted(first.done)


def test_report_writes_its_figures_as_png_files(tmp_path, tiny_model_dir, tiny_evaluator_dir):
    from diffunlearn.bench.report import figure_file_name

    assert figure_file_name("strength: AR over attack steps") == "strength-ar-over-attack-steps"
    assert figure_file_name("<script>/../x: é") == "script-x"
    assert figure_file_name("::") == "figure"
    path = tiny_recipe(tmp_path, tiny_model_dir, tiny_evaluator_dir, seeds=(0, 1))
    recipe, root = load_recipe(path), tmp_path / "root"
    run_grid(expand(recipe, root), FakeExecutor(), root, jobs=2, report=lambda line: None)
    result = runner.invoke(app, ["report", str(path), "--root", str(root), "--out", str(tmp_path / "r.html"),
                                 "--figures", str(tmp_path / "figures")])
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert "g-erase-runs.png" in written
    html = (tmp_path / "r.html").read_text()
    for name in written:  # each file is one of the report's figures, byte for byte
        data = (tmp_path / "figures" / name).read_bytes()
        assert data.startswith(b"\x89PNG") and base64.b64encode(data).decode() in html


def test_an_attack_several_groups_run_gets_one_figure_of_all_their_curves(tmp_path, tiny_model_dir,
                                                                          tiny_evaluator_dir):
    """The methods' AR curves beside the controls' (the organism's relearn-long: original,
    retrain and the unlearned models) in one figure, only when two groups run the attack."""
    from diffunlearn.bench.report import figure_file_name

    path = tiny_recipe(tmp_path, tiny_model_dir, tiny_evaluator_dir, seeds=(0, 1))
    text = path.read_text()
    group = text[text.index("  - id: g\n"):text.index("\n\nestimate:")]
    path.write_text(text.replace(group, group + "\n" + group.replace("id: g\n", "id: controls\n")
                                 .replace("methods: ['core']", "methods: ['original']")))
    recipe, root = load_recipe(path), tmp_path / "root"
    assert [g.id for g in recipe.groups] == ["g", "controls"]

    def curves(spec):
        return [["attack", 0, "AR_MU_top1", 0.0], ["attack", 1, "AR_MU_top1", 40.0]] if spec["kind"] == "attack" else []

    run_grid(expand(recipe, root), FakeExecutor(curves=curves), root, jobs=2, report=lambda line: None)
    shared = figure_file_name("relearn-i: AR over attack steps, every group") + ".png"
    result = runner.invoke(app, ["report", str(path), "--root", str(root), "--out", str(tmp_path / "r.html"),
                                 "--figures", str(tmp_path / "figures")])
    assert result.exit_code == 0, result.output
    written = {p.name for p in (tmp_path / "figures").iterdir()}
    assert shared in written and "g-ar-over-attack-steps.png" in written
    path.write_text(text)  # one group: its own figure only
    run_grid(expand(load_recipe(path), tmp_path / "root1"), FakeExecutor(curves=curves), tmp_path / "root1", jobs=2,
             report=lambda line: None)
    result = runner.invoke(app, ["report", str(path), "--root", str(tmp_path / "root1"), "--out",
                                 str(tmp_path / "r1.html"), "--figures", str(tmp_path / "figures1")])
    written = {p.name for p in (tmp_path / "figures1").iterdir()}
    assert "g-ar-over-attack-steps.png" in written and shared not in written


def test_a_claim_reads_the_attack_curve_at_one_step(tmp_path, tiny_model_dir, tiny_evaluator_dir):
    """`AR_MU_top1@1`: each attack's AR at step 1 (curves 0 -> 10 * (seed + 1) -> 90), compared
    by seed with the last step (`rises` from the point to AR_final): 90 - 10 and 90 - 20, a
    mean of 75 with a t-interval of 75 +/- 12.706 * 7.071 / sqrt(2) = [11.47, 138.53]: holds."""
    import diffunlearn

    claims = textwrap.dedent("""\
        claims:
          - id: later-is-higher
            paper: p
            finding: f
            metric: AR_final_top1
            kind: rises
            from_metric: AR_MU_top1@1
            subject: {method: core, attack: relearn-i}
        leaderboard:
          attack: [AR_MU_top1@1, AR_final_top1]
        """)
    path = tiny_recipe(tmp_path, tiny_model_dir, tiny_evaluator_dir, seeds=(0, 1), claims=claims)
    recipe, root = load_recipe(path), tmp_path / "root"

    def curves(spec):
        if spec["kind"] != "attack":
            return []
        return [["attack", 0, "AR_MU_top1", 0.0], ["attack", 1, "AR_MU_top1", 10.0 * (spec["seed"] + 1)],
                ["attack", 2, "AR_MU_top1", 90.0]]

    def metrics(spec):
        return {"AR_final_top1": 90.0} if spec["kind"] == "attack" else {"UA": 50.0}

    run_grid(expand(recipe, root), FakeExecutor(metrics=metrics, curves=curves), root, jobs=2,
             report=lambda line: None)
    frame = diffunlearn.results(path, root)
    attacks = frame[frame["kind"] == "attack"].set_index("seed")
    assert attacks.loc[0, "AR_MU_top1@1"] == 10.0 and attacks.loc[1, "AR_MU_top1@1"] == 20.0
    assert frame.loc[frame["kind"] == "erase", "AR_MU_top1@1"].isna().all()
    result = evaluate_claim(recipe.claims[0], frame)
    assert result.verdict == HOLDS and "75 [11.47, 138.5]" in result.slices[0].numbers, result.slices[0].numbers


def test_results_command_prints_the_leaderboard_and_every_kind_of_claim(tmp_path, tiny_model_dir,
                                                                        tiny_evaluator_dir):
    from diffunlearn.bench.claims import describe

    extras = {"greater": ["other: {method: original}"], "best": ["among: {method: [core, original]}"],
              "at_least": ["value: 10"], "rises": ["from_metric: AR_MU_top1"],
              "same": ["from_metric: AR_MU_top1", "value: 5"]}
    lines = ["claims:"]
    for kind, extra in extras.items():
        on_attack = kind in ("rises", "same")
        lines += [f"  - id: {kind}", "    paper: p", "    finding: f",
                  f"    metric: {'AR_DiMRA_top1' if on_attack else 'UA'}", f"    kind: {kind}",
                  f"    subject: {{method: core{', attack: relearn-i' if on_attack else ''}}}",
                  *[f"    {e}" for e in extra]]
    claims = "\n".join(lines) + "\n"
    path = tiny_recipe(tmp_path, tiny_model_dir, tiny_evaluator_dir, seeds=(0, 1), methods=("original", "core"),
                       claims=claims)
    recipe, root = load_recipe(path), tmp_path / "root"
    figures = {"erase": {"UA": 90.0}, "evaluate": {"UA": 0.0}, "attack": {"AR_MU_top1": 0.0, "AR_DiMRA_top1": 20.0}}
    run_grid(expand(recipe, root), FakeExecutor(metrics=lambda spec: figures[spec["kind"]]), root, jobs=2,
             report=lambda line: None)
    result = runner.invoke(app, ["results", str(path), "--root", str(root), "--csv", str(tmp_path / "runs.csv")])
    assert result.exit_code == 0, result.output
    assert "| core | 2 | 90 |" in result.output  # two seeds pooled; identical values: no interval shown
    verdicts = {c.id: c for c in recipe.claims}
    assert set(verdicts) == {"greater", "best", "at_least", "rises", "same"}
    for line in result.output.splitlines():
        if line.startswith("| rises |"):
            assert "**holds**" in line and "> 0" in line  # 0 -> 20 in both seeds
        if line.startswith("| same |"):
            assert "**fails**" in line and "within +/-5" in line  # a change of 20 is outside +/-5
    assert all(describe(c) for c in recipe.claims)
    assert len(pd.read_csv(tmp_path / "runs.csv")) == 7  # 1 evaluate + 2 erase + 4 attacks


def test_a_node_locked_elsewhere_is_deferred_then_run(tmp_path, tiny_model_dir, tiny_evaluator_dir, monkeypatch):
    from diffunlearn.bench import grid
    from diffunlearn.bench.worker import NodeBusy, node_lock

    out = tmp_path / "run"
    with node_lock(out), pytest.raises(NodeBusy):  # a second holder is refused at once
        with node_lock(out):
            pass

    class BusyOnce(FakeExecutor):
        def submit(self, spec):
            if spec["node"] not in self.submitted:
                self.submitted.append(spec["node"])
                self.queue.append((spec["node"], "busy"))
                return
            super().submit(spec)

    monkeypatch.setattr(grid, "BUSY_RETRY_SECONDS", 0.2)
    path = tiny_recipe(tmp_path, tiny_model_dir, tiny_evaluator_dir, attacks=False)
    root = tmp_path / "root"
    fake = BusyOnce()
    result = run_grid(expand(load_recipe(path), root), fake, root, jobs=1, report=lambda line: None,
                      poll_seconds=0.05)
    assert result.ok and result.done == ["g/default/core/dotted/s0"] and fake.submitted.count(result.done[0]) == 2


def test_attack_bars_keep_two_attacks_on_one_erase_run_apart():
    """Two attacks of a group on the same erase run (resurgence in- and out-of-domain) are two
    bars; with one label for both the board's index repeated and the report crashed."""
    import pandas as pd

    from diffunlearn.bench.report import plots

    board = pd.DataFrame([{"method": "mace", "variant": "default", "forget": "one", "attack": attack,
                           "resurgence": value, "resurgence_lo": value - 1, "resurgence_hi": value + 1}
                          for attack, value in (("in-domain", 2.0), ("out-of-domain", 0.5))])
    assert {plots.config_label(r) for _, r in board.iterrows()} == {"mace/in-domain", "mace/out-of-domain"}
    png = plots.bars(board, ["resurgence"], "erase-n")
    assert png is not None and png.startswith(b"\x89PNG")


def test_each_band_of_a_curve_plot_has_its_line_colour(monkeypatch):
    """Two configurations, each with a spread over seeds: the band from the lowest to the highest
    seed is drawn in its own line's colour (matplotlib cycles fill colours apart from line
    colours, so without it a band could take another line's colour)."""
    import pandas as pd
    from matplotlib.colors import to_rgba

    from diffunlearn.bench.report import plots

    figures = []
    monkeypatch.setattr(plots, "_png", lambda fig: figures.append(fig) or b"png")
    rows = [{"label": label, "name": "AR_MU_top1", "forget": "dotted", "step": step, "value": base + seed * step / 100}
            for label, base in (("original", 100.0), ("esd", 0.0), ("salun", 5.0))
            for seed in range(3) for step in (0, 400, 800) if not (label == "original" and seed)]
    assert plots.curves(pd.DataFrame(rows), "forget", ["AR_MU_top1"], "AR", "AR (%)") == b"png"
    ax = figures[0].axes[0]
    lines = {line.get_label(): to_rgba(line.get_color()) for line in ax.lines}
    bands = [tuple(band.get_facecolor()[0][:3]) for band in ax.collections]
    assert bands == [lines["esd"][:3], lines["salun"][:3]]  # the original has no spread, so no band
    # a share's panels all span 0-100, so a rise to 6% never looks like one to 100%
    low = [r | {"forget": "checkered", "value": r["value"] / 20} for r in rows if r["label"] != "original"]
    plots.curves(pd.DataFrame(rows + low), "forget", ["AR_MU_top1"], "AR", "AR (%)", plots.PERCENT_AXIS)
    assert [ax.get_ylim() for ax in figures[1].axes[:2]] == [plots.PERCENT_AXIS] * 2


def test_an_attack_costs_its_steps_and_its_evaluations_at_the_attack_rate():
    """costs.yaml (fitted 2026-12-07): start-up 8 s, a relearn step 0.06 s, an evaluation during an
    attack 21 s per 228 images, all times 1.4 beside a second job. DiMRA for 800 steps evaluated
    every 400 (steps 0, 400, 800) on `dotted` with 10 images per forget prompt and 1 per retain
    prompt (100 + 8 partial + 100 retain = 208 images): 1.4 * (8 + 800 * 0.06 + 3 * 21 * 208 / 228)
    = 158.9 s, against organism's measured median of 153 s for these runs."""
    from diffunlearn.bench.costs import Costs
    from diffunlearn.data.concepts import ConceptSet

    seconds = Costs.load().attack_seconds(
        "relearn", ["attack.steps=800", "attack.eval_every=400", "eval.forget_images_per_prompt=10",
                    "eval.images_per_prompt=1", "eval.partial_images=8", "seed=0"],
        ConceptSet.builtin("canvas"), ["dotted"])
    assert seconds == pytest.approx(1.4 * (8 + 800 * 0.06 + 3 * 21 * 208 / 228), rel=1e-9)
    assert seconds == pytest.approx(158.9, abs=0.1)


def test_each_retrain_cache_entry_is_charged_one_pretraining():
    """costs.yaml: one retrain pretraining of 10000 steps costs 2324 s, times 1.4 beside a second
    job. `methods/retrain.py` caches a pretraining per forget set and text encoder (kept or
    retrained) and step count, so a second UNet-only retrain of `dotted` costs none, one that also
    retrains the text encoder costs a whole pretraining more (1.4 * 2324 = 3253.6 s), and one of
    5000 steps half of it (1626.8 s)."""
    from diffunlearn.bench.costs import Costs
    from diffunlearn.runs.resolve import resolve_erase

    costs = Costs.load()

    def seconds(*overrides: str) -> float:
        return costs.erase_seconds(resolve_erase("retrain", ["dotted"], overrides=list(overrides)))

    seconds()  # the first pretraining, and the forget set's `before` evaluation
    cached = seconds()
    assert seconds("method.train_text_encoder=true") - cached == pytest.approx(3253.6)
    assert seconds("method.train_text_encoder=true") == pytest.approx(cached)
    assert seconds("method.pretrain_steps=5000") - cached == pytest.approx(1626.8)


def test_ira_and_cra_get_the_wilson_floor_of_the_retain_images_they_judged():
    """Three seeds at IRA 100 on 200 retain images each are 600 of 600, whose Wilson lower bound
    is n / (n + z^2) = 600 / 603.8415 = 99.364; one image moves IRA by 0.5 points, so 99.8 against
    100 is noise. `generation_counts` reads the count from an evaluation's `counts.judged`."""
    from diffunlearn.bench.claims import interval, resolution
    from diffunlearn.bench.extract import generation_counts

    figures = generation_counts({"counts": {"forget-full": 20, "judged": {"IRA": 200, "CRA": 150}}})
    assert figures == {"forget_images": 20, "AR_resolution": 5.0, "IRA_images": 200.0, "CRA_images": 150.0}
    # before `judged`: the canvas evaluator classifies every canvas concept, so every retain image counts
    old = {"evaluator": "canvas", "IRA": 99.0, "CRA": None, "counts": {"forget-full": 20, "retain": 200}}
    assert generation_counts(old) == {"forget_images": 20, "AR_resolution": 5.0, "IRA_images": 200.0}
    assert "IRA_images" not in generation_counts(old | {"evaluator": "clip:/models/clip"})
    rows = _frame([{"method": "core", "seed": s, "IRA": 100.0, "CRA": 90.0, "IRA_images": 200.0,
                    "CRA_images": 150.0} for s in range(3)])
    ira = interval(rows, "IRA")
    assert (ira.lo, ira.hi) == (pytest.approx(99.364, abs=1e-3), 100.0)
    preserve = interval(rows.assign(preserve_ACC=rows["IRA"]), "preserve_ACC")  # [003]'s name for IRA
    assert (preserve.lo, preserve.hi) == (ira.lo, ira.hi)
    assert resolution(rows, "IRA") == 0.5 and resolution(rows, "CRA") == pytest.approx(100 / 150)
    claim = _claim(metric="IRA", kind="greater", subject={"method": "core"}, other={"method": "esd"})
    esd = [{"method": "esd", "seed": s, "IRA": 99.8, "IRA_images": 200.0} for s in range(3)]
    assert evaluate_claim(claim, _frame(rows.to_dict("records") + esd)).verdict == INCONCLUSIVE


def test_the_direction_of_travel_gets_a_panel_per_weight_group(tmp_path, tiny_model_dir, tiny_evaluator_dir,
                                                                monkeypatch):
    """Three cosines per configuration in one panel hid each other (ESD changes only
    cross-attention, so its `toward_unlearned` and `toward_xattn` coincide): a panel per weight
    group, in the order unlearned, cross-attention, rest, each line a configuration alone."""
    from diffunlearn.bench.report import plots, render_report

    path = tiny_recipe(tmp_path, tiny_model_dir, tiny_evaluator_dir, seeds=(0,))
    recipe, root = load_recipe(path), tmp_path / "root"

    def curves(spec):
        if spec["kind"] != "attack":
            return []
        return [["attack", step, name, 0.1 * step] for step in (0, 1)
                for name in ("toward_noxattn", "toward_xattn", "toward_unlearned", "AR_MU_top1")]

    run_grid(expand(recipe, root), FakeExecutor(curves=curves), root, jobs=1, report=lambda line: None)
    figures = []
    monkeypatch.setattr(plots, "_png", lambda fig: figures.append(fig) or b"png")
    render_report(recipe, tmp_path / "r.html", root)
    (direction,) = [f for f in figures if f._suptitle.get_text().startswith("cosine of the attack's move")]
    titles = [ax.get_title() for ax in direction.axes if ax.get_title()]
    assert titles == [f"relearn-i / dotted: {group}" for group in
                      ("weights unlearning changed", "cross-attention", "rest of the UNet")]
    assert all(len(ax.lines) == 1 and ":" not in ax.lines[0].get_label() for ax in direction.axes if ax.lines)


def test_prune_deletes_only_the_run_directories_nothing_names(tmp_path, tiny_model_dir, tiny_evaluator_dir):
    """An erase directory of an old spec (with the lock file beside it) and an old attack under a
    current erase run are orphans; every directory a node names stays, and so does one only the
    store records (a grid on another model or concept set). --dry-run lists and deletes nothing."""
    from diffunlearn.bench.prune import orphaned_runs

    path = tiny_recipe(tmp_path, tiny_model_dir, tiny_evaluator_dir, seeds=(0,))
    recipe, root = load_recipe(path), tmp_path / "root"
    nodes = expand(recipe, root)
    run_grid(nodes, FakeExecutor(), root, jobs=1, report=lambda line: None)
    for n in nodes:
        n.out.mkdir(parents=True, exist_ok=True)
        (n.out / "metrics.json").write_text("{}")
    erase = next(n.out for n in nodes if n.kind == "erase")
    old_erase, old_attack = erase.parent / "core-000000000000", erase / "attacks" / "relearn-000000000000"
    for old in (old_erase, old_attack):
        old.mkdir(parents=True)
        (old / "images.npy").write_bytes(b"x" * 1000)
    old_erase.with_name(old_erase.name + ".lock").write_text("")

    # the store alone keeps every node's directory
    assert {o.path for o in orphaned_runs(recipe.name, root, [])} == {old_erase, old_attack}
    args = ["bench", str(path), "--root", str(root), "--prune"]
    listed = runner.invoke(app, [*args, "--dry-run"])
    assert listed.exit_code == 0, listed.output
    assert "2 run directories no node names" in listed.output and old_erase.exists() and old_attack.exists()
    deleted = runner.invoke(app, args)
    assert deleted.exit_code == 0, deleted.output
    assert "deleted 2 run directories" in deleted.output
    assert not old_erase.exists() and not old_attack.exists()
    assert not old_erase.with_name(old_erase.name + ".lock").exists()
    assert all((n.out / "metrics.json").exists() for n in nodes)
