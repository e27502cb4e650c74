"""A diffusers Stable Diffusion folder written back as one original-layout (LDM) checkpoint, the
format of `sd-v1-4.ckpt` / `v1-5-pruned-emaonly.safetensors`, for tests of single-file loading
without downloads. The key names are those of CompVis' latent-diffusion modules
(`ldm/modules/diffusionmodules/openaimodel.py` UNetModel, `model.py` Encoder/Decoder) under the
prefixes the original checkpoints use; diffusers' single-file loader is the reference that must
map them back exactly."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
VAE_TOP = {"conv_norm_out": "norm_out"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    layer, param = rest.rsplit(".", 1)
    return f"{RESNET.get(layer, layer)}.{param}"


def unet_key(key: str, layers: int, attention_blocks: set[int]) -> str:
    """openaimodel numbering: input block 0 is conv_in, then each down block has `layers` resnet
    (+ attention) entries and a downsampler entry; each up block has `layers + 1` entries, the
    last one also holding the upsampler after its resnet (and attention)."""
    for new, old in UNET_TOP.items():
        if key.startswith(new + "."):
            return old + key[len(new):]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = block * (layers + 1) + j + 1
        return f"input_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (layers + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = block * (layers + 1) + j
        return f"output_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        block = int(m[1])
        return f"output_blocks.{block * (layers + 1) + layers}.{2 if block in attention_blocks else 1}.conv.{m[2]}"
    raise KeyError(key)


def vae_key(key: str, blocks: int) -> str:
    """model.py numbering: encoder.down.i, decoder.up in reverse order (up.0 is the last to run)."""
    part, rest = key.split(".", 1)
    if part not in ("encoder", "decoder"):
        return key  # quant_conv, post_quant_conv
    for new, old in VAE_TOP.items():
        if rest.startswith(new + "."):
            return f"{part}.{old}{rest[len(new):]}"
    if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest):
        return f"{part}.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", rest):
        return f"{part}.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest):
        return f"{part}.up.{blocks - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", rest):
        return f"{part}.up.{blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", rest):
        return f"{part}.mid.block_{int(m[1]) + 1}.{m[2]}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)\.(weight|bias)", rest):
        return f"{part}.mid.attn_1.{VAE_ATTENTION[m[1]]}.{m[2]}"
    return key


def ldm_checkpoint(folder: Path, layers_per_block: int = 1) -> dict[str, torch.Tensor]:
    """An SD 1.x-style single-file checkpoint of a diffusers folder (CLIP text encoder)."""
    import json

    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    attention_blocks = {i for i, t in enumerate(unet_config["up_block_types"]) if t.startswith("CrossAttn")}
    out = {}
    for key, value in load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors")).items():
        out["model.diffusion_model." + unet_key(key, layers_per_block, attention_blocks)] = value
    blocks = len(json.loads((folder / "vae" / "config.json").read_text())["block_out_channels"])
    for key, value in load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors")).items():
        if ".mid_block.attentions." in key and value.dim() == 2:
            value = value[:, :, None, None]  # the original attention projections are 1x1 convolutions
        out["first_stage_model." + vae_key(key, blocks)] = value
    for key, value in load_file(str(folder / "text_encoder" / "model.safetensors")).items():
        out["cond_stage_model.transformer.text_model." + key.removeprefix("text_model.")] = value
    return out
