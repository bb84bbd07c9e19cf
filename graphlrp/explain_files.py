"""Per-image work of `graphlrp explain`, shared by the local loop (graphlrp/commands/explain.py) and the Ray
workers (graphlrp/engines/ray.py): an image decoded and preprocessed for a session, the files written for its
explanation, and the line that reports it. Both paths call these, so both explain the same pixels and write and
report the same things."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import heatmap
from .errors import ImageError

UPSCALE_WARNING = 2.0  # warn when an image is enlarged more than this


def load_image(session, source, name: str) -> tuple[np.ndarray, str | None]:
    """Decode and preprocess one image (a path, or the file's bytes as Ray Data reads them) for `session`, and the
    upscale warning if it has one. Raises ImageError naming `name`. The local loop and the Ray workers both call
    this, so both explain the same pixels and report the same things."""
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
        return array, None
    return array, (f"warning: {name} is {image.width}x{image.height}; preprocessing enlarges it {factor:.1f}x to "
                   f"explain {session.crop[0]}x{session.crop[1]} pixels, so the heatmap explains interpolated pixels")


def write_outputs(out: Path, stem: str, exp, session) -> None:
    """<stem>_heatmap.png, <stem>_overlay.png and <stem>_relevance.npy (raw [C, H, W] relevance) in `out`."""
    (out / f"{stem}_heatmap.png").write_bytes(heatmap.png_bytes(heatmap.heatmap(exp.relevance)))
    overlay = heatmap.overlay(exp.relevance, session.to_rgb(exp.input))
    (out / f"{stem}_overlay.png").write_bytes(heatmap.png_bytes(overlay))
    np.save(out / f"{stem}_relevance.npy", exp.relevance)


def describe(session, exp) -> str:
    """"predicted K (label) p=…", plus the explained target where it is not the predicted class."""
    def name(k):
        label = session.label(k)
        return f"{k} ({label})" if label else str(k)

    text = f"predicted {name(exp.predicted)} p={exp.probabilities[exp.predicted]:.3f}"
    return text if exp.target == exp.predicted else f"{text}; explained target {name(exp.target)}"
