"""Training the shipped testbed: the text-to-image model and the evaluator classifiers.

Both recipes run on the shared loop (engine/loop.py) from the committed configs in
`configs/pretrain-*.yaml`; `retrain` (the gold standard) reuses `pretrain_model` with the
forget concepts excluded from the data.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffunlearn.backends.diffusers_t2i import T2IModel, build_testbed
from diffunlearn.config import PretrainEvaluatorConfig, PretrainModelConfig, dump_yaml
from diffunlearn.data import canvas
from diffunlearn.engine.loop import LoopConfig, run_loop, write_curves
from diffunlearn.metrics.classifier import ConceptClassifier, Evaluators


def render_pool(pairs: list[tuple[str, str]], per_pair: int, seed: int, offset: int = 0,
                size: int = 16) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """Images for `per_pair` indices (from `offset`) of each pair, and each image's pair."""
    flat_pairs = [p for p in pairs for _ in range(per_pair)]
    indices = [offset + i for _ in pairs for i in range(per_pair)]
    images, _ = canvas.render_batch(flat_pairs, indices, seed=seed, size=size)
    return torch.from_numpy(images), flat_pairs


def encode_pool(model: T2IModel, images: torch.Tensor, seed: int, batch_size: int = 1024) -> torch.Tensor:
    """The training pool in the space the UNet denoises, computed once before training: scaled
    VAE latents for a latent model (one seeded posterior sample per image, instead of a VAE
    encoder pass at every step), the images themselves in pixel space."""
    if model.vae is None:
        return images
    generator = torch.Generator().manual_seed(seed)
    return torch.cat([model.to_model_space(images[i : i + batch_size], generator=generator)
                      for i in range(0, len(images), batch_size)])


def min_snr_weights(alphas_cumprod: torch.Tensor, gamma: float | None,
                    prediction_type: str = "epsilon") -> torch.Tensor:
    """Per-timestep weights of the loss in the model's prediction space (Min-SNR-gamma, Hang et
    al. 2023): min(SNR, gamma) on the x0 loss, so min(SNR, gamma) / SNR on the epsilon loss (SNR
    times the x0 loss) and min(SNR, gamma) / (SNR + 1) on the v loss ((SNR + 1) times the x0 loss).

    They damp the low-noise timesteps, whose fine texture detail otherwise dominates the
    gradient, so the global structure that decides an object's shape is learned sooner.
    """
    if gamma is None:
        return torch.ones_like(alphas_cumprod)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    if prediction_type == "sample":
        return clipped
    return clipped / snr


def training_pairs(exclude: list[str]) -> list[tuple[str, str]]:
    return [(s, o) for s in canvas.ALL_STYLES for o in canvas.ALL_OBJECTS if s not in exclude and o not in exclude]


