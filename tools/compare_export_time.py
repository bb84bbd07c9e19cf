"""Compile + export time of two source trees of graphlrp, interleaved in one run (e.g. before/after a change), and
optionally the onnxruntime speed of the explainer files they write.

    git archive OLD_COMMIT | tar -x -C /tmp/old
    python tools/compare_export_time.py /tmp/old . --models resnet50,resnet152 --rounds 3
    python tools/compare_export_time.py /tmp/old . --models resnet50 --rounds 1 \
        --presets otsuki2024,epsilon-plus-flat --speed 7 [--dir DIR] [--out results/export-before-after.md]

Each measurement is a fresh process (benchmark.py's `compile` child: `graphlrp.compile` then `export_onnx` with
onnx.checker and the onnxruntime parity check, ResNet at 224², random weights) with that tree first on
PYTHONPATH; the trees alternate within each round, and the table reports medians (wall time, and the CPU time
of the whole process, which a shared machine disturbs far less). `--speed N` then times the
files of the last round in onnxruntime (batch 1, `--threads` threads), N interleaved rounds after one warm-up,
against the plain forward written by `graphlrp.export.forward_onnx` of the tree this script runs with.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import benchmark  # noqa: E402


def measure(tree: Path, arch: str, preset: str, path: str, threads: int) -> dict:
    code = benchmark.CHILD_SNIPPET.format(root=str(tree), tools=str(HERE), kind="compile", arch=arch, preset=preset,
                                          path=path, batch=1, threads=threads)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(tree)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=3600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        return {"error": f"exit {out.returncode}: " + (out.stderr.strip().splitlines() or [""])[-1][:200]}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # CPU seconds of the whole child (imports, model build, compile, export, checks): on a shared machine far
    # steadier than wall time, which grows with every other job
    result["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result


def speed(tmp: str, models: list, presets: list, labels: list, rounds: int, threads: int) -> list:
    import time

    import numpy as np
    import onnx
    import torch

    from graphlrp.export import forward_onnx

    lines: list = []
    for arch in models:
        forward = os.path.join(tmp, f"{arch}-forward.onnx")
        onnx.save(forward_onnx(benchmark.build_model(arch), torch.randn(1, 3, 224, 224)), forward)
        sessions = {"forward": benchmark.ort_session(forward, threads)}
        for preset in presets:
            for label in labels:
                path = os.path.join(tmp, f"{label}-{arch}-{preset}.onnx")
                if os.path.exists(path):
                    sessions[f"{preset} {label}"] = benchmark.ort_session(path, threads)
        x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
        feeds = {name: {"input": x, **({"target": np.array([-1])} if len(s.get_inputs()) == 2 else {})}
                 for name, s in sessions.items()}
        times: dict = {name: [] for name in sessions}
        for r in range(rounds + 1):
            for name, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, feeds[name])
                if r:  # round 0 warms up
                    times[name].append(time.perf_counter() - t0)
        base = statistics.median(times["forward"])
        lines += ["", f"{arch}, batch 1, onnxruntime, median of {rounds} interleaved rounds after one warm-up round:",
                  "", "| file | ms | × forward |", "|---|---:|---:|"]
        for name, ts in times.items():
            lines.append(f"| {name} | {1000 * statistics.median(ts):.1f} | {statistics.median(ts) / base:.2f} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--models", default="resnet50,resnet152")
    p.add_argument("--presets", default="otsuki2024")
    p.add_argument("--speed", type=int, default=0, help="interleaved onnxruntime rounds on the written files")
    p.add_argument("--dir", default=None, help="keep the files here (default: a temporary folder); with --rounds 0, "
                                               "time the BEFORE/AFTER-ARCH-PRESET.onnx files already there")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="also write the tables to this markdown file")
    args = p.parse_args(argv)
    start_load = os.getloadavg()[0]
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    runs: dict = {}
    presets = args.presets.split(",")
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.dir or scratch
        for r in range(args.rounds):
            for arch in args.models.split(","):
                for preset in presets:
                    for label, tree in (trees.items() if r % 2 == 0 else reversed(list(trees.items()))):
                        path = os.path.join(tmp, f"{label}-{arch}-{preset}.onnx")
                        res = measure(tree, arch, preset, path, args.threads)
                        print(label, arch, preset, res, flush=True)
                        runs.setdefault((arch, preset, label), []).append(res)
        lines = speed(tmp, args.models.split(","), presets, list(trees), args.speed, args.threads) if args.speed else []
    lines += ["", f"Compile + export + checks, fresh process per measurement, median of {args.rounds} round(s):", "",
              "| model | preset | tree | compile (s) | export + checks (s) | total (s) | CPU of the process (s) "
              "| file (MiB) | parity |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for (arch, preset, label), rs in runs.items():
        ok = [x for x in rs if "error" not in x]
        if not ok:
            lines.append(f"| {arch} | {preset} | {label} | error: {rs[0]['error']} | | | | | |")
            continue
        med = lambda k: statistics.median(x[k] for x in ok)  # noqa: E731
        lines.append(f"| {arch} | {preset} | {label} | {med('compile_s'):.1f} | {med('export_s'):.1f} | "
                     f"{statistics.median(x['compile_s'] + x['export_s'] for x in ok):.1f} | {med('cpu_s'):.1f} | "
                     f"{med('size_mb'):.0f} | {max(x['parity'] for x in ok):.1e} |")
    print("\n".join(lines))
    if args.out:
        info = benchmark.machine()
        head = ["# Export before and after a change, same run", "",
                "Command: `python tools/compare_export_time.py " + " ".join(argv if argv is not None else sys.argv[1:])
                + "`", "", f"Trees: before = {args.before}, after = {args.after}. Machine: {info['cpu']}, "
                f"{info['cores']} cores; load average {start_load:.1f} at the start, {os.getloadavg()[0]:.1f} at the "
                f"end; onnxruntime {info['versions']['onnxruntime']}, torch {info['versions']['torch']}, "
                f"{args.threads} threads. ResNets at 224², random weights (seed 0)."]
        args.out.write_text("\n".join(head + lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
