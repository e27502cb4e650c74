"""`retrain`: the gold standard. The base model's UNet architecture, trained from scratch by
the shipped model's own recipe (configs/pretrain-model.yaml) on data without the forget
concepts ([001] §2, [002] Def. 1). It is the reference for UA/IRA and the control for the attacks.

Only the UNet is retrained: the original model's text encoder is kept, frozen, as a retrain of
Stable Diffusion keeps its pretrained CLIP encoder (which has seen the concept's word in its
own pretraining). Retraining the text encoder too (`train_text_encoder=true`) leaves the forget
words' embeddings at their random initialisation, so forget prompts reach the model as noise
rather than as a word it has never been shown images of.

Costly even on the testbed (the full recipe takes about 40 minutes on 2 CPU cores), so
results are cached per (recipe, UNet architecture, text encoder: the original's weight hash or
retrained, forget set) under the user cache directory, and an interrupted retrain resumes from
its checkpoint. The run directory holds a full model (the retrained UNet and the original text
encoder).
"""

from __future__ import annotations

from pydantic import Field

from diffunlearn.methods.base import Method, MethodConfig


class RetrainConfig(MethodConfig):
    pretrain_steps: int | None = Field(None, ge=1, description="override the recipe's step count")
    pretrain_images_per_pair: int | None = Field(None, ge=1, description="override the recipe's data size")
    train_text_encoder: bool = Field(
        False, description="also retrain the text encoder from scratch (default: keep the original's, frozen, "
                           "as a Stable Diffusion retrain keeps CLIP)")


class Retrain(Method):
    Config = RetrainConfig
    paper = "[001] §2, [002] Def. 1"
    trains = "the UNet, from scratch (the original text encoder, frozen)"
    closed_form = True
    full_model = True
    profiles = {"paper": {"steps": 0, "param_group": "full"}, "testbed": {"steps": 0, "param_group": "full"}}

    def param_group(self) -> str:
        return "full"

    def recipe(self):
        from diffunlearn.config import CONFIG_DIR, PretrainModelConfig, PretrainSDModelConfig, load_yaml

        if self.backend.meta.get("kind") == "testbed-sd":  # its own recipe; the VAE and tokenizer are kept
            recipe = PretrainSDModelConfig(**load_yaml(CONFIG_DIR / "pretrain-model-sd.yaml"))
        else:
            recipe = PretrainModelConfig(**load_yaml(CONFIG_DIR / "pretrain-model.yaml"))
        recipe.data.exclude = sorted(self.task.forget)
        if self.cfg.pretrain_steps:
            recipe.train.steps = self.cfg.pretrain_steps
        if self.cfg.pretrain_images_per_pair:
            recipe.data.images_per_pair = self.cfg.pretrain_images_per_pair
        return recipe

    def apply_closed_form(self) -> dict[str, float]:
        import shutil

        from diffunlearn.backends.diffusers_t2i import T2IModel
        from diffunlearn.config import config_hash
        from diffunlearn.data.tasks import cache_dir
        from diffunlearn.pretrain import pretrain_model

        recipe = self.recipe()
        folder = cache_dir() / "retrain" / config_hash(self.cache_key(recipe))
        if (folder / "model" / "diffunlearn.json").exists():
            trained = T2IModel.from_pretrained(folder / "model")
            self._cost = {"steps": 0, "pretrain_cached": True}
        else:
            trained = pretrain_model(recipe, folder, progress=False, like=self.backend,
                                     train_text_encoder=self.cfg.train_text_encoder)
            self._cost = self.pretraining_cost(trained.meta, recipe.train.batch_size)
        # the resume point is dead weight (a model's worth of tensors) once the model is written
        shutil.rmtree(folder / "checkpoint", ignore_errors=True)
        self.backend.load_weights_from(trained)
        return {"loss": 0.0, "pretrain_steps": float(recipe.train.steps)}

    def cache_key(self, recipe) -> dict:
        """What the retrained model depends on: the recipe (with the forget set), the UNet's
        architecture and the text encoder (the original's weights by hash, or retrained). Never
        the folder the model was loaded from, so every checkout shares one cache entry."""
        unet = {k: v for k, v in dict(self.backend.unet.config).items() if not k.startswith("_")}
        if self.cfg.train_text_encoder:
            text = {"retrained": {k: v for k, v in self.backend.text_encoder.config.to_dict().items()
                                  if not k.startswith("_") and k != "transformers_version"}}
        else:
            text = {"original_frozen": self.backend.text_encoder_hash()}
        return {"recipe": recipe.model_dump(), "unet": unet, "text_encoder": text}

    @staticmethod
    def pretraining_cost(meta: dict, batch_size: int) -> dict[str, int | bool]:
        """The pretraining steps run by this call (not those of a run it resumed), one batched
        UNet forward and one backward each: the shared loop never saw them."""
        run = meta["trained_steps"] - meta.get("resumed_from_step", 0)
        return {"steps": run, "resumed_from_step": meta.get("resumed_from_step", 0), "pretrain_cached": False,
                "unet_forward": run, "unet_forward_images": run * batch_size, "unet_backward": run}

    def cost(self) -> dict[str, int | bool]:
        return getattr(self, "_cost", {})
