"""The HTML report in a real browser: headless Chromium renders it, the screenshot is not
blank, and the DOM holds the expected leaderboard rows.

Set-up: Debian's `chromium` package, installed by `.ci/run` (`apt-get install -y chromium`
where apt and root are available); when it is absent the test skips and says why. A test
never installs anything itself.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from bench_helpers import FakeExecutor, tiny_recipe

from diffunlearn.bench import expand, load_recipe
from diffunlearn.bench.grid import run_grid
from diffunlearn.bench.report import render_report

BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-dev-shm-usage", "--no-first-run", "--hide-scrollbars"]


@pytest.fixture(scope="session")
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium; .ci/run does it)")
    return path


METHODS = ("original", "core", "esd")


def _figures(spec):
    value = {"original": 0.0, "core": 100.0, "esd": 90.0}[spec["method"]] + (spec["seed"] or 0)
    if spec["kind"] == "attack":
        return {"AR_MU_top1": 5.0, "AR_DiMRA_top1": 10.0 + (spec["seed"] or 0), "retain_acc_after": 99.0}
    return {"UA": value, "IRA": 99.0, "CRA": 98.0, "SFID": 100.0, "Total": value + 297.0}


def _curves(spec):
    if spec["kind"] == "attack":
        return [("attack", step, name, float(step / 10)) for step in (0, 50, 100)
                for name in ("AR_MU_top1", "dist_unlearned")]
    return [("loss", step, "loss", 1.0 / (1 + step)) for step in range(0, 100, 10)] + [
        ("distance", step, "dist_full", step / 100) for step in range(0, 100, 10)]


def test_report_renders_in_headless_chromium(tmp_path, tiny_model_dir, tiny_evaluator_dir, chromium):
    claims = """claims:
  - id: core-beats-esd
    paper: "[001] Table 1"
    finding: "CORE erases better than ESD."
    metric: UA
    kind: greater
    subject: {method: core}
    other: {method: esd}
"""
    path = tiny_recipe(tmp_path, tiny_model_dir, tiny_evaluator_dir, seeds=(0, 1, 2), methods=METHODS, claims=claims)
    recipe, root = load_recipe(path), tmp_path / "root"
    run_grid(expand(recipe, root), FakeExecutor(metrics=_figures, curves=_curves), root, jobs=2,
             report=lambda line: None)
    report = render_report(recipe, tmp_path / "report.html", root)

    shot = tmp_path / "shot.png"
    subprocess.run([chromium, *BROWSER_FLAGS, f"--screenshot={shot}", "--window-size=1280,1600",
                    report.as_uri()], capture_output=True, timeout=180)
    assert shot.is_file(), "Chromium wrote no screenshot"
    from PIL import Image, ImageStat

    image = Image.open(shot).convert("L")
    stat = ImageStat.Stat(image)
    assert stat.stddev[0] > 10, "the screenshot is blank"
    assert image.getextrema()[0] < 60  # dark text somewhere

    dom = subprocess.run([chromium, *BROWSER_FLAGS, "--dump-dom", report.as_uri()], capture_output=True,
                         text=True, timeout=180).stdout
    board = re.search(r'<table[^>]*id="leaderboard-erase".*?</table>', dom, re.S)
    assert board, "no erase leaderboard in the rendered page"
    rows = re.findall(r"<tr>(.*?)</tr>", board.group(0).split("<tbody>")[1], re.S)
    assert len(rows) == len(METHODS)  # one row per configuration, seeds pooled
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in rows]
    assert {c[2] for c in cells} == set(METHODS) and all(c[5] == ("1" if c[2] == "original" else "3") for c in cells)
    assert "holds" in dom and 'class="verdict holds"' in dom  # UA 100-102 vs 90-92: separated
