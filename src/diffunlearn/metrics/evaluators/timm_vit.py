"""timm Vision Transformer checkpoints as transformers' `ViTForImageClassification`, without timm.

timm needs torchvision, which this toolkit never installs, so a timm ViT state dict (e.g.
UnlearnCanvas' style/object classifiers: `timm.create_model("vit_large_patch16_224.augreg_in21k")`
with a new `Linear(1024, n)` head, saved as `{"model_state_dict": ...}`; OPTML-Group/UnlearnCanvas
`machine_unlearning/evaluation/quantitative/accuracy.py`) is renamed into transformers' layout
by the mapping transformers' own conversion script uses (`models/vit/convert_vit_timm_to_pytorch.py`:
`create_rename_keys` and `read_in_q_k_v`, which splits timm's fused qkv projection into query,
key and value in that order). The architecture is read off the tensors: width from the class
token, patch size from the patch projection, image size from the position embeddings, depth from
the block count, MLP width from fc1; heads are not in the weights, so they default to width / 64
(every standard timm ViT: tiny 3, small 6, base 12, large 16) unless the label map says
`num_heads`. timm's LayerNorm eps is 1e-6 and its GELU is exact, as set here.

Supported: class-token pooling ViTs with qkv bias and no extra layers (the plain and augreg
families). Anything else (pre_logits of the original in21k models, fc_norm of avg-pooling
models, register tokens, layer scale) is refused in one line naming the keys.
"""

from __future__ import annotations

import math
import re

import torch

from diffunlearn.metrics.evaluators.base import EvaluatorError

BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")
BLOCK_PARTS = {
    "norm1.weight": "layernorm_before.weight", "norm1.bias": "layernorm_before.bias",
    "attn.proj.weight": "attention.output.dense.weight", "attn.proj.bias": "attention.output.dense.bias",
    "norm2.weight": "layernorm_after.weight", "norm2.bias": "layernorm_after.bias",
    "mlp.fc1.weight": "intermediate.dense.weight", "mlp.fc1.bias": "intermediate.dense.bias",
    "mlp.fc2.weight": "output.dense.weight", "mlp.fc2.bias": "output.dense.bias",
}
TOP_LEVEL = {
    "cls_token": "vit.embeddings.cls_token", "pos_embed": "vit.embeddings.position_embeddings",
    "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
    "norm.weight": "vit.layernorm.weight", "norm.bias": "vit.layernorm.bias",
    "head.weight": "classifier.weight", "head.bias": "classifier.bias",
}


def is_timm_vit(state: dict[str, torch.Tensor]) -> bool:
    return "cls_token" in state and "patch_embed.proj.weight" in state


def timm_vit_to_transformers(state: dict[str, torch.Tensor], num_heads: int | None = None):
    """(ViTConfig, state dict in ViTForImageClassification's layout) for a timm ViT state dict."""
    from transformers import ViTConfig

    missing = [k for k in TOP_LEVEL if k not in state]
    if missing:
        raise EvaluatorError(f"not a timm ViT classifier checkpoint: missing {', '.join(missing)}")
    unsupported = [k for k in state if k not in TOP_LEVEL and not (
        (m := BLOCK_KEY.fullmatch(k)) and (m.group(2) in BLOCK_PARTS or m.group(2) in ("attn.qkv.weight",
                                                                                    "attn.qkv.bias")))]
    if unsupported:
        raise EvaluatorError(f"timm checkpoint has layers the ViT conversion does not support: "
                             f"{', '.join(sorted(unsupported)[:5])}")
    width = int(state["cls_token"].shape[-1])
    patch = int(state["patch_embed.proj.weight"].shape[-1])
    grid = math.isqrt(int(state["pos_embed"].shape[1]) - 1)
    if grid * grid + 1 != state["pos_embed"].shape[1]:
        raise EvaluatorError("timm checkpoint: position embeddings are not a square grid plus a class token")
    depth = 1 + max(int(BLOCK_KEY.fullmatch(k).group(1)) for k in state if BLOCK_KEY.fullmatch(k))
    heads = num_heads or max(1, width // 64)
    if width % heads:
        raise EvaluatorError(f"timm checkpoint: width {width} is not divisible by {heads} heads (set num_heads)")
    config = ViTConfig(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                       intermediate_size=int(state["blocks.0.mlp.fc1.weight"].shape[0]), image_size=grid * patch,
                       patch_size=patch, num_channels=int(state["patch_embed.proj.weight"].shape[1]),
                       layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True,
                       num_labels=int(state["head.weight"].shape[0]))
    out = {new: state[old] for old, new in TOP_LEVEL.items()}
    for i in range(depth):
        prefix = f"vit.encoder.layer.{i}."
        for old, new in BLOCK_PARTS.items():
            out[prefix + new] = state[f"blocks.{i}.{old}"]
        qkv_w, qkv_b = state[f"blocks.{i}.attn.qkv.weight"], state[f"blocks.{i}.attn.qkv.bias"]
        for k, name in enumerate(("query", "key", "value")):
            out[f"{prefix}attention.attention.{name}.weight"] = qkv_w[k * width : (k + 1) * width]
            out[f"{prefix}attention.attention.{name}.bias"] = qkv_b[k * width : (k + 1) * width]
    return config, out


def load_timm_vit(state: dict[str, torch.Tensor], num_heads: int | None = None):
    """A ViTForImageClassification holding a timm ViT checkpoint's weights. The converted dict is
    in the checkpoint layout of transformers' hub files; `from_pretrained` maps it onto the
    installed version's module names (transformers 5 renamed them), and must match every key."""
    from transformers import ViTForImageClassification
    from transformers.utils import logging as hf_logging

    config, converted = timm_vit_to_transformers(state, num_heads)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = ViTForImageClassification.from_pretrained(None, config=config, state_dict=converted,
                                                                output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    unmatched = [*info.get("missing_keys", []), *info.get("unexpected_keys", []), *info.get("mismatched_keys", [])]
    if unmatched:
        raise EvaluatorError(f"timm ViT conversion left keys unmatched: {', '.join(map(str, list(unmatched)[:3]))}")
    return model.eval().requires_grad_(False)
