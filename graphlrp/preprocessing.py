"""How an image becomes the model's input: one record, written into the explainer's metadata and applied by the
runtime exactly as written.

A wrong preprocessing gives a plausible-looking explanation of the wrong pixels, so graphlrp takes it from the
model whenever the model says: torchvision weights' `transforms()` (known without downloading the weights), timm's
`pretrained_cfg`, or attributes on a user's model (`input_size`, `mean`, `std`, `crop_pct`, `resize`,
`interpolation`, `crop_mode`, `labels`). Otherwise the usual ImageNet crop ratio is applied to the input size.
`--resize`, `--crop-pct`, `--interpolation`, `--mean` and `--std` override each part.

The geometry follows timm's and torchvision's evaluation transforms:
* `center`: resize the shorter side to `resize`, centre-crop `crop` (torchvision `Resize(int)` + `CenterCrop`);
* `squash`: resize both sides to ⌊crop / crop_pct⌋, centre-crop (timm `crop_mode="squash"`);
* `border`: resize the longer side to ⌊crop / crop_pct⌋, pad with the mean colour and centre-crop
  (timm `crop_mode="border"`).
An image that is already at the input size is used as it is.

This module imports neither torch nor timm at import time: the runtime uses it without them.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

from .errors import GraphLRPError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 0.875  # 224 / 256, torchvision's and timm's default
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
CROP_MODES = ("center", "squash", "border")


class PreprocessingError(GraphLRPError):
    """A preprocessing setting is malformed (unknown interpolation, wrong number of mean values, ...)."""


@dataclass(frozen=True)
class Preprocessing:
    """Everything needed to turn an image file into the model's normalised input.

    `crop` is the model's input size [H, W]; `resize` the shorter side before the crop (None: no resize, centre
    crop/pad only); `crop_pct` = crop / resize, recorded so the intent survives a change of input size."""

    crop: tuple[int, int] = (224, 224)
    resize: int | None = 256
    crop_pct: float | None = DEFAULT_CROP_PCT
    crop_mode: str = "center"
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    source: str = "default"  # where it came from: torchvision, timm, model attributes, default, overrides
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise PreprocessingError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                                     f"got {self.interpolation!r}")
        if self.crop_mode not in CROP_MODES:
            raise PreprocessingError(f"crop_mode must be one of {', '.join(CROP_MODES)}, got {self.crop_mode!r}")
        if len(self.crop) != 2 or min(self.crop) < 1:
            raise PreprocessingError(f"crop must be [H, W] with positive sizes, got {list(self.crop)}")
        if self.resize is not None and self.resize < 1:
            raise PreprocessingError(f"resize must be a positive number of pixels, got {self.resize}")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 4:
            raise PreprocessingError(f"crop_pct must be in (0, 4], got {self.crop_pct}")
        if len(self.mean) != len(self.std) or not self.mean:
            raise PreprocessingError(f"mean and std need one value per channel, got {list(self.mean)} and "
                                     f"{list(self.std)}")
        if any(s <= 0 for s in self.std):
            raise PreprocessingError(f"std values must be positive, got {list(self.std)}")

    # -- records -------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The metadata record (JSON-ready)."""
        d = asdict(self)
        d.pop("extra")
        d["crop"], d["mean"], d["std"] = list(self.crop), list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict, input_size: Sequence[int] | None = None) -> "Preprocessing":
        """Read a metadata record. Records written before interpolation/crop mode were stored mean bilinear,
        centre crop."""
        crop = tuple(int(v) for v in (d.get("crop") or (input_size or (224, 224))[-2:]))
        channels = len(d["mean"]) if d.get("mean") else 3
        return cls(crop=crop, resize=None if d.get("resize") is None else int(d["resize"]),
                   crop_pct=None if d.get("crop_pct") is None else float(d["crop_pct"]),
                   crop_mode=str(d.get("crop_mode") or "center"),
                   interpolation=str(d.get("interpolation") or "bilinear").lower(),
                   mean=tuple(float(v) for v in d.get("mean") or (0.0,) * channels),
                   std=tuple(float(v) for v in d.get("std") or (1.0,) * channels),
                   source=str(d.get("source") or "metadata"))

    def at_size(self, size: Sequence[int]) -> "Preprocessing":
        """The same preprocessing for another input size [H, W]: the crop ratio is kept, so a model told to look
        at 64 pixels resizes to ⌊64 / crop_pct⌋ first."""
        size = (int(size[0]), int(size[1]))
        if size == tuple(self.crop):
            return self
        if self.crop_pct:
            resize = scale_size(min(size), self.crop_pct)
        elif self.resize:
            resize = max(min(size), round(min(size) * self.resize / min(self.crop)))
        else:
            resize = None
        return replace(self, crop=size, resize=resize)

    def with_overrides(self, resize: int | None = None, crop_pct: float | None = None,
                       interpolation: str | None = None, mean: Sequence[float] | None = None,
                       std: Sequence[float] | None = None, crop_mode: str | None = None) -> "Preprocessing":
        """Apply the user's explicit choices; `resize` wins over `crop_pct` when both are given."""
        changes: dict[str, Any] = {}
        if crop_pct is not None:
            changes.update(crop_pct=float(crop_pct), resize=scale_size(min(self.crop), float(crop_pct)))
        if resize is not None:
            changes.update(resize=int(resize), crop_pct=min(self.crop) / int(resize))
        if interpolation is not None:
            changes["interpolation"] = str(interpolation).lower()
        if crop_mode is not None:
            changes["crop_mode"] = crop_mode
        if mean is not None:
            changes["mean"] = tuple(float(v) for v in mean)
        if std is not None:
            changes["std"] = tuple(float(v) for v in std)
        if not changes:
            return self
        return replace(self, **changes, source=f"{self.source} + overrides")

    def summary(self) -> str:
        """One line: "resize 256 (bilinear), center crop 224x224" (what pictures and the serve page show)."""
        resize = f"resize {self.resize} ({self.interpolation}), " if self.resize else ""
        return f"{resize}{self.crop_mode} crop {self.crop[0]}x{self.crop[1]}"

    # -- geometry ------------------------------------------------------------------------------------------

    def resized_size(self, size: tuple[int, int]) -> tuple[int, int] | None:
        """(w, h) that an image of (w, h) pixels is resized to before the crop; None: used without resizing."""
        w, h = size
        ch, cw = self.crop
        if (h, w) == (ch, cw):
            return None
        if self.crop_mode == "squash":
            pct = self.crop_pct or min(self.crop) / (self.resize or min(self.crop))
            return scale_size(cw, pct), scale_size(ch, pct)
        if self.crop_mode == "border":
            pct = self.crop_pct or min(self.crop) / (self.resize or min(self.crop))
            target_h, target_w = scale_size(ch, pct), scale_size(cw, pct)
            ratio = max(h / target_h, w / target_w)  # the longer side (relative to the target) fits
            return max(1, round(w / ratio)), max(1, round(h / ratio))
        if not self.resize:
            return None
        return shorter_side_to(size, self.resize)

    def apply(self, im):
        """Resize (with this record's interpolation) and crop a PIL image to the model's input geometry, before
        normalisation: what the runtime, `explain`, `serve` and `evaluate` on image folders all do."""
        resized = self.resized_size(im.size)
        if resized is None:
            return center_crop(im, self.crop) if (im.height, im.width) != tuple(self.crop) else im
        im = im.resize(resized, resampling(self.interpolation))
        if self.crop_mode == "border" and (im.width < self.crop[1] or im.height < self.crop[0]):
            fill = tuple(round(255 * m) for m in self.mean)
            im = pad_to(im, self.crop, fill[0] if im.mode == "L" else fill)
        return center_crop(im, self.crop)

    def crop_window(self, size: tuple[int, int]) -> tuple[float, float, float, float]:
        """Where the model's input lies on an image of (w, h) pixels: (left, top, right, bottom) in the image's
        pixel coordinates (pixel i spans [i, i + 1)), the inverse of `apply`'s resize, pad and crop. The window
        reaches beyond the image where the crop pads it (`border` mode, or an image smaller than the crop); input
        pixel (row r, column c) is centred at (left + (c + 0.5) * (right - left) / W, top + (r + 0.5) *
        (bottom - top) / H) for an input of [H, W]."""
        w, h = size
        ch, cw = self.crop
        rw, rh = self.resized_size(size) or (w, h)
        px = py = 0  # where the resized image sits on the padded canvas
        if self.crop_mode == "border" and self.resized_size(size) is not None and (rw < cw or rh < ch):
            px, py = (max(cw, rw) - rw) // 2, (max(ch, rh) - rh) // 2
            canvas_w, canvas_h = max(cw, rw), max(ch, rh)
        else:
            canvas_w, canvas_h = rw, rh
        left = int(round((canvas_w - cw) / 2.0)) - px  # center_crop's offsets, on the resized image
        top = int(round((canvas_h - ch) / 2.0)) - py
        sx, sy = w / rw, h / rh
        return left * sx, top * sy, (left + cw) * sx, (top + ch) * sy

    def upscale(self, size: tuple[int, int]) -> float:
        """How much an image of (w, h) pixels is enlarged (1.0 when not resized or when shrunk)."""
        resized = self.resized_size(size)
        if resized is None:
            return 1.0
        return max(1.0, min(resized[0] / size[0], resized[1] / size[1]))


