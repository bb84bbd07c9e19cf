"""Run an exported explainer with onnxruntime alone, so that explaining and serving need no torch.

`load(path)` opens the ONNX file written by `Explainer.export_onnx`, reads the metadata the compiler stored in
it (input size, preprocessing, labels) and returns an `ExplainerSession` that preprocesses images the way the
model expects and returns `Explanation`s.
"""
from __future__ import annotations

import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Union

import numpy as np
import onnxruntime as ort
from PIL import Image, UnidentifiedImageError

from .conservation import CONSERVATION_TOLERANCE, array_departures
from .errors import (ExplainerLoadError, ImageError, InputError, NonFiniteRelevanceError, NotConservedError,
                     RelevanceCheckError)
from .preprocessing import Preprocessing

ImageSource = Union[str, os.PathLike, bytes, Image.Image]
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
INPUTS = ("input", "target")
OUTPUTS = ("logits", "relevance")


@dataclass
class Explanation:
    """One sample's result. `target` is the class that was explained (the prediction when -1 was asked)."""

    logits: np.ndarray  # [K]
    probabilities: np.ndarray  # [K], softmax of logits
    predicted: int
    target: int
    relevance: np.ndarray  # [C, H, W], same layout as the input
    input: np.ndarray  # [C, H, W], the normalised input that was explained

    @property
    def relevance_map(self) -> np.ndarray:
        """[H, W]: relevance summed over channels, what heatmaps show."""
        return self.relevance.sum(axis=0)

    def topk(self, k: int = 5) -> list[tuple[int, float]]:
        """The k most probable classes as (index, probability), most probable first."""
        order = np.argsort(-self.probabilities, kind="stable")[:k]
        return [(int(i), float(self.probabilities[i])) for i in order]


def load(path: str | os.PathLike, providers: str | None = None, threads: int | None = None) -> "ExplainerSession":
    """Open an explainer ONNX file. `providers`: "cpu", "cuda", or None for CUDA when available, else CPU.
    `threads` caps onnxruntime's intra-op threads (default: onnxruntime's choice, all cores)."""
    path = Path(path)
    if not path.is_file():
        raise ExplainerLoadError(f"{path}: no such file")
    chosen = _providers(providers)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), options, providers=chosen)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise ExplainerLoadError(f"{path}: onnxruntime cannot load it: {e}") from e
    if providers == "cuda" and PROVIDERS["cuda"] not in session.get_providers():
        raise ExplainerLoadError("onnxruntime could not start the CUDA execution provider (check the CUDA/cuDNN "
                                 "installation), or use --provider cpu")
    return ExplainerSession(session, path)


def _providers(choice: str | None) -> list[str]:
    available = ort.get_available_providers()
    if choice is None:
        return [p for p in (PROVIDERS["cuda"], PROVIDERS["cpu"]) if p in available]
    if choice not in PROVIDERS:
        raise ExplainerLoadError(f"unknown provider {choice!r}; use one of {', '.join(PROVIDERS)}")
    if PROVIDERS[choice] not in available:
        raise ExplainerLoadError(f"the {choice.upper()} execution provider is not available in this onnxruntime "
                                 f"(available: {', '.join(available)}); install onnxruntime-gpu for CUDA")
    return [PROVIDERS[choice]]


