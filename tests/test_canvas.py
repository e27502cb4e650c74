"""The procedural style x object world: determinism, shapes, masks, names, splits, prompts."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from diffunlearn.data import canvas


def test_render_is_deterministic_by_seed_style_object_index():
    a = canvas.render("striped", "circle", 3, seed=7)
    b = canvas.render("striped", "circle", 3, seed=7)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert (a.style, a.object) == ("striped", "circle")
    # each of the four inputs changes the sample
    for other in (
        canvas.render("striped", "circle", 3, seed=8),
        canvas.render("striped", "circle", 4, seed=7),
        canvas.render("barred", "circle", 3, seed=7),
        canvas.render("striped", "square", 3, seed=7),
    ):
        assert not np.array_equal(a.image, other.image)


def test_render_does_not_depend_on_call_order():
    first = canvas.render("dotted", "ring", 5)
    canvas.render_batch([("grid", "bar")] * 3, [0, 1, 2])
    np.random.seed(123)  # global numpy state must not matter
    again = canvas.render("dotted", "ring", 5)
    assert np.array_equal(first.image, again.image)


@pytest.mark.parametrize("size", [16, 32])
def test_shapes_dtypes_and_ranges(size):
    for style in canvas.ALL_STYLES:
        for obj in ("circle", "hourglass", canvas.NEUTRAL_OBJECT):
            s = canvas.render(style, obj, 0, size=size)
            assert s.image.shape == (3, size, size) and s.image.dtype == np.float32
            assert s.mask.shape == (size, size) and s.mask.dtype == np.float32
            assert s.image.min() >= -1.0 and s.image.max() <= 1.0
            assert s.mask.min() >= 0.0 and s.mask.max() <= 1.0


def test_render_batch_matches_render():
    pairs = [("striped", "circle"), ("wavy", "arrow"), ("plain", "none")]
    images, masks = canvas.render_batch(pairs, [0, 4, 2], seed=3)
    assert images.shape == (3, 3, 16, 16) and masks.shape == (3, 16, 16)
    for k, ((style, obj), i) in enumerate(zip(pairs, [0, 4, 2], strict=True)):
        one = canvas.render(style, obj, i, seed=3)
        assert np.array_equal(images[k], one.image) and np.array_equal(masks[k], one.mask)
    with pytest.raises(ValueError):
        canvas.render_batch(pairs, [0, 1])


def test_masks_zero_for_none_and_nonempty_for_objects():
    for style in ("striped", "plain", "speckled"):
        for i in range(3):
            assert canvas.render(style, canvas.NEUTRAL_OBJECT, i).mask.sum() == 0.0
    for obj in canvas.OBJECTS:
        for i in range(3):
            mask = canvas.render("solid", obj, i).mask
            assert mask.sum() > 8.0, obj  # at least ~8 pixels covered
            assert (mask == 1.0).any(), obj  # a fully covered interior
            assert mask.sum() < 0.8 * mask.size, obj  # and background left around it
            # the object lies inside the frame: the border rows/columns are (almost) uncovered
            border = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
            assert border.sum() < 2.0, obj


def test_object_filled_with_one_colour():
    for style in ("striped", "checkered", "gradient"):
        s = canvas.render(style, "square", 1)
        inside = s.image[:, s.mask == 1.0]
        assert inside.shape[1] > 4
        assert np.allclose(inside, inside[:, :1], atol=1e-6)


def test_objects_differ_in_shape_not_only_colour():
    masks = {obj: canvas.render("solid", obj, 0).mask for obj in canvas.OBJECTS}
    names = list(masks)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not np.array_equal(masks[a], masks[b]), (a, b)


def test_names_are_single_lowercase_words_distinct_across_domains():
    styles, objects = set(canvas.ALL_STYLES), set(canvas.ALL_OBJECTS)
    assert len(styles) == len(canvas.ALL_STYLES) and len(objects) == len(canvas.ALL_OBJECTS)
    assert not styles & objects
    generic = {canvas.GENERIC_STYLE, canvas.GENERIC_OBJECT}
    assert not generic & (styles | objects)
    for name in styles | objects | generic:
        assert name.isalpha() and name == name.lower(), name
    assert canvas.NEUTRAL_STYLE in styles and canvas.NEUTRAL_OBJECT in objects
    for s in canvas.ALL_STYLES:
        assert canvas.concept_domain(s) == "style"
    for o in canvas.ALL_OBJECTS:
        assert canvas.concept_domain(o) == "object"
    with pytest.raises(KeyError):
        canvas.concept_domain("pattern")


def test_neutral_concepts_are_not_erasable():
    erasable = canvas.erasable_concepts()
    assert canvas.NEUTRAL_STYLE not in erasable and canvas.NEUTRAL_OBJECT not in erasable
    assert sorted(erasable) == sorted([*canvas.STYLES, *canvas.OBJECTS])
    assert len(erasable) == len(canvas.STYLES) + len(canvas.OBJECTS) == 21


def test_every_concept_is_one_token():
    from diffunlearn.backends.diffusers_t2i import WordTokenizer

    tok = WordTokenizer.build(canvas.vocabulary(), max_length=12)
    unk = tok.special_id("[UNK]")
    ids = set()
    for name in [*canvas.ALL_STYLES, *canvas.ALL_OBJECTS, canvas.GENERIC_STYLE, canvas.GENERIC_OBJECT]:
        got = tok.ids(name, special=False)
        assert len(got) == 1 and got[0] != unk, name
        ids.add(got[0])
    assert len(ids) == len(canvas.ALL_STYLES) + len(canvas.ALL_OBJECTS) + 2
    # every prompt template fits the context with no unknown word
    for prompt in (canvas.full_prompt("zigzag", "hourglass"), canvas.object_prompt("crescent"),
                   canvas.style_prompt("checkered")):
        full = tok.ids(prompt)
        assert unk not in full and len(full) <= tok.max_length


def test_heldout_split_is_disjoint():
    for style, obj in (("striped", "circle"), ("speckled", "cross"), ("plain", "none")):
        for i in range(5):
            train = canvas.render(style, obj, i)
            held = canvas.render(style, obj, canvas.HELDOUT_OFFSET + i)
            assert not np.array_equal(train.image, held.image), (style, obj, i)
    train = {canvas.render("grid", "ring", i).image.tobytes() for i in range(20)}
    held = {canvas.render("grid", "ring", canvas.HELDOUT_OFFSET + i).image.tobytes() for i in range(20)}
    assert len(train) == 20 and len(held) == 20 and not train & held


def test_prompt_templates():
    assert canvas.full_prompt("striped", "circle") == "an image of circle in striped style"
    assert canvas.object_prompt("circle") == "an image of circle"
    assert canvas.style_prompt("striped") == "an image in striped style"


def test_training_prompt_distribution():
    rng = np.random.default_rng(0)
    n = 4000
    counts = collections.Counter(canvas.training_prompt("wavy", "ring", rng) for _ in range(n))
    expected = {
        "": 0.1,
        canvas.full_prompt("wavy", "ring"): 0.9 * 0.6,
        canvas.object_prompt("ring"): 0.9 * 0.15,
        canvas.style_prompt("wavy"): 0.9 * 0.15,
        canvas.full_prompt(canvas.GENERIC_STYLE, "ring"): 0.9 * 0.05,
        canvas.full_prompt("wavy", canvas.GENERIC_OBJECT): 0.9 * 0.05,
    }
    assert set(counts) == set(expected)
    for prompt, p in expected.items():
        assert abs(counts[prompt] / n - p) < 0.03, (prompt, counts[prompt] / n, p)


def test_training_prompt_p_empty_and_determinism():
    rng = np.random.default_rng(1)
    prompts = [canvas.training_prompt("grid", "bar", rng, p_empty=0.0) for _ in range(500)]
    assert "" not in prompts
    a = [canvas.training_prompt("grid", "bar", np.random.default_rng(5)) for _ in range(3)]
    assert len(set(a)) == 1


def test_vocabulary_words_unique_and_cover_prompts():
    vocab = canvas.vocabulary()
    assert len(vocab) == len(set(vocab))
    words = set(vocab)
    for style in canvas.ALL_STYLES:
        for obj in canvas.ALL_OBJECTS:
            assert set(canvas.full_prompt(style, obj).split()) <= words
