"""The demo and its short markdown report."""

from __future__ import annotations

import time
from pathlib import Path

from diffunlearn.runs.common import Run
from diffunlearn.runs.erase import erase

DEMO_METHOD = "core"
DEMO_CONCEPT = "dotted"


def demo(out: str | Path = "runs/demo", threads: int | None = None, progress: bool = True) -> Path:
    """Erase one style with CORE from the shipped model; write the run and `report.md`."""
    from diffunlearn.config import shown
    from diffunlearn.io import atomic_write_text
    from diffunlearn.runs.common import check_creatable, is_scaffolding
    from diffunlearn.runs.resolve import RunDirError, check_threads

    out = Path(out)
    check_threads(threads)
    if not out.exists():
        check_creatable(out)
    elif not out.is_dir():
        raise RunDirError(f"output path {shown(str(out), 120)} exists and is not a directory; choose another --out")
    elif any(p.name not in ("run", "report.md") and not is_scaffolding(p.name) for p in out.iterdir()):
        raise RunDirError(f"output directory {shown(str(out), 120)} is not empty and holds no demo; "
                          "choose another --out")
    start = time.perf_counter()
    run = erase(DEMO_METHOD, forget=[DEMO_CONCEPT], out=out / "run", threads=threads, progress=progress)
    report = out / "report.md"
    atomic_write_text(report, render_report(run, seconds=time.perf_counter() - start))
    return report


def render_report(run: Run, seconds: float) -> str:
    """A short markdown report: the metrics table (with 95% CIs) and the sample grid."""
    keys = ("UA", "UA_partial", "IRA", "CRA", "AR_MU_top1", "AR_CL", "FID", "KID", "SFID", "Total")
    before, after = run.metrics.get("before", {}), run.metrics.get("after", {})
    lines = [f"# diffunlearn demo: {run.config['method']['name']} erases `{', '.join(run.metrics['forget'])}`", "",
             f"Run `{run.run_id}` in `{run.out}`; anchor map {run.metrics.get('anchor_map')}; "
             f"training {run.metrics['cost']['train_seconds']:.0f} s, demo {seconds:.0f} s in all.", "",
             "| metric | before | after | after 95% CI |", "|---|---|---|---|"]
    for k in keys:
        ci = after.get(f"{k}_ci")
        ci_text = f"[{ci[0]:.1f}, {ci[1]:.1f}]" if isinstance(ci, list | tuple) and len(ci) == 2 else ""
        lines.append(f"| {k} | {_fmt(before.get(k))} | {_fmt(after.get(k))} | {ci_text} |")
    lines += ["", "Samples (same seeds before and after):", "", "![samples](run/samples.png)", ""]
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, dict):
        value = value.get("mean")
    return f"{value:.2f}" if isinstance(value, int | float) else "-"
