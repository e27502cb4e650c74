"""Image sources of concept sets (data/images.py): canvas, folders, cached generations."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from diffunlearn.data import canvas
from diffunlearn.data.concepts import ConceptSet, ConceptSetError, Item
from diffunlearn.data.images import HELDOUT_OFFSET, CanvasSource, FolderSource, GeneratedSource


def _png(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def test_canvas_source_renders_the_canvas():
    cset = ConceptSet.builtin("canvas")
    item = cset.items()[5]
    got = CanvasSource(seed=3).images([item, item], [0, HELDOUT_OFFSET], 16)
    want = canvas.render_batch([(item.label("style"), item.label("object"))] * 2, [0, HELDOUT_OFFSET], seed=3)[0]
    np.testing.assert_array_equal(got, want)


def test_folder_layouts_and_held_out_split(tmp_path):
    cset = ConceptSet.free_text(["Van Gogh"], ["Monet"], "style")
    for k, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        _png(tmp_path / "per" / "Van Gogh" / f"{k}.png", colour)
    source = FolderSource(tmp_path / "per", "per-concept", cset)
    item = cset.alone_items("Van Gogh")[0]
    first, held = source.images([item, item], [0, HELDOUT_OFFSET], 4)
    assert first.shape == (3, 4, 4) and first[0].mean() == pytest.approx(1.0) and first[2].mean() == -1.0
    assert held[2].mean() == pytest.approx(1.0)  # held-out indices count from the end of the list
    with pytest.raises(ConceptSetError, match="no images for Monet"):
        source.images(cset.alone_items("Monet"), [0], 4)

    canvas_set = ConceptSet.builtin("canvas")
    _png(tmp_path / "uc" / "dotted" / "circle" / "1.jpg", (10, 20, 30))
    uc = FolderSource(tmp_path / "uc", "unlearncanvas", canvas_set)
    pair = Item((("style", "dotted"), ("object", "circle")), canvas_set.combined_templates[0])
    assert uc.images([pair], [0], 8).shape == (1, 3, 8, 8)

    _png(tmp_path / "hf" / "a.png", (255, 255, 255))
    _png(tmp_path / "hf" / "b.png", (0, 0, 0))
    (tmp_path / "hf" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "text": "a painting by Van Gogh"}) + "\n"
        + json.dumps({"file_name": "b.png", "text": "a painting by Monet"}) + "\n")
    hf = FolderSource(tmp_path / "hf", "imagefolder", cset)
    assert hf.images([item], [0], 4)[0].mean() == pytest.approx(1.0)

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metadata.jsonl").write_text("{not json\n")
    with pytest.raises(ConceptSetError, match="malformed line 1"):
        FolderSource(tmp_path / "bad", "imagefolder", cset).images([item], [0], 4)


def test_generated_source_caches_by_prompt_and_seed(tmp_path):
    cset = ConceptSet.free_text(["Van Gogh"], None, "style")
    calls = []

    def sampler(prompts, seeds):
        calls.append(list(zip(prompts, seeds, strict=True)))
        return np.stack([np.full((3, 4, 4), s / 100, np.float32) for s in seeds])

    items = cset.alone_items("Van Gogh")[:2]
    source = GeneratedSource(cset, sampler, "hash", {"steps": 2}, tmp_path)
    first = source.images(items, [1, 2], 4)
    again = GeneratedSource(cset, sampler, "hash", {"steps": 2}, tmp_path).images(items, [1, 2], 4)
    np.testing.assert_array_equal(first, again)
    assert len(calls) == 1 and [s for _, s in calls[0]] == [1, 2]
    GeneratedSource(cset, sampler, "other-model", {"steps": 2}, tmp_path).images(items[:1], [1], 4)
    assert len(calls) == 2  # another model never reads this model's images
