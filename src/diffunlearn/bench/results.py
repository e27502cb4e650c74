"""A recipe's results as pandas DataFrames: one row per run, the leaderboard over seeds, the
claims with their verdicts, and the text `diffunlearn results RECIPE` prints.

    import diffunlearn
    frame = diffunlearn.results("quick")          # one row per run, one column per metric
    board = leaderboard(frame, ["UA", "Total"])    # mean and 95% interval over seeds
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from diffunlearn.bench.claims import ClaimResult, evaluate_claims, interval
from diffunlearn.bench.extract import curve_point
from diffunlearn.bench.grid import DEFAULT_ROOT, expand, sync_store
from diffunlearn.bench.recipe import Recipe, load_recipe

if TYPE_CHECKING:
    import pandas as pd

LABELS = ["kind", "group", "variant", "method", "forget", "attack"]
INFO = ["node", *LABELS, "seed", "status", "seconds", "run_id", "out", "host", "error"]


def results(recipe: str | Path | Recipe, root: str | Path = DEFAULT_ROOT, model: str | Path | None = None,
            protocol: str = "fast", current: bool = True) -> pd.DataFrame:
    """One row per run of the recipe (pending ones included), one column per metric.

    `current`: only the nodes of the recipe as it expands now (same run ids), so an edited
    recipe never mixes old rows in; False: everything the store holds for the recipe's name."""
    import pandas as pd

    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    root = Path(root)
    nodes = expand(recipe, root, model=model, protocol=protocol) if current else []
    store = sync_store(root, recipe.name, nodes)
    rows = {r["node"]: r for r in store.runs(recipe.name)}
    if current:
        frame_rows = []
        for n in nodes:
            row = rows.get(n.node)
            fresh = row is not None and row["spec"] == n.spec_hash
            frame_rows.append({
                "node": n.node, "kind": n.kind, "group": n.group, "variant": n.variant, "method": n.method,
                "forget": n.forget, "attack": n.attack, "seed": n.seed,
                "status": row["status"] if fresh else "pending",
                "seconds": row["seconds"] if fresh else None, "run_id": (row or {}).get("run_id") or n.run_id,
                "out": str(n.out), "host": row["host"] if fresh else None, "error": row["error"] if fresh else None})
    else:
        frame_rows = [{"node": r["node"], "kind": r["kind"], "group": r["grp"], "variant": r["variant"],
                       "method": r["method"], "forget": r["forget"], "attack": r["attack"], "seed": r["seed"],
                       "status": r["status"], "seconds": r["seconds"], "run_id": r["run_id"], "out": r["out"],
                       "host": r["host"], "error": r["error"]} for r in rows.values()]
    frame = pd.DataFrame(frame_rows, columns=INFO)
    frame["seed"] = frame["seed"].astype("Int64")
    complete = set(frame.loc[frame["status"] == "complete", "node"])
    figures = [m for m in store.metrics(recipe.name) if m["node"] in complete]
    if figures:
        wide = pd.DataFrame(figures).pivot_table(index="node", columns="name", values="value", aggfunc="first")
        frame = frame.merge(wide.drop(columns=[c for c in wide.columns if c in INFO], errors="ignore"),
                            left_on="node", right_index=True, how="left")
    points = sorted(m for m in _named_metrics(recipe) if curve_point(m))
    if points:
        frame = _with_curve_points(frame, store.curves(recipe.name, "attack"), points, complete)
    return frame.reset_index(drop=True)


def _named_metrics(recipe: Recipe) -> set[str]:
    claims = {m for c in recipe.claims for m in (c.metric, c.from_metric) if m}
    return claims | set(recipe.leaderboard.erase) | set(recipe.leaderboard.attack)


def _with_curve_points(frame: pd.DataFrame, curve_rows: list[dict], points: list[str], complete: set[str]):
    """A column per `NAME@STEP`: each finished attack's curve figure at that step (empty where
    the attack did not evaluate at that step)."""
    import pandas as pd

    curves = pd.DataFrame(curve_rows, columns=["node", "source", "step", "name", "value"])
    curves = curves[curves["node"].isin(complete)]
    for point in points:
        name, step = curve_point(point)
        at = curves[(curves["name"] == name) & (curves["step"] == step)].groupby("node")["value"].first()
        frame[point] = frame["node"].map(at)
    return frame


