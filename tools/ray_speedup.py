"""Speed-up of `--ray` with 1 and 2 workers on this machine, in one run: `python tools/ray_speedup.py [--rounds 3]`.

Two workloads, each timed in interleaved rounds (median), on a Ray started here once (its start-up is not timed):
* explain: `graphlrp explain MODEL.onnx FOLDER --ray --workers W` (ResNet-18 at 224², random weights, 48 images);
* evaluate curves: the insertion/deletion curves of `graphlrp evaluate --ray --workers W` (CIFAR ResNet-20 of
  graphlrp.zoo, random weights, 32 random images, one raw map per image: 2 × 103 model calls per image).
The local command (one process, onnxruntime's own threads) is timed alongside. Writes results/ray_speedup.md.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import graphlrp  # noqa: E402
from graphlrp.cli import main  # noqa: E402


def quiet_main(argv: list[str]) -> int:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main(argv)


def explain_setup(tmp: Path, images: int) -> tuple[str, str]:
    import torchvision

    torch.manual_seed(0)
    model = str(tmp / "r18.onnx")
    graphlrp.compile(torchvision.models.resnet18().eval(), torch.randn(1, 3, 224, 224)).export_onnx(model, check=False)
    folder = tmp / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(images):
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return model, str(folder)


def curves_setup(images: int):
    from graphlrp.evaluate.data import ImageSet
    from graphlrp.evaluate.metrics import curve_length, default_step
    from graphlrp.evaluate.runner import Evaluation
    from graphlrp.zoo.cifar import resnet20

    torch.manual_seed(0)
    model = resnet20().eval()
    data = ImageSet(torch.rand(images, 3, 32, 32), torch.randint(0, 10, (images,)), None, "random")
    step = default_step(32, 32)
    maps = {"random": torch.rand(images, 32, 32)}

    def evaluation():
        return Evaluation(model="resnet20", data="random", n=images, accuracy=0.0, step=step,
                          points=curve_length(32 * 32, step), mean=(0.5,) * 3, std=(0.25,) * 3)

    return model, data, maps, evaluation


def main_(rounds: int, explain_images: int, curve_images: int) -> None:
    from graphlrp.engines import ray as ray_engine
    from graphlrp.evaluate.runner import LocalEngine

    resources = ray_engine.start(os.environ.get("RAY_ADDRESS"))
    tmp = Path(tempfile.mkdtemp(prefix="ray-speedup-"))
    model, folder = explain_setup(tmp, explain_images)
    cmodel, data, maps, evaluation = curves_setup(curve_images)
    example = (data.images[:8] - 0.5) / 0.25

    def run_explain(workers: int | None):
        extra = [] if workers is None else ["--ray", "--workers", str(workers)]
        argv = ["explain", model, folder, "-o", str(tmp / f"out-{workers}"), "--provider", "cpu"]
        assert quiet_main(argv + extra) == 0

    def run_curves(workers: int | None):
        engine = LocalEngine() if workers is None else ray_engine.RayEvaluateEngine(resources, workers=workers)
        with contextlib.redirect_stderr(io.StringIO()):
            engine.curves(cmodel, data, maps, evaluation(), batch_size=256, example=example)

    configs = {"local": None, "Ray, 1 worker": 1, "Ray, 2 workers": 2}
    times = {(w, c): [] for w in ("explain", "curves") for c in configs}
    for fn, name in ((run_explain, "explain"), (run_curves, "curves")):
        fn(1)  # warm-up: worker processes, imports
        for _ in range(rounds):
            for config, workers in configs.items():
                t = time.perf_counter()
                fn(workers)
                times[(name, config)].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = ["# `--ray` with 1 and 2 workers on this machine", "",
             f"`python tools/ray_speedup.py {' '.join(sys.argv[1:])}`: medians of {rounds} interleaved rounds; "
             "Ray started once before timing (its start-up is not included).", "",
             f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; Ray resources "
             f"{ {k: v for k, v in resources.items() if k in ('CPU', 'GPU')} }; 1 thread per Ray worker",
             f"- explain: ResNet-18 at 224², {explain_images} PNG images of 256², batch 8, CPU",
             f"- evaluate curves: CIFAR ResNet-20, {curve_images} images, one raw map each, "
             f"{evaluation().points} points per curve", "",
             "| workload | local (s) | Ray, 1 worker (s) | Ray, 2 workers (s) | 2 workers vs 1 | 2 workers vs local |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in ("explain", "curves"):
        loc, one, two = (med[(name, c)] for c in configs)
        lines.append(f"| {name} | {loc:.1f} | {one:.1f} | {two:.1f} | {one / two:.2f}× | {loc / two:.2f}× |")
    lines += ["", "Per-round times (s): " + "; ".join(f"{k[0]} {k[1]}: " + ", ".join(f"{t:.1f}" for t in v)
                                                     for k, v in times.items()), ""]
    out = ROOT / "results" / "ray_speedup.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--explain-images", type=int, default=48)
    ap.add_argument("--curve-images", type=int, default=32)
    a = ap.parse_args()
    main_(a.rounds, a.explain_images, a.curve_images)
