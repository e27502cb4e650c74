"""`diffunlearn report RECIPE --out report.html`: one self-contained HTML file.

The claims with their verdicts and the numbers behind them, sortable leaderboards (means with
95% intervals over seeds), figures (bar charts with intervals, AR and distance curves over
attack steps, loss terms and distances over the unlearning) and image grids (forget and retain
prompts before and after unlearning, then before and after each attack, the same seeds in
each column), then every run with its status, time and host. Figures and images are embedded
as base64 PNG; the one script is inline; nothing is fetched. Rendered by jinja2 with
autoescaping on, so every user string (concept and forget-set names, paths, prompts,
findings) is shown as text.
"""

from __future__ import annotations

import base64
import datetime
from pathlib import Path
from typing import Any

from diffunlearn.bench.claims import evaluate_claims
from diffunlearn.bench.grid import DEFAULT_ROOT
from diffunlearn.bench.recipe import Recipe, load_recipe
from diffunlearn.bench.report import plots
from diffunlearn.bench.results import LABELS, cell, leaderboard, results
from diffunlearn.bench.store import Store

TEMPLATE = "template.html.j2"
MAX_IMAGE_GRIDS = 40
# the attack curves' direction of travel, each on its weight group ([002] §IV)
DIRECTION_CURVES = {"toward_unlearned": "weights unlearning changed", "toward_xattn": "cross-attention",
                    "toward_noxattn": "rest of the UNet"}
VERDICT_CLASS = {"holds": "holds", "fails": "fails", "inconclusive": "inconclusive", "no data": "nodata"}


def render_report(recipe: str | Path | Recipe, out: str | Path, root: str | Path = DEFAULT_ROOT,
                  model: str | Path | None = None, protocol: str = "fast", command: str | None = None,
                  figures_dir: str | Path | None = None) -> Path:
    """Write the report of a recipe's results (whatever has finished so far) to `out`; with
    `figures_dir`, also each of its figures as a PNG file there (for a README or a paper)."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    root = Path(root)
    frame = results(recipe, root, model=model, protocol=protocol)
    store = Store(root / "results.sqlite")
    context = report_context(recipe, frame, store.curves(recipe.name), store.runs(recipe.name),
                             command or f"diffunlearn bench {recipe.name}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_render(context), encoding="utf-8")
    if figures_dir is not None:
        write_figures(context["figures"], Path(figures_dir))
    return out


def write_figures(figures: list[dict[str, Any]], folder: Path) -> list[Path]:
    """Each figure as `<title as a file name>.png` in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for figure in figures:
        path = folder / f"{figure_file_name(figure['title'])}.png"
        path.write_bytes(base64.b64decode(figure["data"]))
        paths.append(path)
    return paths


def figure_file_name(title: str) -> str:
    """'strength: AR over attack steps' -> 'strength-ar-over-attack-steps' (letters, digits, '-')."""
    return "-".join("".join(c if c.isascii() and c.isalnum() else " " for c in title.lower()).split()) or "figure"


def render_html(recipe: Recipe, frame, curve_rows: list[dict[str, Any]], store_rows: list[dict[str, Any]],
                command: str) -> str:
    return _render(report_context(recipe, frame, curve_rows, store_rows, command))


def _render(context: dict[str, Any]) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    return env.get_template(TEMPLATE).render(**context)


def report_context(recipe: Recipe, frame, curve_rows: list[dict[str, Any]], store_rows: list[dict[str, Any]],
                   command: str) -> dict[str, Any]:
    """Everything the template shows: claims, leaderboards, figures (base64 PNG), image grids, runs."""
    import pandas as pd

    claims = evaluate_claims(recipe, frame)
    boards = []
    for kind, metrics in (("erase", recipe.leaderboard.erase), ("attack", recipe.leaderboard.attack)):
        board = leaderboard(frame, metrics, kind)
        if not board.empty:
            boards.append({"kind": kind, "metrics": metrics, "rows": _board_rows(board, metrics)})
    curves = pd.DataFrame(curve_rows, columns=["node", "source", "step", "name", "value"])
    labels = frame.set_index("node")[[*LABELS, "seed"]]
    curves = curves[curves["node"].isin(set(frame.loc[frame["status"] == "complete", "node"]))]
    curves = curves.join(labels, on="node")
    if not curves.empty:
        curves["label"] = [plots.config_label(r) for _, r in curves.iterrows()]
    counts = frame["status"].value_counts().to_dict()
    versions = sorted({r["versions"] for r in store_rows if r.get("versions")})
    gits = sorted({r["git"] for r in store_rows if r.get("git")})
    hosts = sorted({r["host"] for r in store_rows if r.get("host")})
    return {
        "recipe": recipe, "command": command, "generated": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "counts": counts, "total": len(frame), "claims": [_claim_view(c) for c in claims], "boards": boards,
        "figures": _figures(recipe, frame, curves), "grids": _grids(frame), "max_grids": MAX_IMAGE_GRIDS,
        "runs": _run_rows(frame), "versions": versions, "gits": gits, "hosts": hosts,
    }


