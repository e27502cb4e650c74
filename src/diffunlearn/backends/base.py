"""What the engine, methods and attacks may ask of a text-to-image model.

Methods and attacks are written against this protocol only; `diffusers_t2i.py` is the one
implementation and the only module that names concrete model classes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn

# A group name may end in LINEAR_CONV: only the parameters of its Linear and Conv layers train,
# never a norm layer's (the official ESD code, esd_sd.py get_esd_trainable_parameters, selects
# modules by name *and* by type Linear / Conv2d / LoRACompatibleLinear / LoRACompatibleConv).
LINEAR_CONV = "-linconv"
PARAM_GROUPS = ("xattn", "xattn-kv", "noxattn", "full", f"noxattn{LINEAR_CONV}", f"full{LINEAR_CONV}")
PARAM_GROUP_HELP = {
    "xattn": "every projection of the cross-attention layers (attn2: to_q, to_k, to_v, to_out); ESD-x",
    "xattn-kv": "only attn2.to_k and attn2.to_v; ESD-x-strict, UCE, MACE",
    "noxattn": "everything but the cross-attention layers",
    "full": "every UNet parameter",
    f"noxattn{LINEAR_CONV}": "the Linear/Conv layers outside the cross-attention (no norm layers); ESD-u",
    f"full{LINEAR_CONV}": "every Linear/Conv layer of the UNet (no norm layers); ESD-all",
}


@runtime_checkable
class Backend(Protocol):
    """A conditional noise predictor with a frozen text encoder and a noise schedule."""

    num_train_timesteps: int
    image_shape: tuple[int, int, int]
    device: torch.device

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text-encoder outputs (B, L, D) for prompts; never trained."""

    def token_positions(self, prompt: str, concept: str) -> list[int]:
        """Positions in the encoded sequence of the concept's word token(s)."""

    def to_model_space(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> the space the UNet denoises (identity in pixel space; scaled VAE
        latents, a posterior sample drawn from `generator`, in latent space)."""

    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean and std (None in pixel space) of the model-space distribution of images."""

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    prediction_type: str  # epsilon | v_prediction | sample, from the scheduler config

    def noise_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The denoising target for x_t = add_noise(x0, noise, t) in the model's own prediction
        space (noise, v or x0): the one place a noise target is converted."""

    def eps(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
        params: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The UNet's prediction in its own space (noise for epsilon models, v for v-prediction
        ones; `eps` by the field's habit); `params` overrides named UNet parameters (the frozen
        teacher)."""

    def teacher_eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The frozen original model's prediction, without a second model copy."""

    def backward(self, loss: torch.Tensor) -> None:
        """`loss.backward()`, times the fp16 loss scale when one is set (the loop unscales the
        parameters' gradients): every method and attack computes its gradients through this or
        `grad`, so fp16 mixed precision needs nothing of them."""

    def grad(self, loss: torch.Tensor, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """`torch.autograd.grad(loss, inputs)`, computed under the loss scale and returned unscaled."""

    @property
    def loss_scale(self) -> float:
        """The factor by which the gradients `backward` leaves in `.grad` are scaled (1 without fp16)."""

    def teacher_params(self) -> dict[str, torch.Tensor]:
        """The snapshot of the trained group that `teacher_eps` evaluates."""

    def ddim_timesteps(self, steps: int) -> list[int]: ...

    def param_group(self, name: str) -> dict[str, nn.Parameter]: ...

    def set_trainable(self, group: str) -> dict[str, nn.Parameter]:
        """Freeze everything but `group`, snapshot it as the teacher, return it."""

    def xattn_kv_layers(self) -> list[tuple[str, nn.Linear, nn.Linear]]: ...

    def capture_attention(self) -> AbstractContextManager[dict[str, list[torch.Tensor]]]: ...

    def sample(
        self, prompts: Sequence[str], seeds: Sequence[int], steps: int | None = None,
        guidance: float | None = None, stop_at: int | None = None, batch_size: int = 128,
        params: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor: ...

    def attention_projections(self, which: str = "all") -> list[str]:
        """Module names of the attention projections (`xattn-kv` or `all`), LoRA targets."""

    def add_lora(self, name: str, targets: Sequence[str], rank: int, alpha: float | None = None,
                 init: str | bool = True) -> dict[str, nn.Parameter]:
        """Attach a peft LoRA adapter to `targets`; it becomes the only trainable part."""

    def lora_deltas(self, name: str) -> dict[str, torch.Tensor]: ...

    def merge_lora(self, name: str) -> list[str]:
        """Fold an adapter into the weights, drop all adapters, return the changed weight names."""

    def remove_lora(self) -> None: ...

    def effective_weights(self) -> dict[str, torch.Tensor]:
        """Every UNet weight under its plain name with active LoRA updates folded in."""

    def save_pretrained(self, path: Path, changed_only: bool = False) -> None: ...

    def content_hash(self) -> str: ...

    def named_trainable(self) -> Iterator[tuple[str, nn.Parameter]]: ...
