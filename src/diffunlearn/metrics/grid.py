"""Labelled sample grids ("before vs after") as PNG files, with Pillow only.

Every run writes one (DESIGN.md convention 7): numbers say how much was erased, a grid
shows what the model draws instead. Images are the toolkit's (N, 3, H, W) floats in [-1, 1];
16x16 samples are upscaled with nearest-neighbour so individual pixels stay visible.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

PAD = 2
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, 3) uint8; one-channel images are repeated to RGB."""
    x = images.detach().float().cpu()
    if x.dim() == 3:
        x = x[None]
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = ((x[:, :3].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def _tile(image: np.ndarray, scale: int) -> Image.Image:
    tile = Image.fromarray(np.ascontiguousarray(image))
    return tile.resize((tile.width * scale, tile.height * scale), Image.Resampling.NEAREST)


def save_grid(path: str | Path, rows: Sequence[tuple[str, torch.Tensor]], scale: int = 4) -> Path:
    """Write a PNG with one row per (label, images) pair, the label on the left of each row.

    Rows may hold different numbers of images (short rows are padded with background);
    returns the path written. Parent folders are created.
    """
    if not rows:
        raise ValueError("save_grid needs at least one row")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [measure.textbbox((0, 0), label, font=font) for label, _ in rows]
    label_w = max(b[2] - b[0] for b in boxes) + 2 * PAD
    tiles = [[_tile(img, scale) for img in to_uint8(images)] for _, images in rows]
    heights = [max([t.height for t in row] + [b[3] - b[1]]) + PAD for row, b in zip(tiles, boxes, strict=True)]
    width = label_w + max((sum(t.width + PAD for t in row) for row in tiles), default=0) + PAD
    canvas = Image.new("RGB", (width, sum(heights) + PAD), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = PAD
    for (label, _), row, box, height in zip(rows, tiles, boxes, heights, strict=True):
        draw.text((PAD, y + (height - PAD - (box[3] - box[1])) // 2 - box[1]), label, fill=TEXT, font=font)
        x = label_w
        for tile in row:
            canvas.paste(tile, (x, y))
            x += tile.width + PAD
        y += height
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path
