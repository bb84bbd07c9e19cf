"""`graphlrp explain MODEL.onnx INPUT... -o DIR`: heatmaps, overlays and raw relevance for image files.

INPUTs are files, folders (every file in them) or glob patterns. Unreadable images are reported by name and skipped
so that one bad file does not cost a whole run; the exit code (1) still tells scripts that something was skipped.
With `--ray` the same work runs on Ray (graphlrp/engines/ray.py); without it Ray is never imported."""
from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import GraphLRPError, ImageError
from ..explain_files import UPSCALE_WARNING, describe, load_image, write_outputs  # noqa: F401
from ._types import add_ray_arguments, positive_int


def register(sub) -> None:
    p = sub.add_parser("explain", help="explain images with a compiled explainer (.onnx)",
                       description="For each image: <stem>_photo_overlay.png and <stem>_photo_heatmap.png at the "
                                   "photo's resolution (the part outside the model's crop hatched or transparent: not "
                                   "explained), <stem>_photo_relevance.npz (that map under the key \"relevance\", NaN "
                                   "outside the crop), "
                                   "<stem>_heatmap.png and <stem>_overlay.png at the model's input, "
                                   "<stem>_relevance.npy (raw [C, H, W] relevance), and with --figure "
                                   "<stem>_figure.png. Colours: a diverging map with symmetric limits where the "
                                   "relevance has both signs, a sequential one where it has one sign.")
    p.add_argument("model", help="explainer ONNX file from `graphlrp compile`")
    p.add_argument("images", nargs="+", metavar="INPUT",
                   help="image files, folders (every file in them and their subfolders) or glob patterns ('*.jpg')")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory (created if missing)")
    p.add_argument("--target", type=int, default=None, metavar="K",
                   help="class to explain for every image (default: each image's predicted class)")
    p.add_argument("--provider", choices=["cpu", "cuda"], default=None,
                   help="onnxruntime execution provider (default: CUDA when available, else CPU)")
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="B",
                   help="images per onnxruntime call (default 8)")
    p.add_argument("--figure", action="store_true",
                   help="also write <stem>_figure.png: photo, overlay, heatmap, colour bar, class name and "
                        "probability, preset")
    p.add_argument("--cmap", type=_cmap, default=None, metavar="NAME",
                   help="matplotlib colour map (default: bwr where relevance has both signs, Reds where it is >= 0, "
                        "Blues_r where it is <= 0); the limits follow the data either way")
    p.add_argument("--labels", metavar="FILE",
                   help="class names, one per line in class order (default: those stored in the explainer)")
    add_ray_arguments(p, "explanations (Ray Data reads the images; the table explanations.parquet is added)")
    p.set_defaults(func=run)


def _cmap(name: str) -> str:
    import argparse

    from ..errors import InputError
    from ..heatmap import check_cmap

    try:
        return check_cmap(name)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def run(args) -> int:
    from ..runtime import load

    args.images = expand_inputs(args.images)
    session = load(args.model, providers=args.provider)
    if args.labels:
        session.set_labels(args.labels)
    session.prepare(np.zeros(session.input_size, np.float32), args.target)  # reject an unknown --target up front
    out = Path(args.output)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GraphLRPError(f"cannot create output directory {out}: {e.strerror}") from None
    stems = _unique_stems(args.images)
    if args.ray is not None:
        from ..engines import ray as ray_engine

        _, skipped = ray_engine.explain(args.model, args.images, stems, out, target=args.target,
                                        provider=args.provider, batch_size=args.batch_size, address=args.ray,
                                        workers=args.workers, threads=args.threads, figure=args.figure,
                                        cmap=args.cmap, labels=session.labels if args.labels else None)
        return _report_skipped(skipped, len(args.images), out)
    skipped = 0
    with tqdm(total=len(args.images), unit="image", disable=True if len(args.images) < 2 else None) as bar:
        for start in range(0, len(args.images), args.batch_size):
            chunk = args.images[start:start + args.batch_size]
            good, arrays, photos = [], [], []
            for path in chunk:
                try:
                    array, warning, photo = load_image(session, path, path)
                except ImageError as e:
                    tqdm.write(f"skipped {e}", file=sys.stderr)
                    skipped += 1
                    continue
                arrays.append(array)
                photos.append(photo)
                good.append(path)
                if warning:
                    tqdm.write(warning, file=sys.stderr)
            if arrays:
                explained = session.run_each(*session.prepare(np.stack(arrays), args.target))
                for path, photo, exp in zip(good, photos, explained):
                    if isinstance(exp, Exception):  # its relevance is not finite: this image is skipped
                        tqdm.write(f"skipped {path}: {exp}", file=sys.stderr)
                        skipped += 1
                        continue
                    write_outputs(out, stems[path], exp, session, photo, figure=args.figure, cmap=args.cmap)
                    tqdm.write(f"{path}: {describe(session, exp)}")
            bar.update(len(chunk))
    return _report_skipped(skipped, len(args.images), out)


def _report_skipped(skipped: int, total: int, out: Path) -> int:
    if skipped:
        print(f"{skipped} of {total} image(s) skipped; outputs for the rest are in {out}", file=sys.stderr)
        return 1
    return 0


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files as given; a folder -> every file in it and its subfolders (hidden ones left out), sorted; a pattern
    that names no file -> its glob matches, sorted. Anything else is kept, to be reported as unreadable."""
    paths: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(str(p) for p in Path(item).rglob("*")
                           if p.is_file() and not any(part.startswith(".") for part in p.relative_to(item).parts))
            if not found:
                raise GraphLRPError(f"{item}: the folder holds no files")
        elif not os.path.exists(item) and glob.has_magic(item):
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not found:
                raise GraphLRPError(f"{item}: no file matches the pattern")
        else:
            found = [item]
        paths += found
    return paths


def _unique_stems(paths: list[str]) -> dict[str, str]:
    """File stem per path; repeated stems (a/x.png, b/x.jpg) get -2, -3... so no output overwrites another."""
    stems: dict[str, str] = {}
    used: set[str] = set()
    for path in paths:
        if path in stems:
            continue
        stem, n = Path(path).stem, 1
        while (candidate := stem if n == 1 else f"{stem}-{n}") in used:
            n += 1
        stems[path] = candidate
        used.add(candidate)
    return stems