def resampling(interpolation: str):
    """PIL's resampling filter for an interpolation name."""
    from PIL import Image

    return getattr(Image.Resampling, interpolation.upper())


def pad_to(im, size: Sequence[int], fill):
    """Pad a PIL image to at least [H, W], centred, with `fill` (timm's CenterCropOrPad)."""
    from PIL import Image

    h, w = max(size[0], im.height), max(size[1], im.width)
    canvas = Image.new(im.mode, (w, h), fill)
    canvas.paste(im, ((w - im.width) // 2, (h - im.height) // 2))
    return canvas


def center_crop(im, size: Sequence[int]):
    """Crop the central [H, W] region of a PIL image; pads with black when the image is smaller (like
    torchvision)."""
    h, w = size
    left, top = int(round((im.width - w) / 2.0)), int(round((im.height - h) / 2.0))
    return im.crop((left, top, left + w, top + h))


def scale_size(crop: int, crop_pct: float) -> int:
    """⌊crop / crop_pct⌋, as timm computes the resize before the crop (224 / 0.875 = 256, 224 / 0.95 = 235)."""
    return int(math.floor(crop / crop_pct + 1e-9))


def shorter_side_to(size: tuple[int, int], short: int) -> tuple[int, int]:
    """(w, h) with the shorter side scaled to `short`, the longer one as torchvision's Resize(int) computes it."""
    w, h = size
    if w <= h:
        return short, int(short * h / w)
    return int(short * w / h), short


def default(size: Sequence[int] = (224, 224), channels: int = 3) -> Preprocessing:
    """No word from the model: the usual ImageNet crop ratio on the input size, ImageNet statistics."""
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,) * channels, (0.5,) * channels)
    size = (int(size[0]), int(size[1]))
    return Preprocessing(crop=size, resize=scale_size(min(size), DEFAULT_CROP_PCT), crop_pct=DEFAULT_CROP_PCT,
                         mean=mean, std=std, source="default")


