"""`graphlrp evaluate MODEL --data IMAGES -o DIR`: insertion/deletion faithfulness of graphlrp and baselines."""
from __future__ import annotations

import shlex

from ._types import add_ray_arguments, positive_int


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="insertion/deletion evaluation of graphlrp against baseline explainers",
                       description="Run the insertion/deletion protocol of Otsuki et al. (ECCV 2024) on MODEL and an "
                                   "image set for graphlrp's variants and presets and for Grad-CAM, Score-CAM, IG, "
                                   "Guided Backprop and Zennit LRP. Writes results.csv, results.md, run.json and "
                                   "PNG plots to DIR.")
    p.add_argument("model", help="torchvision name (resnet50, ...), timm:NAME, or path/to/file.py:factory")
    p.add_argument("--weights", default="DEFAULT",
                   help="DEFAULT (pretrained; needs network or cache), none (random), or PATH (.pt/.pth/.safetensors)")
    p.add_argument("--data", required=True, help=".npz with images [N,H,W,3] uint8 and labels [N] (optionally "
                                                 "classes), or a folder of images with labels.txt")
    p.add_argument("--labels", help="labels file for an image folder: `<image> <class index>` per line "
                                    "(default FOLDER/labels.txt)")
    p.add_argument("--methods", default="default",
                   help="comma-separated method names and sets: default (the paper's Table 1 set: ours-iv, gradcam, "
                        "scorecam, ig, guided-bp, lrp-epsilon; plus graphlrp-otsuki2024-conserving), table2 (the four "
                        "splitting variants ours-i..iv), all; an unknown name lists the available ones")
    p.add_argument("--quantize", choices=["ours", "all", "none"], default="ours",
                   help="which maps get the 8-level heat quantization: ours (default, the paper's protocol: only "
                        "ours-*), all or none (every method alike; results.md then shows the paper's table next to it)")
    p.add_argument("--limit", type=positive_int, help="use only the first N images")
    p.add_argument("--step", type=positive_int, help="pixels per insertion/deletion step (default: about 100 points "
                                                     "per curve, 10 for 32×32)")
    p.add_argument("--mean", type=_floats, help="normalisation mean, comma-separated (default: the model's, "
                                                "ImageNet's for most)")
    p.add_argument("--std", type=_floats, help="normalisation std, comma-separated (default: the model's)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="images per model call (default 128)")
    p.add_argument("--resize", type=positive_int, help="image folders: shorter side before the centre crop to the "
                                                       "model's input size (default: the model's own preprocessing, "
                                                       "as `explain` applies it); .npz images are used as stored")
    p.add_argument("--cam-layer", help="module name for Grad-CAM/Score-CAM (default: the last residual stage)")
    p.add_argument("--heatmap-images", type=positive_int, default=4, help="rows in heatmaps.png (default 4)")
    p.add_argument("-o", "--output", required=True, help="directory for the results")
    add_ray_arguments(p, "maps and insertion/deletion curves")
    p.set_defaults(func=run)


def _floats(text: str) -> tuple[float, ...]:
    import argparse

    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e


def command_line(args) -> str:
    """The command that reproduces this run, as written in the report."""
    parts = ["graphlrp", "evaluate", args.model, "--weights", args.weights, "--data", args.data]
    for flag in ("labels", "methods", "quantize", "limit", "step", "mean", "std", "batch_size", "resize", "cam_layer"):
        value = getattr(args, flag)
        if value is not None:
            value = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            parts += [f"--{flag.replace('_', '-')}", value]
    return shlex.join(parts + ["-o", args.output])


def run(args) -> int:
    import os
    from pathlib import Path

    # Before torch loads OpenMP: an evaluation makes thousands of small parallel calls, and spinning OpenMP threads
    # make each 5-10x slower when other processes share the cores (measured on the 2-core dev machine).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    from ..evaluate import EvaluationError
    from ..evaluate.data import load_image_set
    from ..evaluate.methods import resolve
    from ..evaluate.metrics import default_step
    from ..evaluate.report import rows, write_all
    from ..evaluate.runner import evaluate
    from ..models import load_model

    names = resolve(args.methods)
    model, info = load_model(args.model, args.weights)
    data = load_image_set(args.data, info.preprocessing.with_overrides(resize=args.resize), args.labels, args.limit)
    mean, std = args.mean or info.mean, args.std or info.std
    if not len(mean) == len(std) == data.images.shape[1]:
        raise EvaluationError(f"--mean/--std need one value per channel ({data.images.shape[1]}): {mean} / {std}")
    h, w = data.images.shape[-2:]
    engine = None
    if args.ray is not None:
        from ..engines.ray import RayEvaluateEngine, start

        engine = RayEvaluateEngine(start(args.ray), workers=args.workers, threads=args.threads)
    ev = evaluate(model, data, names, model_name=info.name, mean=mean, std=std, step=args.step or default_step(h, w),
                  batch_size=args.batch_size, cam_layer=args.cam_layer, heatmap_images=args.heatmap_images,
                  command=command_line(args), quantize=args.quantize, engine=engine)
    written = write_all(ev, Path(args.output))
    print(f"{ev.n} images, top-1 {ev.accuracy:.1%}, step {ev.step} px ({ev.points} points), "
          f"{ev.seconds['total']:.0f} s on {ev.engine} ({ev.workers} worker{'s' if ev.workers != 1 else ''})")
    print(f"{'method':34s} {'Ins':>7s} {'Del':>7s} {'ID':>7s}")
    for r in rows(ev):
        print(f"{r['method']:34s} {r['insertion']:7.3f} {r['deletion']:7.3f} {r['id']:7.3f}")
    for name, reason in ev.skipped.items():
        print(f"{name:34s} skipped: {reason}")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