def leaderboard(frame: pd.DataFrame, metrics: list[str], kind: str | None = None) -> pd.DataFrame:
    """Mean and 95% interval (lo, hi) over seeds of each metric, per configuration: the t-interval,
    for a share of the forget generations at least the Wilson interval of its pooled generations
    (`claims.interval`)."""
    import pandas as pd

    rows = frame[frame["status"] == "complete"]
    if kind == "attack":
        rows = rows[rows["kind"] == "attack"]
    elif kind == "erase":
        rows = rows[rows["kind"] != "attack"]
    out = []
    for key, group in rows.groupby(LABELS, sort=False, dropna=False):
        entry = dict(zip(LABELS, key, strict=True))
        entry["runs"] = len(group)
        for metric in metrics:
            figure = interval(group, metric)  # the claims' interval: shares never narrower than Wilson's
            if figure is None:
                entry.update({metric: None, f"{metric}_lo": None, f"{metric}_hi": None})
                continue
            entry.update({metric: figure.mean, f"{metric}_lo": figure.lo, f"{metric}_hi": figure.hi})
        out.append(entry)
    columns = [*LABELS, "runs", *[c for m in metrics for c in (m, f"{m}_lo", f"{m}_hi")]]
    return pd.DataFrame(out, columns=columns)


def cell(mean, lo, hi) -> str:
    """'98.3 [96.1, 100.5]', '98.3' (exact or one value) or '-'."""
    if mean is None or mean != mean:
        return "-"
    if lo is None or hi is None or lo != lo or lo == hi:
        return f"{mean:.4g}"
    return f"{mean:.4g} [{lo:.4g}, {hi:.4g}]"


def markdown_board(board: pd.DataFrame, metrics: list[str]) -> str:
    shown = [c for c in ("group", "variant", "method", "forget", "attack") if board[c].nunique() > 1 or c == "method"]
    head = "| " + " | ".join([*shown, "runs", *metrics]) + " |"
    lines = [head, "|" + "---|" * (len(shown) + 1 + len(metrics))]
    for _, r in board.iterrows():
        values = [str(r[c]) for c in shown] + [str(r["runs"])]
        values += [cell(r[m], r[f"{m}_lo"], r[f"{m}_hi"]) for m in metrics]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


def markdown_claims(claims: list[ClaimResult]) -> str:
    lines = ["| claim | paper | finding | comparison | verdict | figures |", "|---|---|---|---|---|---|"]
    for c in claims:
        figures = "<br>".join((f"{', '.join(f'{k}={v}' for k, v in s.key.items())}: " if s.key else "") +
                              f"**{s.verdict}** {s.numbers}" for s in c.slices)
        lines.append(f"| {c.claim.id} | {c.claim.paper} | {c.claim.finding} | `{c.comparison}` | "
                     f"**{c.verdict}** | {figures} |")
    return "\n".join(lines)


def summary_text(recipe: Recipe, frame: pd.DataFrame) -> str:
    """What `diffunlearn results` prints: run counts, the leaderboards and the claims."""
    counts = frame["status"].value_counts().to_dict()
    parts = [f"# {recipe.name}: {recipe.paper}", "",
             "runs: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), ""]
    for kind, metrics in (("erase", recipe.leaderboard.erase), ("attack", recipe.leaderboard.attack)):
        board = leaderboard(frame, metrics, kind)
        if not board.empty:
            parts += [f"## {kind} runs (mean [95% interval] over seeds: Student t; AR-type shares at least the "
                      "Wilson interval of their generations)", "", markdown_board(board, metrics), ""]
    if recipe.claims:
        parts += ["## claims", "", markdown_claims(evaluate_claims(recipe, frame)), ""]
    return "\n".join(parts)
