"""Relevance maps as pictures, at the model's input and at the photo's own resolution.

The colour map follows the data (`ColourScale.of`): where the relevance has both signs it diverges around zero
with symmetric limits (±max|R|, red for the explained class, blue against it); where it has one sign it is
sequential from zero to the extreme (white to red for relevance ≥ 0, blue to white for ≤ 0), so a preset whose
relevance is never negative is not drawn on half of a diverging map. Any matplotlib colour map can be chosen
instead; the limits still follow the data.

`photo_map` maps the model-input map back through the preprocessing (resize, pad, centre crop) onto the original
photo's pixels; the photo's pixels outside the crop are NaN there: not explained. Pictures draw them as the plain
photo under a grey hatch (overlay) or transparent (heatmap), never in a relevance colour.

Imports neither torch nor matplotlib's pyplot: the runtime and the server use it.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps
from PIL import Image

from .errors import InputError

DIVERGING = "bwr"  # both signs
POSITIVE = "Reds"  # relevance >= 0 only: white (0) to red (max)
NEGATIVE = "Blues_r"  # relevance <= 0 only: blue (min) to white (0)
# a sign counts when its extreme reaches this fraction of the peak |R|: smaller values are under a quarter of one
# step of a 256-colour map, invisible in either map, and float32 rounding of a never-negative preset stays far below
SIGN_TOLERANCE = 1e-3
OVERLAY_STRENGTH = 0.8  # opacity of the colour at the largest |R|; it falls to 0 with |R|
# the stripes over "not explained" pixels: every HATCH_PERIOD pixels (more on large photos, so that they show when
# the photo is viewed whole), HATCH_WIDTH of each period wide, mixed HATCH_MIX with grey
HATCH_PERIOD, HATCH_WIDTH, HATCH_GREY, HATCH_MIX = 8, 3 / 8, 150.0, 0.6


def relevance_map(relevance: np.ndarray) -> np.ndarray:
    """[C, H, W] -> [H, W] by summing channels; an [H, W] map passes through."""
    relevance = np.asarray(relevance, dtype=np.float32)
    return relevance.sum(axis=0) if relevance.ndim == 3 else relevance


def check_cmap(name: str) -> str:
    """A matplotlib colour map's name, or an InputError listing a few."""
    if name not in colormaps:
        some = ", ".join(sorted(n for n in colormaps if not n.endswith("_r"))[:12])
        raise InputError(f"unknown colour map {name!r}; matplotlib's names, e.g. {some}, ...")
    return name


