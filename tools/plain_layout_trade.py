"""Would the relevance pass run faster outside onnxruntime's blocked layout? A measured trade, same run.

    python tools/plain_layout_trade.py [--model resnet50] [--batches 1,8] [--out results/plain-layout-trade.md]

onnxruntime's CPU provider runs a convolution in its blocked NCHWc layout and puts a reorder in front of every
reader it cannot run blocked. In the z⁺ rule's step s = R / z⁺ both operands come from blocked ops and the Div
is not one, so each layer pays three reorders (z⁺, R, and s back into the transposed convolution). The other
form keeps the relevance pass's 1×1 convolutions (the W⁺ forward and the transposed pass; most of a bottleneck
ResNet's) out of the blocked layout, as MatMuls over [N, C, H·W]: the same multiply-accumulates, in a GEMM,
with no reorder around their Divs. This tool writes that form from the exported explainer (after onnxruntime's
constant folding, so the rule weights are plain initializers), checks that it returns the same logits and
relevance, counts the reorders in both, and times both against the plain forward, interleaved.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_sweep import cpu_name  # noqa: E402
from compare_optimized_graphs import optimized_graph  # noqa: E402


def constant_folded(src: str, dst: str) -> None:
    """onnxruntime's basic optimisations only (constant folding: W⁺ = Relu(W), flipped kernels as initializers),
    saved in standard ONNX ops."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = dst
    options.log_severity_level = 3
    ort.InferenceSession(src, options, providers=["CPUExecutionProvider"])


def _attribute(node, name, default):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def relevance_1x1_as_matmul(src: str, dst: str) -> int:
    """Rewrite each 1×1, stride-1, unpadded, ungrouped Conv of the relevance pass (a node the logits do not
    depend on) as Reshape → MatMul (→ Add bias) → Reshape; returns how many. Spatial sizes come from ONNX shape
    inference; the batch stays symbolic."""
    import onnx
    from onnx import helper, numpy_helper, shape_inference

    model = onnx.load(src)
    graph = model.graph
    inferred = shape_inference.infer_shapes(model).graph
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.value_info, *inferred.input, *inferred.output]}
    producer = {out: node for node in graph.node for out in node.output}
    forward, stack = set(), [graph.output[0].name]  # the logits' ancestors: the forward, left as it is
    while stack:
        node = producer.get(stack.pop())
        if node is not None and id(node) not in forward:
            forward.add(id(node))
            stack.extend(node.input)
    weights = {t.name: t for t in graph.initializer}
    nodes, added, count = [], [], 0
    for node in graph.node:
        w = weights.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        plain = (w is not None and id(node) not in forward and list(w.dims[2:]) == [1, 1]
                 and _attribute(node, "group", 1) == 1 and list(_attribute(node, "strides", [1, 1])) == [1, 1]
                 and not any(_attribute(node, "pads", [0, 0, 0, 0]))
                 and list(_attribute(node, "dilations", [1, 1])) == [1, 1])
        if not plain:
            nodes.append(node)
            continue
        count += 1
        c_out, c_in = int(w.dims[0]), int(w.dims[1])
        height, width = shapes[node.input[0]][2:]
        name = f"plain_{count}"
        added += [numpy_helper.from_array(numpy_helper.to_array(w).reshape(c_out, c_in), f"{name}_w"),
                  numpy_helper.from_array(np.array([-1, c_in, height * width], np.int64), f"{name}_flat"),
                  numpy_helper.from_array(np.array([-1, c_out, height, width], np.int64), f"{name}_shape")]
        nodes += [helper.make_node("Reshape", [node.input[0], f"{name}_flat"], [f"{name}_x"]),
                  helper.make_node("MatMul", [f"{name}_w", f"{name}_x"], [f"{name}_y"])]
        y = f"{name}_y"
        if len(node.input) > 2 and node.input[2]:
            bias = numpy_helper.to_array(weights[node.input[2]]).reshape(c_out, 1)
            added.append(numpy_helper.from_array(bias, f"{name}_b"))
            nodes.append(helper.make_node("Add", [y, f"{name}_b"], [f"{name}_yb"]))
            y = f"{name}_yb"
        nodes.append(helper.make_node("Reshape", [y, f"{name}_shape"], [node.output[0]]))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(added)
    onnx.save(model, dst)
    return count