def pretrain_model(cfg: PretrainModelConfig, out: Path, threads: int | None = None,
                   progress: bool = True, like: T2IModel | None = None,
                   train_text_encoder: bool | None = None, fresh: T2IModel | None = None) -> T2IModel:
    """Train the testbed model; resumable from `out/checkpoint`.

    `like`: train a fresh UNet of that model's architecture instead of `cfg.arch` (retrain),
    keeping `like`'s text encoder frozen, as retraining Stable Diffusion keeps its CLIP text
    encoder. `fresh`: train this newly built model instead of `cfg.arch` (testbed-sd,
    pretrain_sd.py). `train_text_encoder` (default: only when building a new model) trains a
    fresh text encoder jointly with the UNet, as the shipped models were made.
    """
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.train.seed)
    if train_text_encoder is None:
        train_text_encoder = like is None
    if like is not None:
        model = like.reinitialized(cfg.train.seed, keep_text_encoder=not train_text_encoder)
    elif fresh is not None:
        model = fresh
    else:
        model = build_testbed(canvas.vocabulary(), cfg.arch.model_dump())
    pairs = training_pairs(cfg.data.exclude)
    pool, pool_pairs = render_pool(pairs, cfg.data.images_per_pair, cfg.data.seed, size=model.pixel_size)
    pool = encode_pool(model, pool, cfg.data.seed)
    text_encoder, unet = model.text_encoder, model.unet
    text_encoder.requires_grad_(train_text_encoder).train(train_text_encoder)
    unet.train()
    params = {f"unet.{n}": p for n, p in unet.named_parameters()}
    if train_text_encoder:
        params |= {f"text_encoder.{n}": p for n, p in text_encoder.named_parameters()}
    tokenized: dict[str, torch.Tensor] = {}
    snr_weights = min_snr_weights(model.alphas_cumprod, cfg.train.min_snr_gamma, model.prediction_type)

    def tokens(prompts: list[str]) -> torch.Tensor:
        for p in prompts:
            if p not in tokenized:
                tokenized[p] = model.tokenizer([p])[0]
        return torch.stack([tokenized[p] for p in prompts])

    def step(k: int, gen: torch.Generator) -> dict[str, float]:
        idx = torch.randint(0, len(pool), (cfg.train.batch_size,), generator=gen)
        rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
        prompts = [canvas.training_prompt(*pool_pairs[i], rng, cfg.data.p_empty) for i in idx.tolist()]
        x0 = pool[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, model.num_train_timesteps, (len(idx),), generator=gen)
        if not train_text_encoder:
            cond = model.encode(prompts)  # the frozen encoder's float32 output, as sampling sees it
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.bf16):
            if train_text_encoder:
                cond = text_encoder(tokens(prompts))[0]
            pred = unet(model.add_noise(x0, noise, t), t, encoder_hidden_states=cond).sample
        per_sample = (pred.float() - model.noise_target(x0, noise, t)).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * snr_weights[t]).mean()
        loss.backward()
        return {"loss": loss.item()}

    t = cfg.train
    loop_cfg = LoopConfig(steps=t.steps, lr=t.lr, optimizer=t.optimizer, weight_decay=t.weight_decay,
                          grad_clip=t.grad_clip, warmup=t.warmup, schedule=t.schedule, ema_decay=t.ema_decay,
                          seed=t.seed, log_every=50, checkpoint_every=t.checkpoint_every, progress=progress,
                          description="pretrain model")
    out.mkdir(parents=True, exist_ok=True)
    (out / "pretrain-config.yaml").write_text(dump_yaml(cfg.model_dump()))
    result = run_loop(params, step, loop_cfg, checkpoint_dir=out / "checkpoint")
    with torch.no_grad():  # ship the EMA weights
        for name, value in result.ema.items():
            params[name].copy_(value)
    text_encoder.requires_grad_(False).eval()
    unet.eval()
    write_curves(out / "pretrain-curves.csv", result.curves)
    model.meta.update(trained_steps=t.steps, train_seconds=round(result.seconds, 1),
                      resumed_from_step=result.resumed_from, excluded=list(cfg.data.exclude))
    model.save_pretrained(out / "model")
    return model