@dataclass(frozen=True)
class ColourScale:
    """How relevance values become colours: the colour map and its limits [vmin, vmax]."""

    kind: str  # "diverging" (symmetric limits) or "sequential" (from 0 to the one sign's extreme)
    signs: str  # "both", "positive", "negative" or "zero" (the relevance is 0 everywhere)
    cmap: str
    vmin: float
    vmax: float

    @classmethod
    def of(cls, relevance, cmap: str | None = None) -> "ColourScale":
        """The scale that fits this relevance (a [C, H, W] or [H, W] array; NaNs, i.e. pixels not explained, are
        ignored). `cmap` replaces the default colour map of the kind."""
        r = np.asarray(relevance, np.float64)
        r = r[np.isfinite(r)]
        lo, hi = (float(r.min()), float(r.max())) if r.size else (0.0, 0.0)
        peak = max(-lo, hi)
        negative, positive = lo < -SIGN_TOLERANCE * peak, hi > SIGN_TOLERANCE * peak
        if cmap is not None:
            check_cmap(cmap)
        if negative and positive:
            return cls("diverging", "both", cmap or DIVERGING, -peak, peak)
        if negative:
            return cls("sequential", "negative", cmap or NEGATIVE, lo, 0.0)
        if positive:
            return cls("sequential", "positive", cmap or POSITIVE, 0.0, hi)
        return cls("sequential", "zero", cmap or POSITIVE, 0.0, 1.0)

    @property
    def peak(self) -> float:
        return max(abs(self.vmin), abs(self.vmax))

    def describe(self) -> str:
        """What the colours mean, in words (the figure and the serve page print it)."""
        if self.signs == "both":
            return f"diverging map ({self.cmap}), symmetric limits ±{self.peak:.3g}: relevance has both signs"
        if self.signs == "zero":
            return f"relevance is 0 everywhere ({self.cmap})"
        sign = "≥ 0" if self.signs == "positive" else "≤ 0"
        return f"sequential map ({self.cmap}), {self.vmin:.3g} to {self.vmax:.3g}: all relevance is {sign}"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "signs": self.signs, "cmap": self.cmap, "vmin": self.vmin, "vmax": self.vmax,
                "description": self.describe()}

    def position(self, values: np.ndarray) -> np.ndarray:
        """Values -> [0, 1] along the colour map (clipped to the limits)."""
        span = self.vmax - self.vmin
        return np.clip((np.asarray(values, np.float64) - self.vmin) / span, 0.0, 1.0)

    def magnitude(self, values: np.ndarray) -> np.ndarray:
        """|value| / peak in [0, 1]: how strongly a pixel is coloured in an overlay."""
        peak = self.peak if self.signs != "zero" else 1.0
        return np.clip(np.abs(np.asarray(values, np.float64)) / peak, 0.0, 1.0)

    def colours(self, values: np.ndarray) -> np.ndarray:
        """Values -> RGB in [0, 255] (float), shape [..., 3]."""
        return np.asarray(colormaps[self.cmap](self.position(values)))[..., :3] * 255.0

    def colorbar(self, width: int = 256, height: int = 14) -> Image.Image:
        """The colour map as a horizontal strip, vmin at the left and vmax at the right."""
        row = self.colours(np.linspace(self.vmin, self.vmax, width))
        return Image.fromarray(np.repeat(row[None], height, axis=0).round().astype(np.uint8))


def _scale(relevance, scale: ColourScale | None) -> ColourScale:
    return scale if scale is not None else ColourScale.of(relevance_map(relevance))


def _rgb(image) -> np.ndarray:
    """A PIL image or uint8 array -> float32 [H, W, 3] RGB (greyscale is repeated, alpha dropped)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), np.float32)
    array = np.asarray(image, dtype=np.uint8)
    return np.asarray(Image.fromarray(array).convert("RGB"), np.float32)


def _uint8(pixels: np.ndarray) -> np.ndarray:
    return np.clip(pixels + 0.5, 0, 255).astype(np.uint8)


def heatmap(relevance: np.ndarray, scale: ColourScale | None = None) -> Image.Image:
    """The relevance map alone, as an RGB image of the input's size."""
    r = relevance_map(relevance)
    return Image.fromarray(_uint8(_scale(r, scale).colours(r)))


def overlay(relevance: np.ndarray, image, strength: float = OVERLAY_STRENGTH,
            scale: ColourScale | None = None) -> Image.Image:
    """The relevance map alpha-blended over the image in its own colours: each pixel's opacity grows with |R|, so
    irrelevant regions show the image unchanged and the colour never hides where it came from."""
    r = relevance_map(relevance)
    base = _rgb(image)
    if base.shape[:2] != r.shape:
        raise ValueError(f"image is {base.shape[1]}x{base.shape[0]}, relevance {r.shape[1]}x{r.shape[0]}")
    s = _scale(r, scale)
    alpha = (strength * s.magnitude(r))[..., None]
    return Image.fromarray(_uint8(base * (1 - alpha) + s.colours(r) * alpha))


# -- at the photo's resolution ------------------------------------------------------------------------------

def _inside(start: float, stop: float, n: int) -> tuple[int, int]:
    """[first, last + 1) of the pixels 0..n-1 whose centres lie in [start, stop)."""
    first = max(0, int(np.ceil(start - 0.5 - 1e-9)))
    return first, max(first, min(n, int(np.ceil(stop - 0.5 - 1e-9))))


