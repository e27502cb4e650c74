"""The diffusers backend: the only module that names concrete model classes.

Serves both scales: the testbed (pixel-space UNet2DConditionModel, a tiny CLIPTextModel and
a word-level tokenizer built offline) and Stable Diffusion 1.x/2.x diffusers folders on
local disk (with a VAE, the UNet works in latent space). Nothing here downloads.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from torch.func import functional_call

from diffunlearn.backends.base import LINEAR_CONV, PARAM_GROUPS
from diffunlearn.backends.model_dir import (
    CHANGED_UNET_WEIGHTS,
    META_FILE,
    PREDICTION_TYPES,
    UNET_WEIGHTS,
    ModelDirError,
    base_path_of,
    check_model_dir,
    component_weights,
    model_components,
    model_content_hash,
    read_meta,
)
from diffunlearn.io import atomic_write_text
from diffunlearn.registry import UnknownNameError

# diffusers and transformers are imported lazily inside functions: importing them costs
# seconds and the CLI validates its input before paying that.


class WordTokenizer:
    """Word-level tokenizer for the testbed: every concept is exactly one token."""

    def __init__(self, tokenizer, max_length: int):
        self._tok = tokenizer
        self.max_length = max_length
        self.pad_id = tokenizer.token_to_id("[PAD]")

    @classmethod
    def build(cls, words: Sequence[str], max_length: int = 12) -> WordTokenizer:
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

        specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
        vocab = {w: i for i, w in enumerate([*specials, *dict.fromkeys(words)])}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
        tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("removed")]
        )
        tok.post_processor = processors.TemplateProcessing(
            single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])]
        )
        return cls(tok, max_length)

    @classmethod
    def load(cls, folder: Path) -> WordTokenizer:
        from tokenizers import Tokenizer

        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        return cls(Tokenizer.from_file(str(folder / "tokenizer.json")), cfg["max_length"])

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(
            json.dumps({"kind": "word-level", "max_length": self.max_length}, indent=2)
        )

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def special_id(self, token: str) -> int:
        return self._tok.token_to_id(token)

    def ids(self, text: str, special: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=special).ids

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        rows = [self.ids(p)[: self.max_length] for p in prompts]
        out = torch.full((len(rows), self.max_length), self.pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row)
        return out


class HFTokenizer:
    """CLIP's BPE tokenizer read from a local Stable Diffusion folder."""

    def __init__(self, folder: Path):
        from transformers import CLIPTokenizer

        self.folder = Path(folder)
        self._tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.max_length = self._tok.model_max_length

    def save(self, folder: Path) -> None:
        """Copy the files it was read from: byte-identical, so a re-saved model keeps its hash."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if folder.resolve() == self.folder.resolve():
            return
        for source in sorted(p for p in self.folder.iterdir() if p.is_file()):
            shutil.copyfile(source, folder / source.name)

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    def token_id(self, token: str) -> int:
        return self._tok.convert_tokens_to_ids(token)

    def tokens(self, ids: Sequence[int]) -> list[str]:
        return self._tok.convert_ids_to_tokens(list(ids))

    def ids(self, text: str, special: bool = True) -> list[int]:
        return self._tok(text, add_special_tokens=special)["input_ids"]

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        return self._tok(list(prompts), padding="max_length", max_length=self.max_length,
                         truncation=True, return_tensors="pt").input_ids


def build_testbed(vocab: Sequence[str], arch: Mapping) -> T2IModel:
    """A freshly initialised testbed model from an architecture config (see configs/pretrain.yaml)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = WordTokenizer.build(vocab, max_length=arch["max_length"])
    text_config = CLIPTextConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=arch["text_dim"], intermediate_size=4 * arch["text_dim"],
        num_hidden_layers=arch["text_layers"], num_attention_heads=max(1, arch["text_dim"] // 32),
        max_position_embeddings=arch["max_length"], pad_token_id=tokenizer.pad_id,
        bos_token_id=tokenizer.special_id("[BOS]"), eos_token_id=tokenizer.special_id("[EOS]"),
    )
    text_encoder = CLIPTextModel(text_config)
    channels = tuple(arch["channels"])
    # diffusers' `attention_head_dim` is the number of heads (a known naming quirk): heads
    # of >= 16 channels each keep the CPU attention kernel efficient (TESTBED.md).
    unet = UNet2DConditionModel(
        sample_size=arch["image_size"], in_channels=3, out_channels=3, layers_per_block=arch["layers_per_block"],
        block_out_channels=channels,
        down_block_types=("DownBlock2D", *["CrossAttnDownBlock2D"] * (len(channels) - 1)),
        up_block_types=(*["CrossAttnUpBlock2D"] * (len(channels) - 1), "UpBlock2D"),
        cross_attention_dim=arch["text_dim"], attention_head_dim=arch["heads"],
        norm_num_groups=arch.get("norm_groups", 8),
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    meta = {"kind": "testbed", "image_size": arch["image_size"], "guidance_scale": arch.get("guidance_scale", 3.0),
            "sample_steps": 25, "latent": False}
    return T2IModel(unet, text_encoder, tokenizer, scheduler, meta=meta)


class _CapturingProcessor:
    """Cross-attention processor that records attention probabilities (MACE, diagnostics)."""

    def __init__(self, name: str, store: dict[str, list[torch.Tensor]]):
        self.name, self.store = name, store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, attention_mask)
        self.store.setdefault(self.name, []).append(probs.view(batch, attn.heads, *probs.shape[1:]))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out))


