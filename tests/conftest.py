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


# ---- the Stable Diffusion-layout testbed at toy size (untrained) ----------------------------------

TINY_SD_ARCH = {
    "image_size": 16, "channels": [16, 32], "attention_from": 1, "layers_per_block": 1, "heads": 1,
    "norm_groups": 8, "text_dim": 32, "text_layers": 1, "beta_schedule": "squaredcos_cap_v2", "guidance_scale": 3.0,
}
TINY_VAE_ARCH = {"image_size": 16, "channels": [8, 16], "layers_per_block": 1, "latent_channels": 4, "norm_groups": 8,
                 "mid_attention": True}


@pytest.fixture(scope="session")
def clip_tokenizer_dir(tmp_path_factory):
    """The testbed-sd CLIP tokenizer as the shipped recipe builds it (context 16 to keep tests fast)."""
    from diffunlearn.backends.sd_testbed import build_clip_tokenizer

    return build_clip_tokenizer(tmp_path_factory.mktemp("clip-tokenizer"), model_max_length=16)


def build_tiny_sd_model(tokenizer_dir, seed: int = 0):
    import torch

    from diffunlearn.backends.sd_testbed import build_testbed_sd, build_vae

    torch.manual_seed(seed)
    vae = build_vae(TINY_VAE_ARCH)
    vae.register_to_config(scaling_factor=0.5)
    return build_testbed_sd(tokenizer_dir, vae, TINY_SD_ARCH)


@pytest.fixture(scope="session")
def tiny_sd_model_dir(tmp_path_factory, clip_tokenizer_dir):
    """A saved tiny testbed-sd folder (random weights), usable anywhere a --model path is accepted."""
    path = tmp_path_factory.mktemp("tiny-sd") / "model"
    build_tiny_sd_model(clip_tokenizer_dir).save_pretrained(path)
    return path


# ---- Stable Diffusion pipeline folders as users bring them (random weights, real configs) ---------

# the scheduler configs of the official SD 1.4 and SD 2.1 folders (CompVis/stable-diffusion-v1-4,
# stabilityai/stable-diffusion-2-1: scheduler/scheduler_config.json)
SD14_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
SD21_SCHEDULER = {**SD14_SCHEDULER, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}


@pytest.fixture(scope="session")
def clip_tokenizer_77_dir(tmp_path_factory, clip_tokenizer_dir):
    """The test CLIP vocabulary with CLIP's real 77-token context."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp("clip-tokenizer-77") / "tokenizer"
    shutil.copytree(clip_tokenizer_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 77}, indent=2))
    return folder


def build_sd_pipeline(path, tokenizer_dir, scheduler_config: dict, seed: int = 0, linear_projection: bool = False):
    """A tiny StableDiffusionPipeline saved by diffusers itself, as a user's SD 1.x / 2.x folder is:
    model_index.json, unet/ vae/ text_encoder/ tokenizer/ scheduler/ (the given config, any class),
    no diffunlearn.json; CLIP context 77. `linear_projection`: SD 2.x's transformer projections."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8, use_linear_projection=linear_projection)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=8, sample_size=16)
    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def sd_pipeline_dir(tmp_path_factory, clip_tokenizer_77_dir):
    """An SD 1.x-style folder (epsilon, SD 1.4's PNDM scheduler config), random weights."""
    return build_sd_pipeline(tmp_path_factory.mktemp("sd14") / "model", clip_tokenizer_77_dir, SD14_SCHEDULER)


@pytest.fixture(scope="session")
def sd_v_pipeline_dir(tmp_path_factory, clip_tokenizer_77_dir):
    """An SD 2.x-style folder (v-prediction, SD 2.1's DDIM scheduler config, linear projections)."""
    return build_sd_pipeline(tmp_path_factory.mktemp("sd21") / "model", clip_tokenizer_77_dir, SD21_SCHEDULER,
                             linear_projection=True)