class ExplainerSession:
    """An onnxruntime session over an explainer file, plus the preprocessing its metadata describes.
    Safe to share between threads: onnxruntime sessions are."""

    def __init__(self, session: ort.InferenceSession, path: Path):
        self.session, self.path = session, path
        names = {i.name for i in session.get_inputs()}, {o.name for o in session.get_outputs()}
        missing = [n for n in INPUTS if n not in names[0]] + [n for n in OUTPUTS if n not in names[1]]
        if missing:
            raise ExplainerLoadError(f"{path}: not a graphlrp explainer (no {', '.join(missing)}); "
                                     "compile one with `graphlrp compile`")
        self.metadata = _parse_metadata(session.get_modelmeta().custom_metadata_map, path)
        input_shape = next(i.shape for i in session.get_inputs() if i.name == "input")
        self.input_size: tuple[int, ...] = tuple(self.metadata.get("input_size") or input_shape[1:])
        self.takes_images = len(self.input_size) == 3  # [C, H, W]; else arrays only (a token or signal model)
        self.labels: list[str] | None = self.metadata.get("labels")
        self.preprocessing = Preprocessing.from_dict(self.metadata.get("preprocessing") or {}, self.input_size)
        # a float32 explainer of a conserving preset checks every sample's conservation (float16 rounds beyond it)
        certificate = self.metadata.get("certificate") or {}
        self.conserving = bool(certificate.get("conserving")) and self.metadata.get("precision", "fp32") == "fp32"
        if self.takes_images and tuple(self.preprocessing.crop) != tuple(self.input_size[1:]):
            raise ExplainerLoadError(f"{path}: metadata crops to {list(self.preprocessing.crop)} but the model takes "
                                     f"{list(self.input_size[1:])}")
        if len(self.preprocessing.mean) != self.input_size[0]:
            raise ExplainerLoadError(f"{path}: metadata normalises {len(self.preprocessing.mean)} channels but the "
                                     f"model takes {self.input_size[0]}")
        self.mean = np.asarray(self.preprocessing.mean, np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(self.preprocessing.std, np.float32).reshape(-1, 1, 1)
        logits_shape = next(o.shape for o in session.get_outputs() if o.name == "logits")
        k = logits_shape[-1]
        self.num_classes: int | None = k if isinstance(k, int) else (len(self.labels) if self.labels else None)

    def __repr__(self):
        return f"ExplainerSession({str(self.path)!r}, input_size={self.input_size}, classes={self.num_classes})"

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def set_labels(self, labels) -> None:
        """Replace the stored class names: a list, or a labels file (one name per line, in class order). A count
        that does not match the classes is an error."""
        from .labels import check_labels
        from .preprocessing import read_labels

        if isinstance(labels, (str, os.PathLike)):
            labels = read_labels(labels)
        self.labels = check_labels(labels, self.num_classes, strict=True)

    def label(self, index: int) -> str | None:
        return self.labels[index] if self.labels and 0 <= index < len(self.labels) else None

    # -- images ---------------------------------------------------------------------------------------------

    @property
    def resize(self) -> int | None:
        return self.preprocessing.resize

    @property
    def crop(self) -> tuple[int, int]:
        return tuple(self.preprocessing.crop)

    def preprocess(self, image: ImageSource) -> np.ndarray:
        """Image (PIL image, path or encoded bytes) -> normalised float32 [C, H, W], exactly as the metadata's
        `preprocessing` says: resize (with its interpolation) and crop, scale to [0, 1], subtract mean, divide by
        std. An image already at the input size is used as it is."""
        return self.normalise(self.prepare_image(image))

    def prepare_image(self, image: ImageSource) -> Image.Image:
        """Decode, convert and resize/crop an image to the model's input geometry, before normalisation."""
        if not self.takes_images:
            raise InputError(f"this explainer takes arrays of shape {list(self.input_size)}, not images")
        im = open_image(image)
        return self.preprocessing.apply(im.convert("L" if self.input_size[0] == 1 else "RGB"))

    def upscale(self, image: ImageSource) -> float:
        """How much preprocessing enlarges this image (1.0: not enlarged). Explaining a small image blown up
        many times explains interpolated pixels; `graphlrp explain` warns above 2x."""
        size = image.size if isinstance(image, Image.Image) else open_image(image).size
        return self.preprocessing.upscale(size)

    def normalise(self, image: Image.Image) -> np.ndarray:
        x = np.asarray(image, dtype=np.float32) / 255.0
        x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
        return np.ascontiguousarray((x - self.mean) / self.std, dtype=np.float32)

    def to_rgb(self, x: np.ndarray) -> np.ndarray:
        """Normalised [C, H, W] -> uint8 [H, W, 3]: undo the normalisation, e.g. to draw an overlay on it."""
        pixels = np.clip((x * self.std + self.mean) * 255.0 + 0.5, 0, 255).astype(np.uint8).transpose(1, 2, 0)
        return np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels

    # -- explaining -----------------------------------------------------------------------------------------

    def prepare(self, x: np.ndarray, target=None) -> tuple[np.ndarray, np.ndarray]:
        """Check and batch inputs: x [N, C, H, W] or [C, H, W] -> float32 [N, C, H, W]; target None (top-1),
        an int for every sample, or one per sample -> int64 [N]. Raises InputError."""
        x = _as_array(x)
        rank = len(self.input_size)
        if x.ndim not in (rank, rank + 1) or tuple(x.shape[-rank:]) != self.input_size:
            if self.takes_images:
                raise InputError(f"input has shape {list(x.shape)}; this explainer takes [C, H, W] or [N, C, H, W] "
                                 f"with C, H, W = {list(self.input_size)}")
            raise InputError(f"input has shape {list(x.shape)}; this explainer takes {list(self.input_size)} or "
                             f"[N, {', '.join(map(str, self.input_size))}]")
        if x.ndim == rank:
            x = x[None]
        if not np.isfinite(x).all():
            raise InputError("input contains NaN or infinite values")
        return np.ascontiguousarray(x), self._targets(target, len(x))

    def _targets(self, target, n: int) -> np.ndarray:
        t = np.full(n, -1 if target is None else 0, np.int64)
        if target is not None:
            values = np.asarray(target)
            if values.dtype.kind not in "iu" or values.ndim > 1 or (values.ndim == 1 and len(values) != n):
                raise InputError(f"target must be an integer class or {n} of them, got {target!r}")
            t[:] = values
        bad = t[(t < -1) | (t >= self.num_classes)] if self.num_classes else t[t < -1]
        if len(bad):
            raise InputError(f"unknown target class {int(bad[0])}: this explainer has {self.num_classes} classes "
                             f"(0..{(self.num_classes or 0) - 1}); use -1 for the predicted class")
        return t

    def run(self, x: np.ndarray, target: np.ndarray) -> list[Explanation]:
        """One onnxruntime call on inputs already checked by `prepare`. Raises NonFiniteRelevanceError where a
        sample's relevance is NaN or infinite, and for an explainer of a conserving preset NotConservedError where
        a sample's ΣR_in departs from R_out by more than 1e-3 (`graphlrp.conservation`)."""
        results = self.run_each(x, target)
        failed = [r for r in results if isinstance(r, RelevanceCheckError)]
        if failed:
            raise failed[0]
        return results

    def run_each(self, x: np.ndarray, target: np.ndarray) -> list[Explanation | RelevanceCheckError]:
        """`run`, with the error in the place of a sample whose relevance fails its check (the server fails that
        request, not the others of its batch)."""
        logits, relevance = self.session.run(list(OUTPUTS), {"input": x, "target": target})
        probabilities = softmax(logits)
        predicted = logits.argmax(axis=1)
        not_conserved = (array_departures(logits, relevance, target, self.metadata.get("output_relevance", "logit"))
                         if self.conserving else {})
        out: list[Explanation | RelevanceCheckError] = []
        for i in range(len(x)):
            bad = int((~np.isfinite(relevance[i])).sum())
            if bad:
                out.append(NonFiniteRelevanceError(
                    f"the explainer's relevance is not finite for sample {i} ({bad} of {relevance[i].size} entries "
                    "NaN or infinite): a rule divided by a denominator that is exactly 0 on this input. The "
                    "explainer cannot explain it; one compiled with otsuki2024-conserving (z⁺ with dead units spread) "
                    "divides only where its denominator is not 0"))
                continue
            if i in not_conserved:
                out.append(NotConservedError(
                    f"sample {i}: the explainer's preset ({self.metadata.get('preset')}) declares itself conserving, "
                    f"but on this input ΣR_in / R_out = {not_conserved[i]:.6g} (limit |ratio − 1| ≤ "
                    f"{CONSERVATION_TOLERANCE:g}; it conserved on its compile example). The map would not add up "
                    "to the prediction, so none is returned; the PyTorch explainer names the node where it departs"))
                continue
            out.append(Explanation(logits[i], probabilities[i], int(predicted[i]),
                                   int(predicted[i] if target[i] < 0 else target[i]), relevance[i], x[i]))
        return out

    def explain(self, x: np.ndarray, target=None) -> Explanation | list[Explanation]:
        """Explain normalised input: one Explanation for [C, H, W], a list for [N, C, H, W] (for an explainer of
        other arrays: one for its input shape, a list for a batch of them).
        `target`: None explains each prediction; an int or per-sample ints (-1 = predicted) pick classes."""
        x = _as_array(x)
        single = x.ndim == len(self.input_size)
        explanations = self.run(*self.prepare(x, target))
        return explanations[0] if single else explanations

    def explain_images(self, images: Iterable[ImageSource], target=None, batch_size: int = 8) -> list[Explanation]:
        """Preprocess and explain images in batches of `batch_size`. Raises ImageError naming an unreadable one."""
        images = list(images)
        targets = self._targets(target, len(images))
        out: list[Explanation] = []
        for start in range(0, len(images), batch_size):
            batch = np.stack([self.preprocess(im) for im in images[start:start + batch_size]])
            out += self.run(batch, targets[start:start + batch_size])
        return out


def _as_array(x) -> np.ndarray:
    try:
        return np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError):
        raise InputError("input is not a numeric array (nested lists of equal lengths, numbers only)") from None


