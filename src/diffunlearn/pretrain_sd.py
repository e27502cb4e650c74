"""Training the Stable Diffusion-layout testbed (`testbed-sd`) from `configs/pretrain-model-sd.yaml`.

Three stages, each resumable: the AutoencoderKL on canvas images (then frozen, its
`scaling_factor` set from the latents' standard deviation as Stable Diffusion's 0.18215 was),
the CLIP BPE tokenizer (deterministic, seconds), then the UNet and text encoder jointly on
the cached latents by `pretrain.pretrain_model`, the pixel testbed's own recipe code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffunlearn.backends.diffusers_t2i import T2IModel
from diffunlearn.config import PretrainSDModelConfig, PretrainVAEConfig, dump_yaml, load_yaml
from diffunlearn.data import canvas
from diffunlearn.engine.loop import LoopConfig, run_loop, write_curves
from diffunlearn.pretrain import pretrain_model, render_pool, training_pairs

VAE_FIGURES = "vae-figures.json"


def pretrain_vae(cfg: PretrainVAEConfig, out: Path, threads: int | None = None, progress: bool = True):
    """Train the autoencoder on real canvas images; resumable from `out/checkpoint`.

    Loss: mean absolute reconstruction error per pixel value plus `kl_weight` times the KL
    divergence to N(0, I) per latent value (Stable Diffusion's autoencoder: L1 + a small KL,
    there with LPIPS and a GAN term that 16x16 canvas images do not need). Returns the frozen
    VAE (in `out/vae`) and its figures (held-out reconstruction error and the evaluators'
    accuracy on reconstructions), also written to `out/vae-figures.json`.
    """
    from diffunlearn.backends.sd_testbed import build_vae

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg.arch.model_dump())
    pairs = training_pairs([])
    pool, _ = render_pool(pairs, cfg.images_per_pair, cfg.seed, size=cfg.arch.image_size)
    vae.train()
    params = dict(vae.named_parameters())

    def step(k: int, gen: torch.Generator) -> dict[str, float]:
        x = pool[torch.randint(0, len(pool), (cfg.batch_size,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        reconstruction = (vae.decode(z).sample - x).abs().mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = reconstruction + cfg.kl_weight * kl
        loss.backward()
        return {"loss": loss.item(), "l1": reconstruction.item(), "kl": kl.item()}

    loop_cfg = LoopConfig(steps=cfg.steps, lr=cfg.lr, optimizer="adamw", weight_decay=1e-4, schedule="cosine",
                          warmup=100, seed=cfg.seed, log_every=50, checkpoint_every=cfg.checkpoint_every,
                          progress=progress, description="pretrain vae")
    out.mkdir(parents=True, exist_ok=True)
    (out / "vae-config.yaml").write_text(dump_yaml(cfg.model_dump()))
    result = run_loop(params, step, loop_cfg, checkpoint_dir=out / "checkpoint")
    vae.eval().requires_grad_(False)
    write_curves(out / "vae-curves.csv", result.curves)
    latents = _latents(vae, pool)
    # Stable Diffusion scales its latents to unit variance (0.18215 = 1 / their std)
    vae.register_to_config(scaling_factor=round(1.0 / float(latents.std()), 5))
    figures = {"scaling_factor": vae.config.scaling_factor, "train_seconds": round(result.seconds, 1),
               **reconstruction_figures(vae, cfg)}
    vae.save_pretrained(str(out / "vae"), safe_serialization=True)
    (out / VAE_FIGURES).write_text(json.dumps(figures, indent=2) + "\n")
    return vae, figures


@torch.no_grad()
def _latents(vae, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    return torch.cat([vae.encode(images[i : i + batch_size]).latent_dist.mean
                      for i in range(0, len(images), batch_size)])


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Decode the posterior means: what the VAE preserves of each image."""
    return torch.cat([vae.decode(vae.encode(images[i : i + batch_size]).latent_dist.mean).sample.clamp(-1, 1)
                      for i in range(0, len(images), batch_size)])


def reconstruction_figures(vae, cfg: PretrainVAEConfig) -> dict[str, float]:
    """On held-out canvas images: mean absolute error, and the shipped evaluators' accuracy on
    the reconstructions (the UNet cannot do better than its autoencoder; the bar is >= 98%)."""
    from diffunlearn.metrics.classifier import Evaluators, accuracy

    pairs = training_pairs([])
    held, held_pairs = render_pool(pairs, cfg.heldout_per_pair, cfg.seed, offset=canvas.HELDOUT_OFFSET,
                                   size=cfg.arch.image_size)
    recon = reconstruct(vae, held)
    figures = {"heldout_l1": round(float((recon - held).abs().mean()), 5)}
    evaluators = Evaluators.load()
    for domain, index in (("style", 0), ("object", 1)):
        names = [p[index] for p in held_pairs]
        figures[f"heldout_{domain}_accuracy"] = round(accuracy(evaluators, recon, names, domain), 4)
        figures[f"heldout_{domain}_accuracy_real"] = round(accuracy(evaluators, held, names, domain), 4)
    return figures


def trained_vae(cfg: PretrainVAEConfig, out: Path, threads: int | None, progress: bool):
    """The VAE stage: reuse `out/vae` when it was trained by this same recipe, else train it."""
    from diffusers import AutoencoderKL

    recorded = out / "vae-config.yaml"
    if (out / "vae" / "config.json").exists() and (out / VAE_FIGURES).exists() and recorded.exists():
        if PretrainVAEConfig(**load_yaml(recorded)) == cfg:
            vae = AutoencoderKL.from_pretrained(str(out / "vae"), local_files_only=True).eval().requires_grad_(False)
            return vae, json.loads((out / VAE_FIGURES).read_text())
    return pretrain_vae(cfg, out, threads, progress)


def pretrain_testbed_sd(cfg: PretrainSDModelConfig, out: Path, threads: int | None = None,
                        progress: bool = True) -> T2IModel:
    """All of testbed-sd: VAE (in `out/vae-stage`), tokenizer (`out/tokenizer`), then the UNet
    and text encoder by `pretrain_model` (the model lands in `out/model`)."""
    from diffunlearn.backends.sd_testbed import build_clip_tokenizer, build_testbed_sd, multi_token_concepts

    if threads:
        torch.set_num_threads(threads)
    vae, vae_figures = trained_vae(cfg.vae, out / "vae-stage", threads, progress)
    t = cfg.tokenizer
    tokenizer_dir = build_clip_tokenizer(out / "tokenizer", t.vocab_size, t.max_token_length, t.context_length)
    torch.manual_seed(cfg.train.seed)
    fresh = build_testbed_sd(tokenizer_dir, vae, cfg.arch.model_dump())
    fresh.meta.update(vae=vae_figures, multi_token_concepts=multi_token_concepts(fresh.tokenizer))
    model = pretrain_model(cfg, out, threads, progress, fresh=fresh)
    write_curves(out / "vae-curves.csv", _read_curves(out / "vae-stage" / "vae-curves.csv"))
    return model


def _read_curves(path: Path) -> list[dict[str, float]]:
    import csv

    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
