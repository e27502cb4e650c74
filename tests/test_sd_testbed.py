"""The Stable Diffusion-layout testbed: CLIP tokenizer, AutoencoderKL latents, SD folder layout."""

from __future__ import annotations

import json

import torch

from diffunlearn.data import canvas

# ---- tokenizer ---------------------------------------------------------------------------------


def test_bytes_to_unicode_is_clips_map():
    """Expected values from openai/CLIP simple_tokenizer.bytes_to_unicode worked out by hand:
    printable bytes map to themselves, the first unprintable byte (0) to chr(256), space (32)
    to chr(256 + 32) = 'Ġ', and the map is a bijection onto 256 characters."""
    from diffunlearn.backends.sd_testbed import bytes_to_unicode

    table = bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord("a")] == "a" and table[ord("!")] == "!" and table[ord("ÿ")] == "ÿ"
    assert table[0] == chr(256) and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"
    assert list(table)[:3] == [ord("!"), ord('"'), ord("#")]  # CLIP's vocabulary starts '!', '"', '#'


def test_clip_tokenizer_files_have_clips_layout(clip_tokenizer_dir):
    from diffunlearn.backends.sd_testbed import BOS, EOS, bytes_to_unicode

    vocab = json.loads((clip_tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    merges = (clip_tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    symbols = list(bytes_to_unicode().values())
    assert merges[0] == "#version: 0.2"
    assert len(vocab) == 1280  # the recipe's vocab_size: 512 byte symbols + 766 merges + 2 specials
    assert [vocab[s] for s in symbols[:3]] == [0, 1, 2] and vocab["a</w>"] == 256 + symbols.index("a")
    assert vocab[BOS] == len(vocab) - 2 and vocab[EOS] == len(vocab) - 1  # as CLIP: 49406, 49407
    # every merge's result is a token, in merge order after the byte symbols
    first, second = merges[1].split(" ")
    assert vocab[first + second] == 512
    assert all("".join(m.split(" ")) in vocab for m in merges[1:])


def test_clip_tokenizer_loads_with_transformers_and_agrees_with_the_builder(clip_tokenizer_dir):
    """transformers.CLIPTokenizer reads the folder and tokenizes exactly as the `tokenizers`
    pipeline the vocabulary was learned with (CLIP's normalizer, pattern, `</w>` and specials)."""
    from transformers import CLIPTokenizer

    from diffunlearn.backends.sd_testbed import BOS, EOS, reference_tokenizer, tokenizer_corpus

    hf = CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir), local_files_only=True)
    reference = reference_tokenizer(clip_tokenizer_dir)
    prompts = [*tokenizer_corpus(), "Van Gogh", "A photo of a  PERSON, in art-style!", "nudity 1889", ""]
    for prompt in prompts:
        assert hf(prompt)["input_ids"] == reference.encode(prompt).ids, prompt
    ids = hf("an image of circle in dotted style")["input_ids"]
    assert hf.convert_ids_to_tokens(ids) == [BOS, "an</w>", "image</w>", "of</w>", "circle</w>", "in</w>",
                                             "dotted</w>", "style</w>", EOS]
    assert hf.model_max_length == 16 and hf.pad_token == EOS


def test_clip_tokenizer_is_deterministic(clip_tokenizer_dir, tmp_path):
    from diffunlearn.backends.sd_testbed import build_clip_tokenizer

    again = build_clip_tokenizer(tmp_path / "again", model_max_length=16)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (again / name).read_bytes() == (clip_tokenizer_dir / name).read_bytes(), name


def test_some_concepts_are_several_tokens_and_every_prompt_fits(clip_tokenizer_dir):
    """Long concept names split (as "Van Gogh" does in CLIP), in both domains; token positions
    find every piece of them in a prompt; the longest canvas prompt fits the context."""
    from diffunlearn.backends.diffusers_t2i import HFTokenizer
    from diffunlearn.backends.sd_testbed import multi_token_concepts

    tokenizer = HFTokenizer(clip_tokenizer_dir)
    split = multi_token_concepts(tokenizer)
    assert {"checkered", "hourglass"} <= set(split) and "dotted" not in split
    assert any(canvas.concept_domain(c) == "style" for c in split)
    assert any(canvas.concept_domain(c) == "object" for c in split)
    assert all("".join(p).replace("</w>", "") == c for c, p in split.items())
    longest = max((canvas.full_prompt(s, o) for s in canvas.ALL_STYLES for o in canvas.ALL_OBJECTS),
                  key=lambda p: len(tokenizer.ids(p)))
    assert len(tokenizer.ids(longest)) <= tokenizer.max_length


# ---- model folder --------------------------------------------------------------------------------


def test_tiny_sd_folder_is_a_stable_diffusion_folder(tiny_sd_model_dir):
    index = json.loads((tiny_sd_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["vae"] == ["diffusers", "AutoencoderKL"] and index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_sd_model_dir / sub).is_dir(), sub
    meta = json.loads((tiny_sd_model_dir / "diffunlearn.json").read_text())
    assert meta["kind"] == "testbed-sd" and meta["image_size"] == 16 and meta["latent"] is True


def test_stable_diffusion_pipeline_loads_the_folder_untouched(tiny_sd_model_dir, one_thread):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_model_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("an image of circle in dotted style", num_inference_steps=2, guidance_scale=3.0,
               generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, 16, 16, 3)  # the UNet's 8x8 latents times the VAE's factor 2


def test_t2imodel_samples_decoded_images(tiny_sd_model_dir, one_thread):
    from diffunlearn.backends.diffusers_t2i import HFTokenizer, T2IModel

    model = T2IModel.from_pretrained(tiny_sd_model_dir)
    assert isinstance(model.tokenizer, HFTokenizer) and model.vae is not None
    assert model.image_shape == (4, 8, 8) and model.pixel_size == 16
    images = model.sample(["an image of circle in dotted style", ""], [0, 1], steps=2)
    assert images.shape == (2, 3, 16, 16)
    assert images.min() >= -1 and images.max() <= 1
    latents = model.sample(["an image of circle"], [0], steps=2, return_model_space=True)
    assert latents.shape == (1, 4, 8, 8)
    # a multi-token concept: its token positions are every piece, in order
    prompt = canvas.full_prompt("checkered", "circle")
    positions = model.token_positions(prompt, "checkered")
    assert len(positions) == 2 and positions[1] == positions[0] + 1


def test_resaving_keeps_the_content_hash(tiny_sd_model_dir, tmp_path, one_thread):
    from diffunlearn.backends.diffusers_t2i import T2IModel

    model = T2IModel.from_pretrained(tiny_sd_model_dir)
    model.save_pretrained(tmp_path / "again")
    assert T2IModel.from_pretrained(tmp_path / "again").content_hash() == model.content_hash()


def test_to_model_space_draws_its_posterior_sample_from_the_generator(tiny_sd_model_dir, one_thread):
    """A resumed run must see the same latents: with a seeded generator the encoding is
    reproducible whatever the global RNG does, and it is mean + std * noise of the VAE."""
    from diffunlearn.backends.diffusers_t2i import T2IModel

    model = T2IModel.from_pretrained(tiny_sd_model_dir)
    images = torch.from_numpy(canvas.render_batch([("dotted", "circle")], [0])[0])
    a = model.to_model_space(images, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(123)
    b = model.to_model_space(images, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    posterior = model.vae.encode(images).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(3))
    expected = (posterior.mean + posterior.std * noise) * model.vae.config.scaling_factor
    assert torch.allclose(a, expected, atol=1e-6)


# ---- pretraining -----------------------------------------------------------------------------------


def test_pretrain_testbed_sd_runs_every_stage_and_resumes(tmp_path, one_thread):
    """A few steps of each stage through the committed recipe's code path: the VAE (its
    scaling factor set to 1/std of the latents), the tokenizer, the UNet on cached latents;
    a second call reuses the VAE stage and the finished UNet checkpoint."""
    from conftest import TINY_SD_ARCH, TINY_VAE_ARCH
    from diffusers import StableDiffusionPipeline

    from diffunlearn.config import CONFIG_DIR, PretrainSDModelConfig, load_yaml
    from diffunlearn.pretrain_sd import pretrain_testbed_sd

    cfg = PretrainSDModelConfig(**load_yaml(CONFIG_DIR / "pretrain-model-sd.yaml"))
    cfg.tokenizer.context_length = 16
    cfg.vae = cfg.vae.model_copy(update={"arch": cfg.vae.arch.model_copy(update=TINY_VAE_ARCH), "steps": 3,
                                         "images_per_pair": 1, "heldout_per_pair": 1, "batch_size": 8})
    cfg.arch = cfg.arch.model_copy(update=TINY_SD_ARCH)
    cfg.data.images_per_pair = 1
    cfg.train = cfg.train.model_copy(update={"steps": 3, "batch_size": 4, "warmup": 1})
    model = pretrain_testbed_sd(cfg, tmp_path, progress=False)
    meta = json.loads((tmp_path / "model" / "diffunlearn.json").read_text())
    assert meta["kind"] == "testbed-sd" and meta["trained_steps"] == 3
    vae = meta["vae"]
    assert 0 <= vae["heldout_style_accuracy"] <= 1 and vae["scaling_factor"] > 0
    assert model.vae.config.scaling_factor == vae["scaling_factor"]
    assert {"checkered", "hourglass"} <= set(meta["multi_token_concepts"])
    for record in ("pretrain-config.yaml", "pretrain-curves.csv", "vae-curves.csv"):
        assert (tmp_path / record).exists(), record
    StableDiffusionPipeline.from_pretrained(str(tmp_path / "model"), local_files_only=True)
    weights = (tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    again = pretrain_testbed_sd(cfg, tmp_path, progress=False)
    assert again.meta["resumed_from_step"] == 3  # nothing left to train
    assert (tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == weights


def test_erase_and_attack_end_to_end_on_a_latent_model(tiny_sd_model_dir, tiny_evaluator_dir, tmp_path, one_thread):
    """erase -> evaluate (on decoded 16x16 images) -> attack with generated data, on the SD layout."""
    from conftest import TINY_EVAL

    import diffunlearn

    evaluation = [f"eval.evaluator=canvas:{tiny_evaluator_dir}", *TINY_EVAL]
    erased = diffunlearn.erase("core", ["checkered"], model=tiny_sd_model_dir, out=tmp_path / "erase",
                               overrides=["method.epochs=null", "method.steps=2", "method.batch_size=2",
                                          "task.images_per_prompt=1", *evaluation], progress=False)
    assert erased.metrics["method"] == "core"
    for phase in ("before", "after"):
        assert 0 <= erased.metrics[phase]["UA"] <= 100 and erased.metrics[phase]["FID"] is not None
    attacked = diffunlearn.attack("relearn", tmp_path / "erase", progress=False,
                                  overrides=["attack.steps=2", "attack.batch_size=2", "attack.data=generated",
                                             "attack.generation_steps=2", *evaluation])
    assert attacked.metrics["summary"]["steps"] == 2 and attacked.metrics["summary"]["moved"] > 0
