"""Where onnxruntime leaves its blocked NCHWc layout in the ResNet-50 explainers: each ReorderOutput (blocked →
plain) and ReorderInput (plain → blocked) of the graph onnxruntime runs, by the op that produced its tensor and the
op that reads it.

    python tools/ort_reorders.py [--out results/ort-reorders.md]

onnxruntime's CPU provider runs Conv, pools, and Add/Sum/Mul/Concat/Relu/Sigmoid/Tanh/BatchNormalization/
Transpose/Resize of tensors already blocked in the NCHWc layout; any other reader of a blocked tensor (Div, Sub,
Abs, ConvTranspose, Where, ...) gets a ReorderOutput in front of it. The table says which rule ops cost the
layout changes that results/benchmark.md's profile shows. Graph structure only: the same on any x86 CPU with the
same onnxruntime, and unaffected by a busy machine.
"""
from __future__ import annotations

import argparse
import collections
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_optimized_graphs import optimized_graph  # noqa: E402


def reorders(graph) -> dict:
    """{"ReorderOutput": Counter((producer, reader)), "ReorderInput": Counter((producer, reader))}."""
    producer = {out: node for node in graph.node for out in node.output}
    readers = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    found = {"ReorderOutput": collections.Counter(), "ReorderInput": collections.Counter()}
    for node in graph.node:
        if node.op_type in found:
            source = producer.get(node.input[0])
            for reader in readers[node.output[0]]:
                found[node.op_type][(source.op_type if source is not None else "graph input", reader.op_type)] += 1
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/ort-reorders.md")
    args = p.parse_args(argv)

    import onnxruntime as ort
    import torch
    import torchvision

    import graphlrp

    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    example = torch.randn(1, 3, 224, 224)
    lines = ["# Where onnxruntime leaves its blocked layout: ResNet-50 explainers", "",
             f"`python tools/ort_reorders.py --out {args.out}` — onnxruntime {ort.__version__}, "
             f"{platform.machine()}; random weights (the graph does not depend on them).", "",
             __doc__.split("\n\n")[2].replace("/\n", "/").replace("\n", " "), ""]
    with tempfile.TemporaryDirectory() as tmp:
        for preset in ("otsuki2024", "epsilon-plus-flat"):
            path = os.path.join(tmp, f"{preset}.onnx")
            graphlrp.compile(model, example, rules=preset).export_onnx(path)
            graph = optimized_graph(path)
            ops = collections.Counter(node.op_type for node in graph.node)
            found = reorders(graph)
            lines += [f"## {preset}", "",
                      f"{len(graph.node)} nodes after onnxruntime's optimisations: {ops['Conv']} Conv, "
                      f"{ops['ConvTranspose']} ConvTranspose, {ops['ReorderOutput']} ReorderOutput, "
                      f"{ops['ReorderInput']} ReorderInput.", "",
                      "| reorder | tensor made by | read by | count |", "|---|---|---|---:|"]
            for kind in ("ReorderOutput", "ReorderInput"):
                for (source, reader), count in found[kind].most_common():
                    lines.append(f"| {kind} | {source} | {reader} | {count} |")
            lines.append("")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
