"""The README demo on the shipped testbed (slow: about 2 minutes on 2 cores).

    python -m pytest -m slow
"""

from __future__ import annotations

import pytest

from diffunlearn.runs.resolve import ASSETS

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (ASSETS / "MANIFEST.json").exists(), reason="no shipped assets")]


def test_demo_forgets_the_style_and_keeps_the_rest(tmp_path):
    import diffunlearn

    report = diffunlearn.demo(tmp_path / "demo", progress=False)
    run = diffunlearn.erase("core", forget=["dotted"], out=tmp_path / "demo" / "run", progress=False)
    assert run.skipped  # the demo's run, recognised by its id
    after = run.metrics["after"]
    assert after["UA"] >= 80 and after["IRA"] >= 80 and after["CRA"] >= 80, after
    assert run.metrics["before"]["UA"] < 20  # the concept was there before
    text = report.read_text()
    assert "| UA |" in text and "samples.png" in text
    assert (tmp_path / "demo" / "run" / "samples.png").exists()