def open_image(source: ImageSource) -> Image.Image:
    """Open and fully decode an image, so that truncated or corrupt files fail here with an ImageError."""
    if isinstance(source, Image.Image):
        return source
    name = "uploaded image" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        with warnings.catch_warnings():  # PIL's warning for a large image: the size check below refuses it instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        if Image.MAX_IMAGE_PIXELS and im.width * im.height > Image.MAX_IMAGE_PIXELS:
            raise ImageError(f"{name}: {im.width}x{im.height} pixels is too large to explain")
        im.load()
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not a readable image (unknown or corrupt format)") from None
    except Image.DecompressionBombError as e:  # over twice PIL's limit: it refuses before the size is known here
        raise ImageError(f"{name}: too large to explain ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: cannot read image ({getattr(e, 'strerror', None) or e})") from None
    return im


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _parse_metadata(raw: dict[str, str], path: Path) -> dict:
    """metadata_props hold strings; the structured ones are JSON, the flags "true"/"false"."""
    meta: dict = dict(raw)
    for key in ("input_size", "preprocessing", "labels", "certificate"):
        if key in meta:
            try:
                meta[key] = json.loads(meta[key])
            except json.JSONDecodeError as e:
                raise ExplainerLoadError(f"{path}: metadata {key!r} is not valid JSON: {e}") from None
    if "include_identity" in meta:
        meta["include_identity"] = meta["include_identity"] == "true"
    return meta
