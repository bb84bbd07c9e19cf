"""`graphlrp explain --figure`: one PNG per image with the photo, the overlay and the heatmap at the photo's
resolution, a colour bar that says which map it is, the class name and probability, and the preset.

matplotlib's object API on the Agg canvas (no pyplot, no global state), so it is safe in worker threads and
processes; imported only when a figure is asked for."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .heatmap import ColourScale, photo_overlay


def build(photo: Image.Image, pmap: np.ndarray, scale: ColourScale, title: str, notes: str = ""):
    """The figure and its parts: {"axes": (photo, overlay, heatmap), "colorbar", "title", "notes"} (matplotlib
    objects). `pmap` is `heatmap.photo_map` of the photo; its NaN pixels (outside the crop) are hatched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    h, w = pmap.shape
    panel = 4.0  # inches per panel's width
    fig = Figure(figsize=(3 * panel + 1.0, panel * h / w + 1.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    rgb = photo.convert("RGB")
    axes[0].imshow(rgb)
    axes[0].set_title("photo")
    axes[1].imshow(photo_overlay(pmap, rgb, scale))
    axes[1].set_title("overlay")
    cmap = _cmap(scale.cmap)
    shown = axes[2].imshow(np.ma.masked_invalid(pmap), cmap=cmap, norm=Normalize(scale.vmin, scale.vmax),
                           interpolation="antialiased", zorder=1)
    axes[2].add_patch(Rectangle((-0.5, -0.5), w, h, hatch="///", facecolor="none", edgecolor="0.65", linewidth=0,
                                zorder=0))
    axes[2].set_title("heatmap")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    colorbar = fig.colorbar(shown, ax=list(axes), orientation="horizontal", fraction=0.05, aspect=50)
    colorbar.set_label(f"relevance: {scale.describe()}")
    heading = fig.suptitle(title, fontsize="large")
    footer = fig.supxlabel(notes, fontsize="small") if notes else None  # laid out below the colour bar
    return fig, {"axes": tuple(axes), "colorbar": colorbar, "title": heading, "notes": footer}


def _cmap(name: str):
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad=(0.0, 0.0, 0.0, 0.0))  # outside the crop: transparent, the hatch
    # shows through


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
