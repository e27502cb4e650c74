"""D_f / D_r construction and the anchor schemes (data/tasks.py)."""

from __future__ import annotations

import numpy as np
import pytest

from diffunlearn.data import canvas
from diffunlearn.data.concepts import ConceptSet, ConceptSetError
from diffunlearn.data.tasks import TaskError, UnlearningTask, build_anchor_map


def _pairs(items):
    return [(i.label("style"), i.label("object")) for i in items]


def test_forget_and_retain_sets_follow_the_definition():
    task = UnlearningTask.create(["dotted"], images_per_prompt=3)
    forget_pairs = _pairs(task.forget_items())
    assert {s for s, _ in forget_pairs} == {"dotted"}
    assert len(forget_pairs) == len(canvas.ALL_OBJECTS)
    retain_pairs = _pairs(task.retain_items())
    assert all("dotted" not in pair for pair in retain_pairs)
    assert len(forget_pairs) + len(retain_pairs) == len(canvas.ALL_STYLES) * len(canvas.ALL_OBJECTS)
    assert [task.prompt(i) for i in task.forget_items()] == [canvas.full_prompt(s, o) for s, o in forget_pairs]


def test_explicit_retain_restricts_d_r():
    task = UnlearningTask.create(["circle"], retain=["square", "striped"])
    for s, o in _pairs(task.retain_items()):
        assert "circle" not in (s, o)
        assert s == "striped" or o == "square" or {s, o} <= {"plain", "none"}


def test_images_are_the_first_n_of_each_item():
    task = UnlearningTask.create(["grid"], images_per_prompt=2)
    item = next(i for i in task.forget_items() if i.label("object") == "arrow")
    images = task.item_images(item)
    assert images.shape == (2, 3, 16, 16)
    np.testing.assert_array_equal(images[1], canvas.render("grid", "arrow", 1, seed=0).image)


def test_free_text_task_has_no_retain_items_without_retain_concepts():
    cset = ConceptSet.free_text(["Van Gogh"], ["Monet"], "style")
    task = UnlearningTask.create(["Van Gogh"], concept_set=cset, source=object())
    assert [task.prompt(i) for i in task.forget_items()][0] == "a painting in the style of Van Gogh"
    assert {c for i in task.retain_items() for c in i.concepts} == {"Monet"}
    assert task.anchor_map == {"Van Gogh": ["Monet"]}  # auto: one-to-one onto the retain concept
    alone = UnlearningTask.create(["Van Gogh"], retain=[], concept_set=cset, source=object())
    assert alone.retain_items() == [] and alone.anchor_map == {"Van Gogh": []}  # the empty prompt
    own = ConceptSet.free_text(["Van Gogh"], None, "style", anchor="a painting")
    assert UnlearningTask.create(["Van Gogh"], concept_set=own, source=object()).anchor_map == {
        "Van Gogh": ["a painting"]}


@pytest.mark.parametrize("bad", [["dottd"], ["plain"], ["none"], []])
def test_bad_concepts_are_rejected_with_choices(bad):
    with pytest.raises(ConceptSetError) as err:
        UnlearningTask.create(bad)
    assert "valid concepts" in str(err.value) or "no forget" in str(err.value)


def test_concept_in_forget_and_retain_is_rejected():
    with pytest.raises(ConceptSetError, match="both forget and retain"):
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