def reorders(path: str) -> int:
    return sum(n.op_type in ("ReorderInput", "ReorderOutput") for n in optimized_graph(path).node)


def _session(path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _median_seconds(run, repeats: int = 3) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50", help="torchvision model (random weights)")
    p.add_argument("--presets", default="otsuki2024,epsilon-plus-flat")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    p.add_argument("--out", default="results/plain-layout-trade.md")
    args = p.parse_args(argv)

    import onnx
    import onnxruntime as ort
    import torch
    import torchvision

    import graphlrp
    from graphlrp.export import forward_onnx

    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)().eval()
    example = torch.randn(1, 3, args.size, args.size)
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        plain = os.path.join(tmp, "forward.onnx")
        onnx.save(forward_onnx(model, example), plain)
        forward = _session(plain)
        for preset in args.presets.split(","):
            exported, blocked, matmul = (os.path.join(tmp, f"{preset}-{k}.onnx") for k in ("export", "blocked", "mm"))
            graphlrp.compile(model, example, rules=preset).export_onnx(exported)
            constant_folded(exported, blocked)
            rewritten = relevance_1x1_as_matmul(blocked, matmul)
            sessions = {"blocked": _session(blocked), "matmul": _session(matmul)}
            for batch in (int(b) for b in args.batches.split(",")):
                x = rng.standard_normal((batch, 3, args.size, args.size)).astype(np.float32)
                feed = {"input": x, "target": np.full((batch,), -1, np.int64)}
                ref = sessions["blocked"].run(None, feed)
                got = sessions["matmul"].run(None, feed)
                diff = max(float(np.abs(g - r).max() / max(np.abs(r).max(), 1e-30)) for g, r in zip(got, ref))
                if not diff <= 1e-5:
                    raise SystemExit(f"{preset}: the MatMul form differs from the exported explainer by {diff:.1e}")
                times = {"forward": [], "blocked": [], "matmul": []}
                for _ in range(args.rounds):
                    times["forward"].append(_median_seconds(lambda: forward.run(None, {"input": x})))
                    for key, session in sessions.items():
                        times[key].append(_median_seconds(lambda: session.run(None, feed)))
                f, b, m = (float(np.median(times[k])) for k in ("forward", "blocked", "matmul"))
                rows.append((preset, batch, f * 1000 / batch, b / f, m / f, diff))
            rows_reorders = (reorders(blocked), reorders(matmul))
            rows.append((preset, "reorders", *rows_reorders, rewritten))
    lines = ["# The relevance pass in the plain layout: a measured trade", "",
             f"`python tools/plain_layout_trade.py --model {args.model} --presets {args.presets} --batches "
             f"{args.batches} --size {args.size} --rounds {args.rounds}` — onnxruntime {ort.__version__}, "
             f"{cpu_name()} ({platform.machine()}), {os.cpu_count()} CPUs visible, 2 intra-op threads; "
             f"{args.model} with random weights at {args.size}², median of {args.rounds} interleaved rounds.", "",
             __doc__.split("\n\n")[2].replace("\n", " "), "",
             "| preset | batch | forward (ms / image) | exported (blocked) × forward | 1×1 as MatMul × forward | "
             "max relative difference |", "|---|---:|---:|---:|---:|---:|"]
    notes = []
    for row in rows:
        if row[1] == "reorders":
            notes.append(f"* {row[0]}: {row[4]} relevance convolutions rewritten; NCHWc reorders onnxruntime "
                         f"runs: {row[2]} exported, {row[3]} with the MatMul form.")
        else:
            lines.append(f"| {row[0]} | {row[1]} | {row[2]:.1f} | {row[3]:.2f} | {row[4]:.2f} | {row[5]:.1e} |")
    lines += ["", *notes, ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