# -- from the model ------------------------------------------------------------------------------------------

def from_torchvision(name: str) -> Preprocessing | None:
    """torchvision's own eval transforms for model `name` (its DEFAULT weights' `transforms()`). Building the
    transforms object reads only the weights' description, never the weights, so this works offline and with
    `--weights none` / `PATH`."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return None
    tr = weights.transforms()
    crop = getattr(tr, "crop_size", None)
    resize = getattr(tr, "resize_size", None)
    if not crop:
        return None
    crop = (int(crop[0]), int(crop[-1]))
    resize = int(resize[0]) if resize else None
    interpolation = getattr(getattr(tr, "interpolation", None), "value", "bilinear")
    return Preprocessing(crop=crop, resize=resize, crop_pct=(min(crop) / resize) if resize else None,
                         interpolation=str(interpolation).lower(), mean=tuple(float(v) for v in tr.mean),
                         std=tuple(float(v) for v in tr.std), source=f"torchvision {weights}")


def from_config(cfg: dict, source: str) -> Preprocessing | None:
    """timm's `pretrained_cfg` (input_size, crop_pct, crop_mode, mean, std, interpolation)."""
    size = cfg.get("input_size")
    if not size:
        return None
    crop = (int(size[-2]), int(size[-1]))
    crop_pct = float(cfg.get("crop_pct") or DEFAULT_CROP_PCT)
    channels = int(size[0]) if len(size) == 3 else 3
    fallback = default(crop, channels)
    return Preprocessing(crop=crop, resize=scale_size(min(crop), crop_pct), crop_pct=crop_pct,
                         crop_mode=str(cfg.get("crop_mode") or "center"),
                         interpolation=str(cfg.get("interpolation") or "bilinear").lower(),
                         mean=tuple(float(v) for v in cfg.get("mean") or fallback.mean),
                         std=tuple(float(v) for v in cfg.get("std") or fallback.std), source=source)


def from_model(model, channels: int = 3) -> Preprocessing | None:
    """What a model object says about its own preprocessing: timm's `pretrained_cfg` (also `default_cfg`), or
    plain attributes `input_size`, `mean`, `std`, `crop_pct`, `resize`, `interpolation`, `crop_mode`."""
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and cfg.get("input_size"):
            return from_config(cfg, f"timm pretrained_cfg ({cfg.get('architecture') or type(model).__name__})")
    size = getattr(model, "input_size", None)
    said = [a for a in ("input_size", "mean", "std", "crop_pct", "resize", "interpolation", "crop_mode")
            if getattr(model, a, None) is not None]
    if not said:
        return None
    if size is not None:
        size = tuple(int(v) for v in (size if hasattr(size, "__len__") else (size, size)))
        crop = size[-2:] if len(size) >= 2 else (size[0], size[0])
    else:
        crop = (224, 224)
    prep = default(crop, channels)
    return replace(prep.with_overrides(resize=_attr(model, "resize", int), crop_pct=_attr(model, "crop_pct", float),
                                       interpolation=_attr(model, "interpolation", str),
                                       crop_mode=_attr(model, "crop_mode", str), mean=_floats(model, "mean"),
                                       std=_floats(model, "std")),
                   source=f"model attributes ({', '.join(said)})")


def _attr(model, name, kind):
    value = getattr(model, name, None)
    return None if value is None else kind(value)


def _floats(model, name):
    value = getattr(model, name, None)
    if value is None:
        return None
    if hasattr(value, "flatten"):  # a tensor or an array
        value = value.flatten().tolist()
    return tuple(float(v) for v in (value if hasattr(value, "__len__") else (value,)))


def read_labels(path) -> list[str]:
    """A labels file: one class name per line, in class order. Blank lines at the end are ignored."""
    from pathlib import Path

    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise PreprocessingError(f"cannot read labels file {p}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise PreprocessingError(f"labels file {p} is not UTF-8 text") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise PreprocessingError(f"labels file {p} is empty: write one class name per line")
    return [line.strip() for line in lines]