class T2IModel:
    """A text-to-image diffusion model with the Backend interface (see backends/base.py)."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, tokenizer, scheduler, vae: nn.Module | None = None,
                 meta: dict | None = None, device: str | torch.device = "cpu"):
        self.unet, self.text_encoder, self.tokenizer, self.scheduler, self.vae = (
            unet, text_encoder, tokenizer, scheduler, vae)
        self.meta = dict(meta or {})
        self.device = torch.device(device)
        self.autocast: torch.dtype | None = None  # mixed precision of UNet forwards (set_precision)
        self.loss_scaler: torch.amp.GradScaler | None = None  # fp16's dynamic loss scale
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.alphas_cumprod = scheduler.alphas_cumprod.to(torch.float32)
        # the scheduler config as written (any scheduler class): the DDIM sampler is built from it, so
        # keys a DDPMScheduler drops (set_alpha_to_one, ...) still count; `scheduler_dir` is where it was read
        self.scheduler_config = dict(scheduler.config)
        self.scheduler_dir: Path | None = None
        if self.prediction_type not in PREDICTION_TYPES:
            raise ModelDirError(f"scheduler prediction_type '{self.prediction_type}' is not supported; "
                                f"supported: {', '.join(PREDICTION_TYPES)}")
        channels = unet.config.in_channels
        self.image_shape = (channels, unet.config.sample_size, unet.config.sample_size)  # the UNet's space
        vae_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.pixel_size = int(self.meta.get("image_size", unet.config.sample_size * vae_factor))
        self._teacher: dict[str, torch.Tensor] = {}
        # cost accounting ([004] Table 4): UNet calls, images through them, backward passes
        self.counters = {"unet_forward": 0, "unet_forward_images": 0, "unet_backward": 0}
        self._prompt_cache: dict[str, torch.Tensor] = {}
        self.path: Path | None = None
        self._hash: str | None = None
        self.to(self.device)
        self.text_encoder.requires_grad_(False)
        self.text_encoder.eval()
        if self.vae is not None:
            self.vae.requires_grad_(False)

    # ---- construction and files ------------------------------------------------------
    def to(self, device: str | torch.device) -> T2IModel:
        self.device = torch.device(device)
        for module in (self.unet, self.text_encoder, self.vae):
            if module is not None:
                module.to(self.device)
        self.alphas_cumprod = self.alphas_cumprod.to(self.device)
        return self

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", allow_pickle: bool = False) -> T2IModel:
        """Load a local model folder or an erase run's model folder; never downloads. Pickle
        weights (`.bin`) are refused unless `allow_pickle`, and then read with
        torch.load(weights_only=True). Any failure to load is a one-line ModelDirError."""
        path = Path(path)
        meta = check_model_dir(path, allow_pickle)
        try:
            return cls._load(path, meta, device, allow_pickle)
        except ModelDirError:
            raise
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, OverflowError, AttributeError,
                pickle.UnpicklingError, SafetensorError) as err:
            raise ModelDirError(f"cannot load model folder {path}: {_one_line(err)}") from None

    @classmethod
    def _load(cls, path: Path, meta: dict, device: str, allow_pickle: bool) -> T2IModel:
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from safetensors.torch import load_file
        from transformers import CLIPTextModel

        _quiet_hub_progress()
        if meta.get("base") and not meta.get("self_contained"):  # the changed-tensors-only layout of older runs
            base_path = base_path_of(path, meta)
            model = cls.from_pretrained(base_path, device, allow_pickle)
            if model.content_hash() != meta["base"]["hash"]:
                raise ModelDirError(f"{path} was trained from a base model with hash {meta['base']['hash']}, "
                                    f"but {base_path} now has hash {model.content_hash()}")
            changed = load_file(str(path / UNET_WEIGHTS), device=str(model.device))
            own = dict(model.unet.named_parameters())
            missing = set(changed) - set(own)
            if missing:
                raise ModelDirError(f"{path}: weights not in the base model: {sorted(missing)[:3]}")
            wrong = [n for n, t in changed.items() if t.shape != own[n].shape]
            if wrong:
                raise ModelDirError(f"{path}: weight {wrong[0]} has shape {list(changed[wrong[0]].shape)}, the base "
                                    f"model's {list(own[wrong[0]].shape)}")
            model.unet.load_state_dict(changed, strict=False)
            model.meta.update({k: v for k, v in meta.items() if k not in ("base",)})
            model.meta["base"] = meta["base"]
            model.path, model._hash = path, None
            return model
        unet = _load_component(UNet2DConditionModel, path, "unet", allow_pickle)
        text_encoder = _load_component(CLIPTextModel, path, "text_encoder", allow_pickle)
        scheduler_config = DDPMScheduler.load_config(str(path / "scheduler"), local_files_only=True)
        scheduler = _training_scheduler(scheduler_config)
        if (path / "tokenizer" / "tokenizer_config.json").exists() and json.loads(
            (path / "tokenizer" / "tokenizer_config.json").read_text()).get("kind") == "word-level":
            tokenizer = WordTokenizer.load(path / "tokenizer")
        else:
            tokenizer = HFTokenizer(path / "tokenizer")
        vae = None
        if (path / "vae").exists():
            from diffusers import AutoencoderKL

            vae = _load_component(AutoencoderKL, path, "vae", allow_pickle)
        meta = meta or {"kind": "diffusers", "guidance_scale": 7.5, "sample_steps": 50, "latent": vae is not None}
        model = cls(unet.eval(), text_encoder, tokenizer, scheduler, vae=vae, meta=meta, device=device)
        model.scheduler_config, model.scheduler_dir = dict(scheduler_config), path / "scheduler"
        model.path = path
        return model

    def reinitialized(self, seed: int, keep_text_encoder: bool = True) -> T2IModel:
        """A model of the same architecture, tokenizer and schedule with a fresh random UNet
        (retraining from scratch: the gold standard of unlearning). `keep_text_encoder`: a copy
        of this model's text encoder, as a Stable Diffusion retrain keeps CLIP; otherwise a fresh
        random one too."""
        import copy

        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(self.unet.config)
        text_encoder = (copy.deepcopy(self.text_encoder) if keep_text_encoder
                        else CLIPTextModel(self.text_encoder.config))
        model = T2IModel(unet, text_encoder, self.tokenizer, self.scheduler, vae=self.vae, meta=dict(self.meta),
                         device=self.device)
        model.scheduler_config, model.scheduler_dir = dict(self.scheduler_config), self.scheduler_dir
        return model

    def text_encoder_hash(self) -> str:
        """SHA-256 of the text encoder's weights (names, dtypes, shapes and bytes), independent of
        where the model was loaded from."""
        import hashlib

        digest = hashlib.sha256()
        for name, tensor in sorted(self.text_encoder.state_dict().items()):
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]

    def load_weights_from(self, other: T2IModel) -> None:
        """Copy every UNet and text-encoder weight of `other` (same architecture) into this model."""
        with torch.no_grad():
            self.unet.load_state_dict(other.unet.state_dict())
            self.text_encoder.load_state_dict(other.text_encoder.state_dict())
        self._prompt_cache.clear()

    def save_pretrained(self, path: str | Path, changed_only: bool = False) -> None:
        """Write a complete model folder: a Stable Diffusion-layout model's loads untouched with
        diffusers' `StableDiffusionPipeline.from_pretrained(path)`.

        `changed_only` (a run's model): the folder is still complete, but every file but the
        UNet's weights is a hard link to (or, across file systems, a copy of) the unchanged file
        of the folder the model was loaded from, so it costs no disk space; the UNet's full
        weights are written, and beside them `unet_changed.safetensors` holds only the tensors
        that differ from the base model, whose path and content hash `diffunlearn.json` records."""
        from diffunlearn.engine.checkpoint import atomic_save_tensors

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = dict(self.meta)
        source = self._complete_source()
        if changed_only:
            if self.path is None:
                raise ValueError("changed_only needs a model loaded from a folder (the base)")
            base = self.meta.get("base") or {"path": str(self.path.resolve()), "hash": self.content_hash()}
            full = dict(self.unet.state_dict())
            names = sorted(set(self._teacher) | set(self.meta.get("changed_params", [])))
            atomic_save_tensors({n: full[n] for n in names}, path / CHANGED_UNET_WEIGHTS, metadata={"format": "pt"})
            meta.update(base=base, changed_params=names, self_contained=True)
        else:
            meta.pop("base", None)
            meta.pop("changed_params", None)
            meta.pop("self_contained", None)
        if source is not None and changed_only:
            _link_components(source, path)
            (path / "unet").mkdir(exist_ok=True)
            atomic_save_tensors(dict(self.unet.state_dict()), path / UNET_WEIGHTS, metadata={"format": "pt"})
        else:
            self._write_components(path)
        if source is None or not changed_only or not (path / "model_index.json").exists():
            atomic_write_text(path / "model_index.json", json.dumps(self._model_index(), indent=2))
        atomic_write_text(path / META_FILE, json.dumps(meta, indent=2))  # written last: it makes the folder a model

    def _complete_source(self) -> Path | None:
        """The folder this model was loaded from, if it holds every component itself (not a run
        folder of the changed-tensors-only layout older versions wrote)."""
        if self.path is None or not (self.path / "model_index.json").exists():
            return None
        meta = read_meta(self.path)
        return self.path if not meta.get("base") or meta.get("self_contained") else None

    def _write_components(self, path: Path) -> None:
        """Every component from memory (the scheduler config and tokenizer files copied from
        where they were read, byte for byte, so a re-saved model keeps its hash)."""
        for sub in ("unet", "text_encoder", "tokenizer", "scheduler", "vae"):
            _break_hard_links(path / sub)  # never write through a link into another folder's file
        self.unet.save_pretrained(str(path / "unet"), safe_serialization=True)
        self.text_encoder.save_pretrained(str(path / "text_encoder"), safe_serialization=True)
        self.tokenizer.save(path / "tokenizer")
        if self.scheduler_dir is not None and (self.scheduler_dir / "scheduler_config.json").is_file():
            (path / "scheduler").mkdir(exist_ok=True)
            config = "scheduler_config.json"
            if self.scheduler_dir.resolve() != (path / "scheduler").resolve():
                shutil.copyfile(self.scheduler_dir / config, path / "scheduler" / config)
        else:
            self.scheduler.save_pretrained(str(path / "scheduler"))
        if self.vae is not None:
            self.vae.save_pretrained(str(path / "vae"), safe_serialization=True)
        for sub in ("unet", "vae"):
            _drop_load_path(path / sub / "config.json")

    def _model_index(self) -> dict:
        """diffusers' model_index.json: a latent model with CLIP's tokenizer is a Stable Diffusion
        folder (StableDiffusionPipeline loads it untouched, without a safety checker); anything
        else is our own layout, read by `from_pretrained` only."""
        scheduler_class = self.scheduler_config.get("_class_name") or type(self.scheduler).__name__
        components = {"unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"],
                      "scheduler": ["diffusers", scheduler_class]}
        if not (self.vae is not None and isinstance(self.tokenizer, HFTokenizer)):
            return {"_class_name": "DiffunlearnT2I", "_diffusers_version": _diffusers_version(), **components}
        return {"_class_name": "StableDiffusionPipeline", "_diffusers_version": _diffusers_version(), **components,
                "vae": ["diffusers", type(self.vae).__name__], "tokenizer": ["transformers", "CLIPTokenizer"],
                "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}

    def content_hash(self) -> str:
        if self._hash is None:
            self._hash = model_content_hash(self.path) if self.path is not None else "unsaved"
        return self._hash

    # ---- text --------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            ids = self.tokenizer(missing).to(self.device)
            hidden = self.text_encoder(ids)[0].float()
            for p, h in zip(missing, hidden, strict=True):
                self._prompt_cache[p] = h
        return torch.stack([self._prompt_cache[p] for p in prompts])

    def token_positions(self, prompt: str, concept: str) -> list[int]:
        ids = self.tokenizer.ids(prompt)[: self.tokenizer.max_length]
        sub = self.tokenizer.ids(concept, special=False)
        for start in range(len(ids) - len(sub), -1, -1):
            if sub and ids[start : start + len(sub)] == sub:
                return list(range(start, start + len(sub)))
        return []

    # ---- images and noise ----------------------------------------------------------------
    def to_model_space(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> what the UNet denoises: scaled VAE latents (a posterior sample,
        drawn from `generator` so that a resumed run draws the same), or the images themselves."""
        mean, std = self.encode_moments(images)
        if std is None:
            return mean
        return mean + std * torch.randn(mean.shape, generator=generator).to(mean.device)

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean and std of the model-space distribution of images: the scaled VAE posterior, or
        the images themselves with no std in pixel space."""
        if self.vae is None:
            return images, None
        dist = self.vae.encode(images).latent_dist
        scale = self.vae.config.scaling_factor
        return dist.mean * scale, dist.std * scale

    def from_model_space(self, x: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return x.clamp(-1, 1)
        with torch.no_grad():
            return self.vae.decode(x / self.vae.config.scaling_factor).sample.clamp(-1, 1)

    def _alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(abar_t) and sqrt(1 - abar_t), shaped to broadcast over a batch like `like`."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device)
        abar = self.alphas_cumprod[t.expand(like.shape[0]) if t.dim() == 0 else t]
        abar = abar.to(like.device).view(-1, *([1] * (like.dim() - 1)))
        return abar.sqrt(), (1 - abar).sqrt()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self._alpha_sigma(t, x0)
        return alpha * x0 + sigma * noise

    # ---- the model's prediction space -----------------------------------------------------
    @property
    def prediction_type(self) -> str:
        """What the UNet predicts, from the scheduler config: `epsilon` (SD 1.x, 2.x-base),
        `v_prediction` (SD 2.x at 768 px) or `sample` (x0)."""
        return str(self.scheduler.config.prediction_type)

    def noise_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The regression target of the denoising loss for x_t = add_noise(x0, noise, t), in the
        model's own prediction space: `noise` (epsilon), v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0
        (v_prediction; diffusers' DDPMScheduler.get_velocity), or x0 (sample). Every Gaussian- or
        uniform-noise target of a loss goes through here, so a v model learns v, never eps."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        alpha, sigma = self._alpha_sigma(t, x0)
        return alpha * noise - sigma * x0

    def eps_and_x0(self, x_t: torch.Tensor, output: torch.Tensor, t: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The noise and the clean sample that a model `output` at (x_t, t) stands for, whatever
        the prediction type (the conversions of diffusers' DDIMScheduler.step)."""
        alpha, sigma = self._alpha_sigma(t, x_t)
        if self.prediction_type == "epsilon":
            return output, (x_t - sigma * output) / alpha
        if self.prediction_type == "sample":
            return (x_t - alpha * output) / sigma, output
        return alpha * output + sigma * x_t, alpha * x_t - sigma * output

    def set_precision(self, bf16: bool = False, fp16: bool = False) -> None:
        """UNet forwards in float32 (default), bf16 or fp16 autocast; fp16 also gets a dynamic loss
        scale (gradients through fp16 activations underflow without one), which the training loop
        takes from `loss_scaler`."""
        self.autocast = torch.bfloat16 if bf16 else torch.float16 if fp16 else None
        self.loss_scaler = torch.amp.GradScaler(self.device.type) if fp16 else None

    def _autocast(self):
        if self.autocast is not None:
            return torch.autocast(self.device.type, dtype=self.autocast)
        return contextlib.nullcontext()

    @property
    def loss_scale(self) -> float:
        return float(self.loss_scaler.get_scale()) if self.loss_scaler is not None else 1.0

    def backward(self, loss: torch.Tensor) -> None:
        (self.loss_scaler.scale(loss) if self.loss_scaler is not None else loss).backward()

    def grad(self, loss: torch.Tensor, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if self.loss_scaler is None:
            return torch.autograd.grad(loss, inputs)
        scale = self.loss_scale
        return tuple(g / scale for g in torch.autograd.grad(self.loss_scaler.scale(loss), inputs))

    @property
    def gradient_checkpointing(self) -> bool:
        """Recompute the UNet's activations in the backward pass (diffusers' own checkpointing)."""
        return bool(self.unet.is_gradient_checkpointing)

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        if on:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
            params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        if t.dim() == 0:
            t = t.expand(x_t.shape[0])
        self.counters["unet_forward"] += 1
        self.counters["unet_forward_images"] += int(x_t.shape[0])
        # a checkpointed block recomputes its forward in the backward pass with the module's own
        # weights, which functional_call has restored by then: a forward under substituted weights
        # that needs gradients (EraseDiff's phi) runs without checkpointing
        substituted = bool(params) and torch.is_grad_enabled() and self.gradient_checkpointing
        if substituted:
            self.unet.disable_gradient_checkpointing()
        try:
            with self._autocast():
                if params:
                    out = functional_call(self.unet, dict(params), (x_t, t), {"encoder_hidden_states": cond},
                                          strict=False)
                else:
                    out = self.unet(x_t, t, encoder_hidden_states=cond)
        finally:
            if substituted:
                self.unet.enable_gradient_checkpointing()
        out = out.sample.float() if hasattr(out, "sample") else out[0].float()
        if out.requires_grad:
            out.register_hook(self._count_backward)
        return out

    def _count_backward(self, grad: torch.Tensor) -> None:
        self.counters["unet_backward"] += 1

    def teacher_eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.eps(x_t, t, cond, params=self._teacher or None)

    # ---- parameters -------------------------------------------------------------------
    def param_group(self, name: str) -> dict[str, nn.Parameter]:
        if name not in PARAM_GROUPS:
            raise UnknownNameError("parameter group", name, list(PARAM_GROUPS))
        named = dict(self.unet.named_parameters())
        if name.endswith(LINEAR_CONV):
            layers = self.linear_conv_parameter_names()
            return {n: p for n, p in self.param_group(name.removesuffix(LINEAR_CONV)).items() if n in layers}
        if name == "full":
            return named
        if name == "xattn":
            return {n: p for n, p in named.items() if ".attn2." in n}
        if name == "xattn-kv":
            return {n: p for n, p in named.items() if ".attn2.to_k." in n or ".attn2.to_v." in n}
        return {n: p for n, p in named.items() if ".attn2." not in n}

    def linear_conv_parameter_names(self) -> set[str]:
        """Names of the UNet parameters owned by Linear or Conv layers (diffusers' LoRA-compatible
        layers subclass them), i.e. everything but norm layers' affine weights."""
        return {f"{module_name}.{n}" if module_name else n
                for module_name, module in self.unet.named_modules()
                if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d)
                for n, _ in module.named_parameters(recurse=False)}

    def set_trainable(self, group: str) -> dict[str, nn.Parameter]:
        params = self.param_group(group)
        self.unet.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        self.snapshot_teacher(params)
        return params

    def snapshot_teacher(self, params: Mapping[str, torch.Tensor]) -> None:
        """Copy only the group that will train: the rest of the UNet is shared with the teacher."""
        self._teacher = {n: p.detach().clone() for n, p in params.items()}

    def teacher_params(self) -> dict[str, torch.Tensor]:
        return self._teacher

    def named_trainable(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.unet.named_parameters() if p.requires_grad)

    def xattn_kv_layers(self) -> list[tuple[str, nn.Linear, nn.Linear]]:
        return [(name, m.to_k, m.to_v) for name, m in self.unet.named_modules() if name.endswith("attn2")]

    def attention_projections(self, which: str = "all") -> list[str]:
        """Names of the attention projection modules: `xattn-kv` (attn2 to_k/to_v, MACE) or
        `all` (to_q/to_k/to_v/to_out.0 of every attention layer, diffusers' LoRA default)."""
        projections = ("to_k", "to_v") if which == "xattn-kv" else ("to_q", "to_k", "to_v", "to_out.0")
        layers = [name for name, _ in self.unet.named_modules()
                  if name.endswith("attn2") or (which == "all" and name.endswith("attn1"))]
        return [f"{layer}.{proj}" for layer in layers for proj in projections]

    # ---- LoRA adapters (peft) ------------------------------------------------------------
    def add_lora(self, name: str, targets: Sequence[str], rank: int, alpha: float | None = None,
                 init: str | bool = True) -> dict[str, nn.Parameter]:
        """Attach a peft LoRA adapter named `name` to the UNet modules `targets`, make it the
        only trainable part, and return its parameters. `init=True` starts from a zero update."""
        from peft import LoraConfig

        config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(targets), init_lora_weights=init)
        self.unet.add_adapter(config, adapter_name=name)
        self.unet.set_adapter(name)
        params = {n: p for n, p in self.unet.named_parameters() if "lora_" in n and f".{name}." in n}
        for n, p in self.unet.named_parameters():
            p.requires_grad_(n in params)
        return params

    def lora_deltas(self, name: str) -> dict[str, torch.Tensor]:
        """Module name -> dW = scaling * B @ A of adapter `name`."""
        return {module_name: _lora_delta(module, name).detach().clone()
                for module_name, module in self.unet.named_modules()
                if hasattr(module, "lora_A") and name in module.lora_A}

    def remove_lora(self) -> None:
        """Drop every adapter: the UNet is the plain model again (base weights as they were)."""
        from diffusers.utils.peft_utils import recurse_remove_peft_layers

        recurse_remove_peft_layers(self.unet)
        if hasattr(self.unet, "peft_config"):
            del self.unet.peft_config
        self.unet._hf_peft_config_loaded = False

    def merge_lora(self, name: str) -> list[str]:
        """Fold adapter `name` into the base weights, remove the adapters, and return the names
        of the weights that changed (for a changed-only save)."""
        deltas = self.lora_deltas(name)
        self.remove_lora()
        modules = dict(self.unet.named_modules())
        with torch.no_grad():
            for module_name, delta in deltas.items():
                modules[module_name].weight.add_(delta.to(modules[module_name].weight.dtype))
        return [f"{m}.weight" for m in deltas]

    @torch.no_grad()
    def effective_weights(self) -> dict[str, torch.Tensor]:
        """Every UNet weight under its plain name, with active LoRA updates folded in: the
        model's weights as a merge would leave them (for distance diagnostics)."""
        deltas = {module_name: sum(_lora_delta(module, a) for a in module.active_adapters if a in module.lora_A)
                  for module_name, module in self.unet.named_modules()
                  if hasattr(module, "lora_A") and hasattr(module, "active_adapters")}
        out = {}
        for n, p in self.unet.named_parameters():
            if "lora_" in n:
                continue
            plain = n.replace(".base_layer.", ".")
            module_name = plain.rsplit(".", 1)[0]
            value = p.detach()
            if plain.endswith(".weight") and module_name in deltas:
                value = value + deltas[module_name]
            out[plain] = value
        return out

    @contextlib.contextmanager
    def capture_attention(self) -> Iterator[dict[str, list[torch.Tensor]]]:
        store: dict[str, list[torch.Tensor]] = {}
        modules = {name: m for name, m in self.unet.named_modules() if name.endswith("attn2")}
        saved = {name: m.processor for name, m in modules.items()}
        # a checkpointed block would recompute its forward in the backward pass, after this context
        # has put the SDPA processors back: the maps' gradients need the forward kept as it ran
        checkpointing = self.gradient_checkpointing
        try:
            if checkpointing:
                self.unet.disable_gradient_checkpointing()
            for name, m in modules.items():
                m.set_processor(_CapturingProcessor(name, store))
            yield store
        finally:
            for name, m in modules.items():
                m.set_processor(saved[name])
            if checkpointing:
                self.unet.enable_gradient_checkpointing()

    # ---- sampling ----------------------------------------------------------------------
    @property
    def guidance_scale(self) -> float:
        """The classifier-free guidance scale recorded with the model (set once, by measurement)."""
        return float(self.meta.get("guidance_scale", 3.0))

    def initial_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """Per-image seeded noise, so an image does not depend on its batch."""
        return torch.stack([torch.randn(self.image_shape, generator=torch.Generator().manual_seed(int(s)))
                            for s in seeds]).to(self.device)

    def ddim_scheduler(self, steps: int):
        """A DDIM sampler built from the model's own scheduler config (its beta schedule, spacing,
        steps_offset, set_alpha_to_one, clipping, prediction type), set to `steps` steps."""
        from diffusers import DDIMScheduler

        ddim = _quietly(lambda: DDIMScheduler.from_config(self.scheduler_config))
        ddim.set_timesteps(steps)
        return ddim

    def ddim_timesteps(self, steps: int) -> list[int]:
        return [int(t) for t in self.ddim_scheduler(steps).timesteps]

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], seeds: Sequence[int], steps: int | None = None,
               guidance: float | None = None, stop_at: int | None = None, batch_size: int = 128,
               params: Mapping[str, torch.Tensor] | None = None, return_model_space: bool = False,
               ) -> torch.Tensor:
        """Deterministic DDIM with classifier-free guidance, cond and uncond in one forward.

        `stop_at` returns the first state of the trajectory whose timestep is <= stop_at (the
        initial noise when stop_at >= the first DDIM timestep; ESD and SDD train on such states);
        otherwise the final images in [-1, 1].
        """
        steps = steps or int(self.meta.get("sample_steps", 25))
        guidance = self.guidance_scale if guidance is None else float(guidance)
        out = []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            x = self.initial_noise(seeds[start : start + batch_size])
            out.append(self._ddim(x, chunk, steps, guidance, stop_at, params))
        x = torch.cat(out)
        return x if (return_model_space or stop_at is not None) else self.from_model_space(x)

    def _ddim(self, x: torch.Tensor, prompts: list[str], steps: int, guidance: float,
              stop_at: int | None, params: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
        cond = self.encode(prompts)
        uncond = self.encode([""]).expand_as(cond)
        both = torch.cat([uncond, cond])
        ddim = self.ddim_scheduler(steps)
        timesteps = [int(t) for t in ddim.timesteps]
        if stop_at is not None and timesteps[0] <= stop_at:
            return x  # zero steps: the initial noise is already at the first timestep
        # with a clipped x0 the step re-derives eps from it (Glide's and our original sampler's choice)
        clipped = bool(ddim.config.clip_sample or ddim.config.thresholding)
        for i, t in enumerate(timesteps):
            tt = torch.full((2 * x.shape[0],), t, device=self.device, dtype=torch.long)
            out_u, out_c = self.eps(torch.cat([x, x]), tt, both, params=params).chunk(2)
            # guidance in the model's own space: eps, v and x0 are affine in each other at a fixed
            # (x_t, t) and the weights sum to one, so this equals guiding the noise
            out = out_u + guidance * (out_c - out_u)
            x = ddim.step(out, t, x, eta=0.0, use_clipped_model_output=clipped).prev_sample
            if stop_at is not None and i + 1 < len(timesteps) and timesteps[i + 1] <= stop_at:
                return x
        return x


def _lora_delta(module: nn.Module, adapter: str) -> torch.Tensor:
    """dW = scaling * B @ A of one peft LoRA layer's adapter."""
    return module.scaling[adapter] * module.lora_B[adapter].weight @ module.lora_A[adapter].weight


def _load_component(model_cls, path: Path, component: str, allow_pickle: bool):
    """A UNet, text encoder or VAE from its folder: from safetensors through the library's own
    `from_pretrained`, or, where the folder holds only a pickle and the user allowed it, built
    from its config with the state dict read by torch.load(weights_only=True) (so the library's
    own pickle fallback, whatever its default, never runs)."""
    weights = component_weights(path, component, allow_pickle)
    folder = path / component
    if weights.suffix != ".bin":
        return model_cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    if hasattr(model_cls, "load_config"):  # diffusers
        model = model_cls.from_config(model_cls.load_config(str(folder), local_files_only=True))
    else:  # transformers
        model = model_cls(model_cls.config_class.from_pretrained(str(folder), local_files_only=True))
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ModelDirError(f"{weights} does not hold a state dict of tensors")
    expected = set(model.state_dict())
    unexpected = sorted(set(state) - expected - {"text_model.embeddings.position_ids"})  # a buffer older files keep
    missing = sorted(expected - set(state) - {"text_model.embeddings.position_ids"})
    if unexpected or missing:
        which = f"unexpected weight {unexpected[0]}" if unexpected else f"missing weight {missing[0]}"
        raise ModelDirError(f"{weights} does not match {component}/config.json ({which})")
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return model


def _training_scheduler(config: Mapping):
    """The DDPM noise schedule (betas, alphas_cumprod, prediction type) of any scheduler config:
    PNDM, DDIM, Euler, DPM-Solver... configs share these keys; the rest is sampling detail."""
    from diffusers import DDPMScheduler

    return _quietly(lambda: DDPMScheduler.from_config(config))


def _quietly(make):
    """diffusers logs every config key a scheduler class does not take (a PNDM config read as
    DDPM); those keys are sampling details of the other class, so the notes are noise here."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return make()
    finally:
        diffusers_logging.set_verbosity(level)


def _link_components(source: Path, path: Path) -> None:
    """Hard-link (or copy) every file of `source`'s components into `path`, except the UNet's
    weights (written fresh), and its model_index.json: unchanged files, no disk space, and no
    symbolic link that would point outside the folder."""
    import os

    files = [source / "model_index.json"] if (source / "model_index.json").is_file() else []
    for component in model_components(source):
        files += [f for f in sorted((source / component).rglob("*")) if f.is_file()
                  and not (component == "unet" and f.name != "config.json")]
    for file in files:
        target = path / file.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            target.unlink()
        real = file.resolve()  # a hub cache snapshot's files are symbolic links to its blobs
        try:
            os.link(real, target)
        except OSError:
            shutil.copyfile(real, target)


def _break_hard_links(folder: Path) -> None:
    """Remove the files in `folder` that share their data with another folder (a hard link made
    by `_link_components`), so that writing them anew cannot change the other folder's file."""
    if folder.is_dir():
        for file in folder.rglob("*"):
            if file.is_file() and not file.is_symlink() and file.stat().st_nlink > 1:
                file.unlink()


def _one_line(err: BaseException, limit: int = 160) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}"


def _quiet_hub_progress() -> None:
    """Loading a few-MB local model needs no 'Loading weights' bars from transformers/diffusers."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def _drop_load_path(config: Path) -> None:
    """diffusers records the folder a model was loaded from (`_name_or_path`) in its saved
    config; drop it so a folder's content hash does not change when a loaded model is re-saved."""
    if config.exists():
        data = json.loads(config.read_text())
        if data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
