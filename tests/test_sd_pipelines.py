"""Stable Diffusion folders as users bring them: any scheduler config, epsilon and v-prediction,
CLIP's 77-token context. Expected values come from the DDPM/DDIM formulas worked by hand
(scaled_linear betas, x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, v = sqrt(abar) eps - sqrt(1 - abar) x0),
never from our own implementation's output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffunlearn.objectives import Term, TermBatch, denoising_loss, term_losses


def scaled_linear_abar(beta_start: float = 0.00085, beta_end: float = 0.012, steps: int = 1000) -> np.ndarray:
    """SD's schedule by hand: betas evenly spaced in sqrt, squared; abar_t = prod_{i<=t} (1 - beta_i)."""
    betas = np.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


ABAR = scaled_linear_abar()


def alpha_sigma(t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    abar = torch.tensor(ABAR[t.numpy()], dtype=torch.float32).view(-1, *([1] * (like.dim() - 1)))
    return abar.sqrt(), (1 - abar).sqrt()


@pytest.fixture
def v_model(sd_v_pipeline_dir, one_thread):
    from diffunlearn.backends.diffusers_t2i import T2IModel

    return T2IModel.from_pretrained(sd_v_pipeline_dir)


@pytest.fixture
def eps_model(sd_pipeline_dir, one_thread):
    from diffunlearn.backends.diffusers_t2i import T2IModel

    return T2IModel.from_pretrained(sd_pipeline_dir)


def test_the_schedule_and_prediction_type_come_from_the_folders_scheduler_config(v_model, eps_model):
    assert v_model.prediction_type == "v_prediction" and eps_model.prediction_type == "epsilon"
    assert ABAR[0] == pytest.approx(1 - 0.00085)  # the first beta is beta_start
    for model in (v_model, eps_model):
        assert torch.allclose(model.alphas_cumprod.double(), torch.from_numpy(ABAR), rtol=1e-5)
        # DDIM as the folder's config states it: leading spacing, 1000 // 2 = 500 apart, steps_offset 1
        assert model.ddim_timesteps(2) == [501, 1]
        assert model.ddim_timesteps(4) == [751, 501, 251, 1]


def test_the_noise_target_is_v_for_a_v_model_and_the_noise_for_an_eps_model(v_model, eps_model):
    from diffusers import DDPMScheduler

    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 500, 999])
    alpha, sigma = alpha_sigma(t, x0)
    expected = alpha * noise - sigma * x0
    # t = 0 by hand: sqrt(1 - 0.00085) eps - sqrt(0.00085) x0
    assert torch.allclose(expected[0], (1 - 0.00085) ** 0.5 * noise[0] - 0.00085**0.5 * x0[0], atol=1e-6)
    assert torch.allclose(v_model.noise_target(x0, noise, t), expected, atol=1e-5)
    official = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert torch.allclose(v_model.noise_target(x0, noise, t), official.get_velocity(x0, noise, t), atol=1e-5)
    assert torch.equal(eps_model.noise_target(x0, noise, t), noise)


def test_eps_and_x0_invert_the_v_parametrisation(v_model):
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([10, 900])
    alpha, sigma = alpha_sigma(t, x0)
    x_t, v = alpha * x0 + sigma * noise, alpha * noise - sigma * x0
    eps, x0_back = v_model.eps_and_x0(x_t, v, t)
    assert torch.allclose(eps, noise, atol=1e-4) and torch.allclose(x0_back, x0, atol=1e-4)


def test_ddim_sampling_of_a_v_model_follows_the_formulas(v_model):
    """Two DDIM steps of SD 2.1's config by hand: t = 501 then 1, the last step to abar_0 (its
    set_alpha_to_one is false), guidance on the v outputs, x0 = sqrt(a) x - sqrt(1-a) v and
    eps = sqrt(a) v + sqrt(1-a) x."""
    prompt, guidance = "a painting in van gogh style", 5.0
    x = v_model.initial_noise([7])
    cond, uncond = v_model.encode([prompt]), v_model.encode([""])
    with torch.no_grad():
        for t, t_prev in ((501, 1), (1, None)):
            tt = torch.tensor([t])
            v_u = v_model.unet(x, tt, encoder_hidden_states=uncond).sample
            v_c = v_model.unet(x, tt, encoder_hidden_states=cond).sample
            v = v_u + guidance * (v_c - v_u)
            a = float(ABAR[t])
            a_prev = float(ABAR[t_prev] if t_prev is not None else ABAR[0])
            x0, eps = a**0.5 * x - (1 - a) ** 0.5 * v, a**0.5 * v + (1 - a) ** 0.5 * x
            x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    sampled = v_model.sample([prompt], [7], steps=2, guidance=guidance, return_model_space=True)
    assert torch.allclose(sampled, x, atol=1e-4)
    # an epsilon reading of the same outputs would land elsewhere
    assert (sampled - x).abs().max() < 1e-4 < (x0 - x).abs().max()


def _batch(model, n: int = 2, seed: int = 3) -> TermBatch:
    gen = torch.Generator().manual_seed(seed)
    shape = (n, *model.image_shape)
    return TermBatch(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen), torch.tensor([20, 700]),
                     {"forget": ["van gogh style"] * n, "empty": [""] * n, "anchor": [""] * n, "retain": [""] * n})


