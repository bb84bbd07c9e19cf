"""Per-image work of `graphlrp explain`, shared by the local loop (graphlrp/commands/explain.py) and the Ray
workers (graphlrp/engines/ray.py): an image decoded and preprocessed for a session, the files written for its
explanation, and the line that reports it. Both paths call these, so both explain the same pixels and write and
report the same things."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from . import heatmap
from .errors import ImageError

UPSCALE_WARNING = 2.0  # warn when an image is enlarged more than this


def load_image(session, source, name: str) -> tuple[np.ndarray, str | None, Image.Image]:
    """Decode and preprocess one image (a path, or the file's bytes as Ray Data reads them) for `session`: the
    model's input, the upscale warning if it has one, and the decoded photo (for pictures at its resolution).
    Raises ImageError naming `name`. The local loop and the Ray workers both call this, so both explain the same
    pixels and report the same things."""
    from .runtime import open_image

    try:
        image = open_image(source)
        array = session.preprocess(image)
    except ImageError as e:
        generic = "uploaded image"  # how the runtime names an image given as bytes
        text = str(e)
        raise ImageError(name + text[len(generic):] if text.startswith(generic) else text) from None
    factor = session.upscale(image)
    if factor <= UPSCALE_WARNING:
        return array, None, image
    return array, (f"warning: {name} is {image.width}x{image.height}; preprocessing enlarges it {factor:.1f}x to "
                   f"explain {session.crop[0]}x{session.crop[1]} pixels, so the heatmap explains interpolated "
                   "pixels"), image


def write_outputs(out: Path, stem: str, exp, session, photo: Image.Image | None = None, figure: bool = False,
                  cmap: str | None = None) -> None:
    """In `out`: <stem>_heatmap.png and <stem>_overlay.png at the model's input, <stem>_relevance.npy (raw
    [C, H, W] relevance); with the `photo`, <stem>_photo_heatmap.png (RGBA, transparent outside the crop),
    <stem>_photo_overlay.png and <stem>_photo_relevance.npz (the [h, w] map on the photo's pixels under the key
    "relevance", NaN outside the crop; compressed, as a photo's map can be tens of megabytes); with `figure`,
    <stem>_figure.png. One colour scale (`heatmap.ColourScale.of` the map, `cmap` if given) for all of them."""
    scale = heatmap.ColourScale.of(heatmap.relevance_map(exp.relevance), cmap)
    (out / f"{stem}_heatmap.png").write_bytes(heatmap.png_bytes(heatmap.heatmap(exp.relevance, scale)))
    overlay = heatmap.overlay(exp.relevance, session.to_rgb(exp.input), scale=scale)
    (out / f"{stem}_overlay.png").write_bytes(heatmap.png_bytes(overlay))
    np.save(out / f"{stem}_relevance.npy", exp.relevance)
    if photo is None:
        return
    photo = photo.convert("RGB")
    pmap = heatmap.photo_map(exp.relevance, session.preprocessing, photo.size)
    np.savez_compressed(out / f"{stem}_photo_relevance.npz", relevance=pmap)
    (out / f"{stem}_photo_heatmap.png").write_bytes(heatmap.png_bytes(heatmap.photo_heatmap(pmap, scale)))
    (out / f"{stem}_photo_overlay.png").write_bytes(heatmap.png_bytes(heatmap.photo_overlay(pmap, photo, scale)))
    if figure:
        from . import figure as figures

        fig, _ = figures.build(photo, pmap, scale, figure_title(session, exp), figure_notes(session))
        (out / f"{stem}_figure.png").write_bytes(figures.png_bytes(fig))


def class_name(session, k: int) -> str:
    """"tabby (281)", or "class 281" where the explainer has no labels."""
    label = session.label(k)
    return f"{label} ({k})" if label else f"class {k}"


def figure_title(session, exp) -> str:
    """The class explained and its probability (and the prediction where another class is explained), and the
    preset."""
    text = f"{class_name(session, exp.target)}: p = {_p(exp.probabilities[exp.target])}"
    if exp.target != exp.predicted:
        text += f" (predicted {class_name(session, exp.predicted)}, p = {_p(exp.probabilities[exp.predicted])})"
    return f"{text} · preset {session.metadata.get('preset', '?')}"


def _p(p: float) -> str:
    return f"{p:.3f}" if p >= 1e-3 else f"{p:.1e}"  # never "0.000" for a small but real probability


def figure_notes(session) -> str:
    """Model and preprocessing from the explainer's metadata, and what the hatching means."""
    meta = session.metadata
    model = meta.get("source_model") or session.path.name
    return (f"model {model} · {session.preprocessing.summary()} · hatched: outside the model's crop, "
            "not explained")


def describe(session, exp) -> str:
    """"predicted K (label) p=…", plus the explained target where it is not the predicted class."""
    def name(k):
        label = session.label(k)
        return f"{k} ({label})" if label else str(k)

    text = f"predicted {name(exp.predicted)} p={exp.probabilities[exp.predicted]:.3f}"
    return text if exp.target == exp.predicted else f"{text}; explained target {name(exp.target)}"