def photo_map(relevance: np.ndarray, preprocessing, size: tuple[int, int],
              shown: tuple[int, int] | None = None) -> np.ndarray:
    """The relevance map on the pixels of the original photo of (w, h) pixels: float32 [h, w], bilinear resampling
    of the model-input map through `preprocessing`'s resize and crop (a graphlrp.preprocessing.Preprocessing), NaN
    where the photo lies outside the crop (not explained). `shown` (w', h'): the same on a copy of the photo
    resized to that size (the serve page caps large photos). Values are the map's, resampled (for pictures): the
    raw relevance, whose sum is the explained score, stays the model-input map."""
    r = relevance_map(relevance)
    rows, cols = r.shape
    x0, y0, x1, y1 = preprocessing.crop_window((int(size[0]), int(size[1])))
    w, h = (int(size[0]), int(size[1])) if shown is None else (int(shown[0]), int(shown[1]))
    sx, sy = w / size[0], h / size[1]
    x0, y0, x1, y1 = x0 * sx, y0 * sy, x1 * sx, y1 * sy
    (i0, i1), (j0, j1) = _inside(x0, x1, w), _inside(y0, y1, h)
    out = np.full((h, w), np.nan, np.float32)
    if i1 == i0 or j1 == j0:
        return out
    fx, fy = cols / (x1 - x0), rows / (y1 - y0)  # input pixels per photo pixel
    # a photo pixel whose centre is inside reaches up to half a photo pixel (fx / 2 input pixels) beyond the crop,
    # and PIL takes no box beyond the image: pad by that much with the edge values (bilinear's clamp at the edge)
    px, py = int(np.ceil(fx / 2)) + 1, int(np.ceil(fy / 2)) + 1
    padded = np.pad(r, ((py, py), (px, px)), mode="edge")
    box = (px + (i0 - x0) * fx, py + (j0 - y0) * fy, px + (i1 - x0) * fx, py + (j1 - y0) * fy)
    resampled = Image.fromarray(padded.astype(np.float32), "F").resize((i1 - i0, j1 - j0), Image.Resampling.BILINEAR,
                                                                       box=box)
    out[j0:j1, i0:i1] = np.asarray(resampled, np.float32)
    return out


def unexplained(image) -> np.ndarray:
    """How pixels outside the model's crop are drawn: the photo under grey diagonal stripes. float32 [H, W, 3]."""
    base = _rgb(image)
    y, x = np.indices(base.shape[:2])
    period = max(HATCH_PERIOD, max(base.shape[:2]) // 80)
    stripe = ((x + y) % period < max(1, round(HATCH_WIDTH * period)))[..., None]
    return np.where(stripe, base * (1 - HATCH_MIX) + HATCH_GREY * HATCH_MIX, base)


def photo_overlay(pmap: np.ndarray, photo, scale: ColourScale, strength: float = OVERLAY_STRENGTH) -> Image.Image:
    """`overlay` at the photo's resolution: `pmap` from `photo_map`; its NaN pixels (outside the crop) are drawn
    by `unexplained`, whatever the relevance."""
    base = _rgb(photo)
    if base.shape[:2] != pmap.shape:
        raise ValueError(f"photo is {base.shape[1]}x{base.shape[0]}, map {pmap.shape[1]}x{pmap.shape[0]}")
    inside = np.isfinite(pmap)
    values = np.where(inside, pmap, 0.0)
    alpha = (strength * scale.magnitude(values))[..., None]
    blended = base * (1 - alpha) + scale.colours(values) * alpha
    return Image.fromarray(_uint8(np.where(inside[..., None], blended, unexplained(photo))))


def photo_heatmap(pmap: np.ndarray, scale: ColourScale) -> Image.Image:
    """`heatmap` at the photo's resolution, RGBA: transparent outside the crop."""
    inside = np.isfinite(pmap)
    rgb = scale.colours(np.where(inside, pmap, 0.0))
    alpha = np.where(inside, 255.0, 0.0)[..., None]
    return Image.fromarray(_uint8(np.concatenate([np.where(inside[..., None], rgb, 0.0), alpha], axis=-1)), "RGBA")


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
