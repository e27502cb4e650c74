"""D_f / D_r construction and the anchor schemes (data/tasks.py)."""

from __future__ import annotations

import numpy as np
import pytest

from diffunlearn.data import canvas
from diffunlearn.data.tasks import TaskError, UnlearningTask, build_anchor_map, cached_canvas_images


def test_forget_and_retain_sets_follow_the_definition():
    task = UnlearningTask.create(["dotted"], images_per_pair=3)
    forget_pairs = task.forget_pairs()
    assert {s for s, _ in forget_pairs} == {"dotted"}
    assert len(forget_pairs) == len(canvas.ALL_OBJECTS)
    retain_pairs = task.retain_pairs()
    assert all("dotted" not in pair for pair in retain_pairs)
    assert len(forget_pairs) + len(retain_pairs) == len(canvas.ALL_STYLES) * len(canvas.ALL_OBJECTS)
    assert len(task.items(forget_pairs)) == 3 * len(forget_pairs)


def test_explicit_retain_restricts_d_r():
    task = UnlearningTask.create(["circle"], retain=["square", "striped"])
    for s, o in task.retain_pairs():
        assert "circle" not in (s, o)
        assert s == "striped" or o == "square" or {s, o} <= {"plain", "none"}


def test_images_are_the_first_n_of_each_pair_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUNLEARN_CACHE", str(tmp_path))
    images = cached_canvas_images(seed=0, per_pair=2, size=16)
    pairs = [(s, o) for s in canvas.ALL_STYLES for o in canvas.ALL_OBJECTS]
    k = pairs.index(("grid", "arrow"))
    np.testing.assert_array_equal(images[k, 1], canvas.render("grid", "arrow", 1, seed=0).image)
    assert list(tmp_path.rglob("*.npy"))
    again = cached_canvas_images(seed=0, per_pair=2, size=16)
    np.testing.assert_array_equal(images, again)


def test_corrupt_cache_is_regenerated(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUNLEARN_CACHE", str(tmp_path))
    first = cached_canvas_images(seed=0, per_pair=1, size=16)
    path = next(tmp_path.rglob("*.npy"))
    path.write_bytes(b"not an npy file")
    np.testing.assert_array_equal(cached_canvas_images(seed=0, per_pair=1, size=16), first)


@pytest.mark.parametrize("bad", [["dottd"], ["plain"], ["none"], []])
def test_bad_concepts_are_rejected_with_choices(bad):
    with pytest.raises(TaskError) as err:
        UnlearningTask.create(bad)
    assert "valid concepts" in str(err.value) or "no forget" in str(err.value)


def test_concept_in_forget_and_retain_is_rejected():
    with pytest.raises(TaskError, match="both forget and retain"):
        UnlearningTask.create(["dotted"], retain=["dotted", "grid"])


def test_one_to_one_is_an_injection_onto_retain_concepts_of_the_same_domain():
    forget = ["dotted", "grid", "wavy"]
    retain = [s for s in canvas.STYLES if s not in forget]
    amap = build_anchor_map(forget, retain, "one-to-one", seed=3)
    anchors = [v[0] for v in amap.values()]
    assert len(set(anchors)) == 3 and set(anchors) <= set(retain)
    assert amap == build_anchor_map(forget, retain, "one-to-one", seed=3)  # seeded


def test_one_to_one_is_a_derangement_when_forget_outnumbers_retain():
    forget = list(canvas.STYLES[:8])
    retain = list(canvas.STYLES[8:10])
    for seed in range(5):
        amap = build_anchor_map(forget, retain, "one-to-one", seed=seed)
        anchors = [amap[f][0] for f in forget]
        assert sorted(anchors) == sorted(forget)
        assert all(a != f for a, f in zip(anchors, forget, strict=True))


def test_other_schemes():
    forget = ["dotted", "grid", "wavy", "zigzag", "solid", "barred"]
    retain = ["striped", "diagonal", "checkered", "gradient", "speckled"]
    all_to_one = build_anchor_map(forget, retain, "all-to-one", 0)
    assert len({v[0] for v in all_to_one.values()}) == 1
    five = build_anchor_map(forget, retain, "five-to-one", 0)
    assert len({v[0] for v in five.values()}) <= 2
    assert build_anchor_map(forget, retain, "one-to-all", 0)["dotted"] == retain
    assert len(set(build_anchor_map(forget, retain, "one-to-five", 0)["dotted"])) == 5
    assert build_anchor_map(["dotted"], retain, "fixed:plain", 0) == {"dotted": ["plain"]}
    nxt = build_anchor_map(["dotted", "grid"], retain, "next", 0)
    assert nxt["dotted"] == ["wavy"]  # grid follows dotted but is forgotten too
    mixed = build_anchor_map(["dotted", "circle"], ["striped", "square"], "one-to-one", 0)
    assert mixed == {"dotted": ["striped"], "circle": ["square"]}
    with pytest.raises(TaskError):
        build_anchor_map(["dotted"], retain, "fixed:nonsense", 0)
    with pytest.raises(TaskError):
        build_anchor_map(["dotted"], retain, "two-to-one", 0)
