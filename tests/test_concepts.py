"""Concept sets: the canvas as data, free-text sets, YAML files (data/concepts.py)."""

from __future__ import annotations

import pytest

from diffunlearn.data import canvas
from diffunlearn.data.concepts import ConceptSet, ConceptSetError, resolve_concept_set


def test_canvas_set_reproduces_the_procedural_world():
    cset = ConceptSet.builtin("canvas")
    items = cset.items()
    assert [(i.label("style"), i.label("object")) for i in items] == [
        (s, o) for s in canvas.ALL_STYLES for o in canvas.ALL_OBJECTS]
    assert all(cset.render(i) == canvas.full_prompt(i.label("style"), i.label("object")) for i in items)
    assert cset.erasable() == canvas.erasable_concepts()
    assert [cset.render(i) for i in cset.alone_items("dotted", evaluation=True)] == [canvas.partial_prompt("dotted")]
    assert [cset.render(i) for i in cset.alone_items("circle", evaluation=True)] == [canvas.partial_prompt("circle")]
    assert cset.is_neutral("plain") and cset.is_neutral("none") and not cset.is_neutral("dotted")
    full = [cset.render(i) for i in cset.full_items("dotted", exclude={"circle"})]
    assert full == [canvas.full_prompt("dotted", o) for o in canvas.OBJECTS if o != "circle"]
    assert set(cset.vocabulary()) <= set(canvas.vocabulary())  # the word-level tokenizer knows every word


def test_free_text_set_uses_domain_templates_and_multi_word_names():
    cset = ConceptSet.free_text(["Van Gogh"], ["Claude Monet"], domain="style")
    prompts = [cset.render(i) for i in cset.items()]
    assert "a painting in the style of Van Gogh" in prompts and "an artwork by Claude Monet" in prompts
    item = cset.alone_items("Van Gogh")[0]
    assert cset.anchor_prompt(item, "Van Gogh", "Claude Monet") == "a painting in the style of Claude Monet"
    assert cset.anchor_prompt(item, "Van Gogh", None) == ""  # no anchor: the empty prompt
    assert cset.anchor_prompt(item, "Van Gogh", "a painting") == "a painting in the style of a painting"
    evaluation = [cset.render(i) for i in cset.alone_items("Van Gogh", evaluation=True)]
    assert evaluation and not set(evaluation) & set(prompts)  # paraphrases never trained on


@pytest.mark.parametrize(("forget", "retain", "message"), [
    ([], None, "no forget concept"),
    (["Van Gog"], None, "did you mean 'Van Gogh'"),
    (["Van Gogh"], ["Van Gogh"], "both forget and retain"),
    (["Van Gogh", "Van Gogh"], None, "listed twice"),
])
def test_validation_errors_are_one_line(forget, retain, message):
    cset = ConceptSet.free_text(["Van Gogh", "Monet"], None, "style")
    with pytest.raises(ConceptSetError, match=message) as err:
        cset.validate(forget, retain)
    assert "\n" not in str(err.value)


def test_yaml_concept_set_and_its_errors(tmp_path):
    good = tmp_path / "art.yaml"
    good.write_text("name: art\ndomains:\n  style:\n    concepts: [Van Gogh, {name: Monet, text: Claude Monet}]\n"
                    "    templates: ['{style} painting']\nimages: {source: generated}\n")
    cset = ConceptSet.from_file(good)
    assert [cset.render(i) for i in cset.items()] == ["Van Gogh painting", "Claude Monet painting"]
    assert cset.fingerprint() != ConceptSet.free_text(["Van Gogh", "Monet"], None, "style").fingerprint()
    for text, message in [
        ("name: x\ndomains: {}\n", "domains"),
        ("name: x\ndomains:\n  style:\n    concepts: [a]\n    templates: ['{object} x']\n", "must use"),
        ("name: x\ndomains:\n  style:\n    concepts: [a, a]\n", "appears twice"),
        ("name: x\ndomains:\n  style:\n    concepts: [a]\nimages: {source: folder}\n", "needs images.path"),
        ("name: x\ndomains:\n  style:\n    concepts: [a]\ncolour: red\n", "unknown config key"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            ConceptSet.from_file(bad)


def test_resolution_picks_canvas_for_testbeds_and_free_text_elsewhere():
    assert resolve_concept_set(None, ["dotted"], None, "testbed").name == "canvas"
    with pytest.raises(ConceptSetError, match="unknown concept 'Van Gogh'.*canvas"):
        resolve_concept_set(None, ["Van Gogh"], None, "testbed")
    free = resolve_concept_set(None, ["Van Gogh"], None, None, domain="style", anchor="Monet")
    assert free.source == "free-text" and free.concept("Van Gogh").anchor == "Monet"
    anchored = resolve_concept_set("canvas", ["dotted"], None, "testbed", anchor="grid")
    assert anchored.concept("dotted").anchor == "grid" and anchored.concept("grid").anchor is None