@pytest.mark.parametrize("target", ["gaussian", "uniform"])
def test_noise_terms_target_v_on_a_v_model(v_model, target):
    """CA-noise, SalUn's and EraseDiff's noise terms: the loss is || v_theta - v(noise) ||^2 with
    v(noise) = sqrt(abar) noise - sqrt(1 - abar) x0, the noise being the Gaussian that made x_t or
    U(0, I) drawn from the step's generator."""
    batch = _batch(v_model)
    term = Term("t", images="forget", prompt="forget", target=target)
    loss = term_losses([term], v_model, [batch], torch.Generator().manual_seed(9))["t"]
    alpha, sigma = alpha_sigma(batch.t, batch.x0)
    x_t = alpha * batch.x0 + sigma * batch.noise
    with torch.no_grad():
        pred = v_model.unet(x_t, batch.t, encoder_hidden_states=v_model.encode(batch.prompts["forget"])).sample
    noise = batch.noise if target == "gaussian" else torch.rand(pred.shape, generator=torch.Generator().manual_seed(9))
    expected = (pred - (alpha * noise - sigma * batch.x0)).pow(2).mean()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-4)


@pytest.mark.parametrize("which", ["v", "eps"])
def test_an_exact_predictor_has_zero_denoising_loss_in_its_own_space(v_model, eps_model, which):
    """The relearning/fine-tuning loss (and through it SalUn's and Scissorhands' forget
    gradients and pretraining) scores a model that predicts exactly right in its own space at 0:
    an oracle that knows x0 and returns the true v (v model) or the true noise (eps model)."""
    model = v_model if which == "v" else eps_model
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(3, *model.image_shape, generator=gen)

    def oracle(x_t, t, cond, params=None):
        alpha, sigma = alpha_sigma(t, x_t)
        noise = (x_t - alpha * x0) / sigma
        return alpha * noise - sigma * x0 if which == "v" else noise

    model.eps = oracle
    loss = denoising_loss(model, x0, ["a"] * 3, torch.Generator().manual_seed(6))
    assert float(loss) < 1e-6


def test_the_clip_context_is_77_tokens_never_the_testbeds(v_model):
    """SD's CLIP reads 77 tokens: a concept after the 16th token (the testbed's context) is
    still in the prompt, found, and encoded."""
    assert v_model.tokenizer.max_length == 77
    assert v_model.text_encoder.config.max_position_embeddings == 77
    prompt = "a very old and quite large " * 4 + "painting by van gogh"
    positions = v_model.token_positions(prompt, "van gogh")
    assert len(positions) >= 2 and positions[0] > 16
    assert v_model.encode([prompt]).shape == (1, 77, 32)
    assert v_model.tokenizer([prompt]).shape == (1, 77)


# ---- single-file checkpoints ----------------------------------------------------------------------


@pytest.fixture
def single_file(sd_pipeline_dir, tmp_path):
    """The SD 1.x-style folder as one original-layout checkpoint, plus its configs without weights."""
    import shutil

    from ldm_checkpoint import ldm_checkpoint

    config = tmp_path / "config"
    shutil.copytree(sd_pipeline_dir, config, ignore=shutil.ignore_patterns("*.safetensors"))
    return ldm_checkpoint(sd_pipeline_dir), config


def _same_weights(folder, reference) -> None:
    from safetensors.torch import load_file

    for part in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model"):
        ours, theirs = (load_file(str(f / f"{part}.safetensors")) for f in (folder, reference))
        assert set(ours) == set(theirs), part
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), part


def test_a_single_safetensors_file_with_a_config_folder_erases_and_loads(single_file, sd_pipeline_dir, tmp_path,
                                                                          one_thread):
    """diffusers' from_single_file converts it offline (exactly: every tensor equals the folder it
    was made from), once; the erase run on it writes a model StableDiffusionPipeline loads."""
    import json

    from safetensors.torch import save_file
    from test_sd_cli import assert_pipeline_loads_our_weights, erase

    checkpoint, config = single_file
    save_file(checkpoint, str(tmp_path / "sd-v1.safetensors"))
    out = erase("esd-x", tmp_path / "sd-v1.safetensors", tmp_path / "run", f"model.config={config}")
    converted = Path(json.loads((out / "model" / "diffunlearn.json").read_text())["base"]["path"])
    _same_weights(converted, sd_pipeline_dir)
    meta = json.loads((converted / "diffunlearn.json").read_text())
    assert meta["converted_from"]["file"] == str((tmp_path / "sd-v1.safetensors").resolve())
    assert_pipeline_loads_our_weights(out / "model", converted)
    stamp = (converted / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    erase("uce", tmp_path / "sd-v1.safetensors", tmp_path / "run2", f"model.config={config}")
    assert (converted / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp  # converted once


def test_a_pickled_ckpt_is_read_only_with_weights_only(single_file, sd_pipeline_dir, tmp_path, monkeypatch):
    """A Lightning-style .ckpt ({'state_dict': ...}) is read by torch.load(weights_only=True) and
    nothing else: diffusers sees a safetensors copy."""
    from diffunlearn.runs.resolve import resolve_erase

    checkpoint, config = single_file
    torch.save({"state_dict": checkpoint, "global_step": 7}, tmp_path / "sd-v1.ckpt")
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    resolved = resolve_erase("uce", ["van gogh"], model=tmp_path / "sd-v1.ckpt",
                             overrides=[f"model.config={config}", "model.allow_pickle=true"])
    assert calls == [True]
    _same_weights(resolved.model_dir, sd_pipeline_dir)
