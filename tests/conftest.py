"""Tiny seeded models built in fixtures (like diffusers' get_dummy_components)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

TINY_ARCH = {
    "image_size": 16, "channels": [16, 32], "layers_per_block": 1, "heads": 1, "norm_groups": 8,
    "text_dim": 32, "text_layers": 1, "max_length": 12, "guidance_scale": 3.0,
}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Task caches go to a per-session temporary folder, never the user's cache."""
    monkeypatch.setenv("DIFFUNLEARN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and leave the other core to the rest of the suite."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_tiny_model(seed: int = 0):
    import torch

    from diffunlearn.backends.diffusers_t2i import build_testbed
    from diffunlearn.data import canvas

    torch.manual_seed(seed)
    return build_testbed(canvas.vocabulary(), TINY_ARCH)


@pytest.fixture
def tiny_model():
    return build_tiny_model()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny model folder, usable anywhere a --model path is accepted."""
    path = tmp_path_factory.mktemp("tiny") / "model"
    model = build_tiny_model()
    model.save_pretrained(path)
    return path


def build_tiny_evaluators(seed: int = 0):
    import torch

    from diffunlearn.data import canvas
    from diffunlearn.metrics.classifier import ConceptClassifier, Evaluators

    torch.manual_seed(seed)
    return Evaluators(ConceptClassifier(len(canvas.ALL_STYLES), width=8, feature_dim=8),
                      ConceptClassifier(len(canvas.ALL_OBJECTS), width=8, feature_dim=8))


@pytest.fixture
def tiny_evaluators():
    return build_tiny_evaluators()


@pytest.fixture
def tiny_canvas_evaluator(tiny_evaluators):
    """The tiny CNNs behind the `canvas` evaluator protocol, for the canvas concept set."""
    from diffunlearn.data.concepts import ConceptSet
    from diffunlearn.metrics.evaluators.canvas import CanvasEvaluator

    return CanvasEvaluator(ConceptSet.builtin("canvas"), cnns=tiny_evaluators)


# evaluation overrides small enough for a tiny model end to end (erase and attack tests)
TINY_EVAL = ["eval.images_per_prompt=1", "eval.partial_images=1", "eval.steps=2", "eval.bootstrap=10",
             "eval.fid_reference_per_pair=1"]


@pytest.fixture(scope="session")
def tiny_evaluator_dir(tmp_path_factory):
    """Tiny evaluators saved as a folder, for `eval.evaluator=canvas:DIR`."""
    folder = tmp_path_factory.mktemp("evaluators")
    build_tiny_evaluators().save(folder, {"width": 8, "feature_dim": 8})
    return folder


class CanvasStandIn:
    """A stand-in text-to-image model for evaluation tests: it renders real canvas images
    (data/canvas.py) of the concepts its prompt names, with seed-dependent confusions, so that
    trained evaluators give non-degenerate UA/IRA/CRA/AR figures without any sampling.

    Seed % 5 == 0 draws the next style, seed % 7 == 0 the next object (an unnamed domain is
    neutral); the image index is the seed, so every image is a pure function of (prompt, seed).
    The guidance each batch was sampled with is recorded in `calls`.
    """

    guidance_scale = 3.0
    image_shape = (3, 16, 16)

    def __init__(self):
        self.calls: list[tuple[int, float | None]] = []

    def sample(self, prompts, seeds, steps=None, guidance=None, batch_size=128, **_):
        import torch

        from diffunlearn.data import canvas

        self.calls.append((len(prompts), guidance))
        pairs = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            words = prompt.split()
            style = next((w for w in words if w in canvas.ALL_STYLES), canvas.NEUTRAL_STYLE)
            obj = next((w for w in words if w in canvas.ALL_OBJECTS), canvas.NEUTRAL_OBJECT)
            if seed % 5 == 0:
                style = canvas.ALL_STYLES[(canvas.ALL_STYLES.index(style) + 1) % len(canvas.ALL_STYLES)]
            if seed % 7 == 0:
                obj = canvas.ALL_OBJECTS[(canvas.ALL_OBJECTS.index(obj) + 1) % len(canvas.ALL_OBJECTS)]
            pairs.append((style, obj))
        images = canvas.render_batch(pairs, [int(s) % 100_000 for s in seeds], seed=7, size=16)[0]
        return torch.from_numpy(images)