def _claim_view(result) -> dict[str, Any]:
    return {"id": result.claim.id, "paper": result.claim.paper, "finding": result.claim.finding,
            "comparison": result.comparison, "verdict": result.verdict,
            "css": VERDICT_CLASS.get(result.verdict, "nodata"),
            "slices": [{"key": ", ".join(f"{k}={v}" for k, v in s.key.items()), "verdict": s.verdict,
                        "css": VERDICT_CLASS.get(s.verdict, "nodata"), "numbers": s.numbers} for s in result.slices]}


def _board_rows(board, metrics: list[str]) -> list[dict[str, Any]]:
    rows = []
    for _, r in board.iterrows():
        cells = [{"text": str(r[c]), "sort": str(r[c])} for c in ("group", "variant", "method", "forget", "attack")]
        cells.append({"text": str(r["runs"]), "sort": str(r["runs"])})
        for m in metrics:
            value = r[m]
            cells.append({"text": cell(value, r[f"{m}_lo"], r[f"{m}_hi"]),
                          "sort": "" if _missing(value) else repr(float(value))})
        rows.append(cells)
    return rows


def _figures(recipe: Recipe, frame, curves) -> list[dict[str, Any]]:
    figures = []

    def add(title: str, png: bytes | None, caption: str) -> None:
        if png:
            figures.append({"title": title, "caption": caption, "data": base64.b64encode(png).decode()})

    for group in recipe.groups:
        part = frame[frame["group"] == group.id]
        if part.empty:
            continue
        erase_board = leaderboard(part, recipe.leaderboard.erase, "erase")
        add(f"{group.id}: erase runs", plots.bars(erase_board, recipe.leaderboard.erase, group.id),
            "mean over seeds, error bars: 95% interval (t over seeds; AR-type shares at least Wilson's)")
        g = curves[curves["group"] == group.id] if not curves.empty else curves
        if group.attacks:
            attack_board = leaderboard(part, recipe.leaderboard.attack, "attack")
            add(f"{group.id}: attack runs", plots.bars(attack_board, recipe.leaderboard.attack, group.id),
                "mean over seeds, error bars: 95% interval (t over seeds; AR-type shares at least Wilson's)")
            if not g.empty:
                a = g[g["source"] == "attack"].copy()
                a["panel"] = a["attack"] + " / " + a["forget"]
                add(f"{group.id}: AR over attack steps",
                    plots.curves(a, "panel", ["AR_MU_top1"], "AR top-1 during the attack", "AR top-1 (%)",
                                 plots.PERCENT_AXIS),
                    "share of forget-prompt generations classified as the erased concept; mean over seeds, "
                    "band: lowest to highest seed")
                add(f"{group.id}: distance from the original weights during the attack",
                    plots.curves(a, "panel", ["dist_unlearned"], "distance on the weights unlearning changed",
                                 "L2 distance"),
                    "L2 distance to the original model on the weights the unlearning changed")
                direction = a[a["name"].isin(DIRECTION_CURVES)].copy()
                # a panel per weight group: one line per configuration, not three on top of each other;
                # a row of panels per attack, the weight groups in DIRECTION_CURVES' order
                first_seen = {panel: k for k, panel in enumerate(dict.fromkeys(direction["panel"]))}
                direction["order"] = direction["panel"].map(first_seen) * len(DIRECTION_CURVES) + direction[
                    "name"].map(list(DIRECTION_CURVES).index)
                direction = direction.sort_values("order", kind="stable")
                direction["panel"] = direction["panel"] + ": " + direction["name"].map(DIRECTION_CURVES)
                add(f"{group.id}: direction of travel during the attack",
                    plots.curves(direction, "panel", list(DIRECTION_CURVES),
                                 "cosine of the attack's move with the way back to the original", "cosine"),
                    "+1: straight back toward the original weights, 0: elsewhere, -1: away ([002] §IV); "
                    "on the weights unlearning changed, cross-attention and the rest of the UNet")
        if not g.empty:
            losses = g[g["source"] == "loss"].copy()
            loss_names = sorted(n for n in losses["name"].unique() if n.startswith("loss"))
            losses["panel"] = losses["label"] + " / " + losses["forget"]
            add(f"{group.id}: loss terms during unlearning",
                plots.curves(losses[losses["attack"] == "none"], "panel", loss_names, "loss terms", "loss"),
                "each loss term of the method per logged step, mean over seeds")
            cos_names = sorted(n for n in losses["name"].unique() if n.startswith("cos_"))
            if cos_names:
                add(f"{group.id}: gradient cosines",
                    plots.curves(losses[losses["attack"] == "none"], "panel", cos_names, "cosines", "cosine"),
                    "cosine of the update with the retain and forget gradients ([004] Fig. 2)")
            distance = g[g["source"] == "distance"].copy()
            add(f"{group.id}: distance from the original weights during unlearning",
                plots.curves(distance, "forget", ["dist_full"], "distance during unlearning", "L2 distance"),
                "L2 distance of the whole UNet to the original weights")
    for step, groups in _shared_attacks(recipe).items():
        a = curves[(curves["source"] == "attack") & (curves["attack"] == step)
                   & curves["group"].isin(groups)].copy() if not curves.empty else curves
        if a.empty or a["group"].nunique() < 2:
            continue
        a["label"] = [f"{r['group']}: {plots.config_label(r, attack=False)}" for _, r in a.iterrows()]
        add(f"{step}: AR over attack steps, every group",
            plots.curves(a, "forget", ["AR_MU_top1"], f"{step}: AR top-1 in every group that runs it",
                         "AR top-1 (%)", plots.PERCENT_AXIS),
            f"every group the attack {step} ran in, one panel per forget set: the unlearned models beside the "
            "controls attacked the same way; mean over seeds, band: lowest to highest seed")
    return figures


