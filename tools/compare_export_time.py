"""Compile + export time of two source trees of graphlrp, interleaved in one run (e.g. before/after a change).

    git archive OLD_COMMIT | tar -x -C /tmp/old
    python tools/compare_export_time.py /tmp/old . --models resnet50,resnet152 --rounds 3

Each measurement is a fresh process (benchmark.py's `compile` child: `graphlrp.compile` then `export_onnx` with
onnx.checker and the onnxruntime parity check, ResNet at 224², random weights) with that tree first on
PYTHONPATH; the trees alternate within each round, and the table reports medians.
"""
from __future__ import annotations

import argparse
import json
import os
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
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--models", default="resnet50,resnet152")
    p.add_argument("--preset", default="otsuki2024")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    runs: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for arch in args.models.split(","):
                for label, tree in (trees.items() if r % 2 == 0 else reversed(list(trees.items()))):
                    res = measure(tree, arch, args.preset, os.path.join(tmp, f"{label}-{arch}.onnx"), args.threads)
                    print(label, arch, res, flush=True)
                    runs.setdefault((arch, label), []).append(res)
    print(f"\n| model | tree | compile (s) | export + checks (s) | total (s) | file (MiB) | parity |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (arch, label), rs in runs.items():
        ok = [x for x in rs if "error" not in x]
        if not ok:
            print(f"| {arch} | {label} | error: {rs[0]['error']} | | | | |")
            continue
        med = lambda k: statistics.median(x[k] for x in ok)  # noqa: E731
        print(f"| {arch} | {label} | {med('compile_s'):.1f} | {med('export_s'):.1f} | "
              f"{statistics.median(x['compile_s'] + x['export_s'] for x in ok):.1f} | {med('size_mb'):.0f} | "
              f"{max(x['parity'] for x in ok):.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
