"""Image sets for the evaluation: an `.npz` like ../shared/assets/cifar10-test-dev.npz, or a folder of images with
a labels file. Images come back in [0, 1] RGB because the protocol masks pixels before normalising."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import EvaluationError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}


@dataclass
class ImageSet:
    images: torch.Tensor  # float32 [N, 3, H, W] in [0, 1]
    labels: torch.Tensor  # int64 [N]
    classes: list[str] | None
    source: str

    def __len__(self) -> int:
        return len(self.labels)


def load_image_set(path: str, preprocessing, labels_file: str | None = None, limit: int | None = None) -> ImageSet:
    """Read `path`: an .npz holds images as the model should see them and is used as stored; the images of a folder
    come in any size and get the model's own preprocessing geometry (`preprocessing`: a `Preprocessing` record,
    whose resize, interpolation and crop are applied exactly as `explain` and the runtime apply them; or an input
    size [H, W], meaning the default ImageNet crop ratio at that size)."""
    from ..preprocessing import Preprocessing, default

    if not isinstance(preprocessing, Preprocessing):
        preprocessing = default(tuple(preprocessing))
    p = Path(path)
    if p.is_dir():
        images, labels, classes = _read_folder(p, Path(labels_file) if labels_file else None, limit)
        images = [_to_tensor(preprocessing.apply(im)) for im in images]
    elif p.is_file() and p.suffix == ".npz":
        images, labels, classes = _read_npz(p, limit)
    else:
        raise EvaluationError(f"--data must be an .npz file or an image folder with labels.txt: {path}")
    if not len(images):
        raise EvaluationError(f"no images in {path}")
    return ImageSet(torch.stack(list(images)).contiguous(), torch.as_tensor(labels, dtype=torch.int64), classes,
                    str(path))


def _to_tensor(im) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)


def _read_npz(path: Path, limit):
    with np.load(path, allow_pickle=False) as d:
        if "images" not in d or "labels" not in d:
            raise EvaluationError(f"{path} needs arrays 'images' and 'labels' (has {sorted(d.files)})")
        images, labels = d["images"][:limit], d["labels"][:limit]
        classes = [str(c) for c in d["classes"]] if "classes" in d else None
    if images.ndim != 4 or 3 not in (images.shape[1], images.shape[-1]) or len(images) != len(labels):
        raise EvaluationError(f"{path}: 'images' must be [N, H, W, 3] or [N, 3, H, W] with one label each, "
                              f"got {images.shape} and {labels.shape}")
    x = torch.from_numpy(images)
    if images.shape[-1] == 3 and images.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    return (x.float() / 255 if images.dtype == np.uint8 else x.float()), labels, classes


def _read_folder(folder: Path, labels_file: Path | None, limit):
    """labels.txt (or `labels_file`): one `<image file> <class index>` per line, relative to the folder; blank
    lines and `#` comments are ignored. A `classes.txt` next to it (one name per line) names the classes."""
    from PIL import Image

    labels_file = labels_file or folder / "labels.txt"
    if not labels_file.is_file():
        raise EvaluationError(f"{folder} has no labels file: write `<image> <class index>` lines to "
                              f"{folder / 'labels.txt'} or pass --labels")
    entries = []
    for n, line in enumerate(labels_file.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, label = line.replace(",", " ").rpartition(" ")
        if not name.strip() or not label.isdigit():
            raise EvaluationError(f"{labels_file}:{n}: expected `<image file> <class index>`, got {line!r}")
        entries.append((folder / name.strip(), int(label)))
    images, labels = [], []
    for file, label in entries:
        if limit is not None and len(images) >= limit:
            break
        try:
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                raise ValueError(f"not an image file name (expected one of {', '.join(sorted(IMAGE_SUFFIXES))})")
            with Image.open(file) as im:
                image = im.convert("RGB")
        except (OSError, ValueError, SyntaxError) as e:  # missing, unreadable or corrupt: say so, go on
            print(f"skipping {file}: {e}", file=sys.stderr)
            continue
        images.append(image)
        labels.append(label)
    names = folder / "classes.txt"
    classes = [c.strip() for c in names.read_text().splitlines() if c.strip()] if names.is_file() else None
    return images, labels, classes