def _shared_attacks(recipe: Recipe) -> dict[str, list[str]]:
    """Each attack id that several groups run -> those groups (their AR curves share a figure)."""
    groups: dict[str, list[str]] = {}
    for group in recipe.groups:
        for step in group.attacks:
            groups.setdefault(step.id, []).append(group.id)
    return {step: ids for step, ids in groups.items() if len(ids) > 1}


def _grids(frame) -> list[dict[str, Any]]:
    """The first seed of each erase configuration: its samples, then each attack's."""
    done = frame[frame["status"] == "complete"]
    grids = []
    erase = done[done["kind"] == "erase"].sort_values(["group", "variant", "method", "forget", "seed"])
    for _, first in erase.groupby(["group", "variant", "method", "forget"], sort=False).head(1).iterrows():
        if len(grids) >= MAX_IMAGE_GRIDS:
            break
        images = [{"caption": "original -> after unlearning", "data": _image(Path(first["out"]) / "samples.png")}]
        attacks = done[(done["kind"] == "attack") & done["node"].str.startswith(first["node"] + "/")]
        for _, a in attacks.iterrows():
            images.append({"caption": f"{a['attack']}: after unlearning -> after the attack",
                           "data": _image(Path(a["out"]) / "samples.png")})
        images = [i for i in images if i["data"]]
        if images:
            grids.append({"title": f"{first['group']} / {first['variant']} / {first['method']} / {first['forget']} "
                                   f"(seed {first['seed']})", "images": images})
    return grids


def _image(path: Path) -> str | None:
    return base64.b64encode(path.read_bytes()).decode() if path.is_file() else None


def _missing(value) -> bool:
    import pandas as pd

    return value is None or bool(pd.isna(value))


def _run_rows(frame) -> list[dict[str, Any]]:
    rows = []
    for _, r in frame.iterrows():
        rows.append({"node": r["node"], "kind": r["kind"], "status": r["status"],
                     "seed": "" if _missing(r["seed"]) else str(r["seed"]),
                     "seconds": "" if _missing(r["seconds"]) else f"{r['seconds']:.0f}",
                     "host": "" if _missing(r["host"]) else r["host"], "out": r["out"],
                     "error": "" if _missing(r["error"]) else r["error"]})
    return rows
