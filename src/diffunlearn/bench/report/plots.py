"""The report's figures as PNG bytes (matplotlib, Agg backend, no files): bar charts with 95%
intervals over seeds, AR and distance curves over attack steps, loss terms and distances over
the unlearning steps. Every text in a figure is drawn into pixels, so it needs no escaping."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

MAX_PANELS = 12


def _figure(panels: int, width: float = 4.2, height: float = 3.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(panels, 3)
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[panels:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:panels])


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()


def config_label(row, attack: bool = True) -> str:
    """method[/variant][/attack]: one label per configuration of a board (a group's attacks on
    the same erase run are configurations of their own); `attack=False` where one attack is shown."""
    parts = [str(row["method"])]
    if row.get("variant") not in (None, "default"):
        parts.append(str(row["variant"]))
    if attack and row.get("attack") not in (None, "none"):
        parts.append(str(row["attack"]))
    return "/".join(parts)


def bars(board: pd.DataFrame, metrics: list[str], title: str) -> bytes | None:
    """One panel per metric: a bar per configuration and forget set, with its 95% interval."""
    metrics = [m for m in metrics if m in board.columns and board[m].notna().any()][:MAX_PANELS]
    if board.empty or not metrics:
        return None
    board = board.copy()
    board["label"] = [config_label(r) for _, r in board.iterrows()]
    labels = list(dict.fromkeys(board["label"]))
    forgets = list(dict.fromkeys(board["forget"]))
    fig, axes = _figure(len(metrics), width=max(4.2, 0.45 * len(labels) * len(forgets) + 1.5))
    width = 0.8 / max(len(forgets), 1)
    for ax, metric in zip(axes, metrics, strict=True):
        for k, forget in enumerate(forgets):
            part = board[board["forget"] == forget].set_index("label")
            xs, heights, low, high = [], [], [], []
            for i, label in enumerate(labels):
                if label not in part.index or part.loc[label, metric] is None:
                    continue
                row = part.loc[label]
                mean = float(row[metric])
                lo = row[f"{metric}_lo"] if row[f"{metric}_lo"] is not None else mean
                hi = row[f"{metric}_hi"] if row[f"{metric}_hi"] is not None else mean
                xs.append(i + k * width - 0.4 + width / 2)
                heights.append(mean)
                low.append(max(mean - float(lo), 0.0))
                high.append(max(float(hi) - mean, 0.0))
            ax.bar(xs, heights, width, yerr=[low, high], capsize=2, label=str(forget))
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=9)
        if len(forgets) > 1:
            ax.legend(fontsize=6, title="forget", title_fontsize=6)
    fig.suptitle(title, fontsize=10)
    return _png(fig)


PERCENT_AXIS = (-2.0, 102.0)  # every panel of a share on one scale, so that panels compare at a glance


def curves(frame: pd.DataFrame, panels_by: str, names: list[str], title: str, ylabel: str,
           ylim: tuple[float, float] | None = None) -> bytes | None:
    """Mean over seeds of curves `names` against step, one panel per value of `panels_by`, one
    line per configuration (and curve name), a band from the lowest to the highest seed; every
    panel on `ylim` when given (a share: `PERCENT_AXIS`)."""
    frame = frame[frame["name"].isin(names)]
    if frame.empty:
        return None
    keys = list(dict.fromkeys(frame[panels_by]))[:MAX_PANELS]
    fig, axes = _figure(len(keys))
    for ax, key in zip(axes, keys, strict=True):
        part = frame[frame[panels_by] == key]
        for (label, name), lines in part.groupby(["label", "name"], sort=False):
            stats = lines.groupby("step")["value"].agg(["mean", "min", "max"]).sort_index()
            text = label if part["name"].nunique() == 1 else f"{label}: {name}"
            (line,) = ax.plot(stats.index, stats["mean"], label=text, linewidth=1.2)
            if (stats["max"] > stats["min"]).any():  # in the line's colour: fills cycle colours apart from lines
                ax.fill_between(stats.index, stats["min"], stats["max"], alpha=0.15, color=line.get_color())
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.set_title(str(key), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    return _png(fig)
