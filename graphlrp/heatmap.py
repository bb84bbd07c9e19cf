"""Relevance maps as pictures. Relevance is signed, so the colormap diverges around zero with symmetric limits
(±max|R|): red pixels speak for the explained class, blue ones against it, white ones not at all."""
from __future__ import annotations

import io

import numpy as np
from matplotlib import colormaps
from PIL import Image

CMAP = colormaps["bwr"]


def relevance_map(relevance: np.ndarray) -> np.ndarray:
    """[C, H, W] -> [H, W] by summing channels; an [H, W] map passes through."""
    relevance = np.asarray(relevance, dtype=np.float32)
    return relevance.sum(axis=0) if relevance.ndim == 3 else relevance


def _scaled(relevance: np.ndarray) -> np.ndarray:
    """Channel-summed relevance scaled into [-1, 1] by its largest magnitude (all zeros stays zeros)."""
    r = relevance_map(relevance)
    peak = float(np.abs(r).max()) if r.size else 0.0
    return r / peak if peak > 0 else np.zeros_like(r)


def heatmap(relevance: np.ndarray) -> Image.Image:
    """The relevance map alone, as an RGB image of the input's size."""
    colours = CMAP((_scaled(relevance) + 1.0) / 2.0)[..., :3]
    return Image.fromarray((colours * 255 + 0.5).astype(np.uint8))


def overlay(relevance: np.ndarray, image: np.ndarray | Image.Image, strength: float = 0.8) -> Image.Image:
    """The relevance map over a greyscale copy of the (preprocessed) input image. Each pixel's opacity grows with
    |relevance|, so irrelevant regions show the image and the colour never hides where it came from."""
    s = _scaled(relevance)
    base = np.asarray(Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("L").convert("RGB"), np.float32)
    if base.shape[:2] != s.shape:
        raise ValueError(f"image is {base.shape[1]}x{base.shape[0]}, relevance {s.shape[1]}x{s.shape[0]}")
    colours = CMAP((s + 1.0) / 2.0)[..., :3] * 255.0
    alpha = (strength * np.abs(s))[..., None]
    return Image.fromarray((base * (1 - alpha) + colours * alpha + 0.5).astype(np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