def pretrain_evaluators(cfg: PretrainEvaluatorConfig, out: Path, threads: int | None = None,
                        progress: bool = True) -> tuple[Evaluators, dict[str, float]]:
    """Train the style and object classifiers on real canvas images; report held-out accuracy."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    pairs = training_pairs([])
    pool, pool_pairs = render_pool(pairs, cfg.images_per_pair, cfg.seed)
    held, held_pairs = render_pool(pairs, cfg.heldout_per_pair, cfg.seed, offset=canvas.HELDOUT_OFFSET)
    evaluators = Evaluators(ConceptClassifier(len(canvas.ALL_STYLES), cfg.width, cfg.feature_dim),
                            ConceptClassifier(len(canvas.ALL_OBJECTS), cfg.width, cfg.feature_dim))
    labels = {
        "style": torch.tensor([canvas.ALL_STYLES.index(s) for s, _ in pool_pairs]),
        "object": torch.tensor([canvas.ALL_OBJECTS.index(o) for _, o in pool_pairs]),
    }
    params = {f"style.{n}": p for n, p in evaluators.style.named_parameters()}
    params |= {f"object.{n}": p for n, p in evaluators.object.named_parameters()}

    def step(k: int, gen: torch.Generator) -> dict[str, float]:
        idx = torch.randint(0, len(pool), (cfg.batch_size,), generator=gen)
        # noise and brightness jitter: generated images are never exactly on the real manifold
        x = pool[idx] + cfg.noise_std * torch.rand(len(idx), 1, 1, 1, generator=gen) * torch.randn(
            pool[idx].shape, generator=gen)
        x = x + 0.1 * (torch.rand(len(idx), 1, 1, 1, generator=gen) - 0.5)
        logs = {}
        for domain in ("style", "object"):
            model, _ = evaluators.for_domain(domain)
            loss = F.cross_entropy(model(x), labels[domain][idx])
            loss.backward()
            logs[f"loss_{domain}"] = loss.item()
        logs["loss"] = logs["loss_style"] + logs["loss_object"]
        return logs

    for model in (evaluators.style, evaluators.object):
        model.train()
    loop_cfg = LoopConfig(steps=cfg.steps, lr=cfg.lr, optimizer="adamw", weight_decay=1e-4, schedule="cosine",
                          warmup=50, seed=cfg.seed, log_every=50, checkpoint_every=500, progress=progress,
                          description="pretrain evaluators")
    result = run_loop(params, step, loop_cfg, checkpoint_dir=out / "checkpoint")
    for model in (evaluators.style, evaluators.object):
        model.eval().requires_grad_(False)
    figures = {
        "heldout_style_accuracy": _accuracy(evaluators, held, [s for s, _ in held_pairs], "style"),
        "heldout_object_accuracy": _accuracy(evaluators, held, [o for _, o in held_pairs], "object"),
        "train_seconds": round(result.seconds, 1),
    }
    evaluators.save(out / "evaluators", {**cfg.model_dump(), **figures})
    write_curves(out / "evaluator-curves.csv", result.curves)
    return evaluators, figures


def _accuracy(evaluators: Evaluators, images: torch.Tensor, names: list[str], domain: str) -> float:
    from diffunlearn.metrics.classifier import accuracy

    return round(accuracy(evaluators, images, names, domain), 4)


def install_assets(model_dir: Path | None, evaluator_dir: Path | None, assets: Path,
                   model_name: str = "testbed") -> None:
    """Copy trained artefacts into the package's assets (the model as `model_name`: testbed or
    testbed-sd) and record their hashes."""
    from diffunlearn.backends.model_dir import hash_files

    manifest_path = assets / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    for name, src in ((model_name, model_dir), ("evaluators", evaluator_dir)):
        if src is None:
            continue
        dst = assets / name
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoint", "*.tmp"))
        for record in ("pretrain-config.yaml", "pretrain-curves.csv", "evaluator-curves.csv", "vae-curves.csv"):
            if (src.parent / record).exists():  # the recipe and curves that produced it
                shutil.copy(src.parent / record, dst / record)
        files = sorted(p for p in dst.rglob("*") if p.is_file())
        manifest[name] = {str(p.relative_to(dst)): hash_files([p]) for p in files}
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True))


def generation_quality(model: T2IModel, evaluators: Evaluators, guidance: float | None = None, per_pair: int = 2,
                       seed: int = 7000) -> dict[str, tuple[float, dict[str, float]]]:
    """Share of full-prompt generations classified as the prompted concept, per domain:
    (mean, per-concept) over every (style, object) pair with `per_pair` fixed seeds each."""
    pairs = [(s, o) for s in canvas.ALL_STYLES for o in canvas.ALL_OBJECTS]
    prompts = [canvas.full_prompt(s, o) for s, o in pairs for _ in range(per_pair)]
    images = model.sample(prompts, [seed + i for i in range(len(prompts))], guidance=guidance)
    out = {}
    for domain, index in (("style", 0), ("object", 1)):
        _, names = evaluators.for_domain(domain)
        pred = evaluators.probabilities(images, domain).argmax(-1)
        target = torch.tensor([names.index(p[index]) for p in pairs for _ in range(per_pair)])
        hits = (pred == target).float()
        out[domain] = (float(hits.mean()), {n: float(hits[target == names.index(n)].mean()) for n in names})
    return out
