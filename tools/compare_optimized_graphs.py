"""What onnxruntime actually runs: the op counts of two ONNX files after onnxruntime's graph optimisations
(constant folding, Conv+BN fusion, the NCHWc layout with its reorders), side by side.

    python tools/compare_optimized_graphs.py BEFORE.onnx AFTER.onnx

Two explainers whose optimised graphs have the same convolutions and the same layout reorders do the same heavy
work per call; the ops that differ are listed. Cheap next to a timing run, and unaffected by a busy machine.
"""
from __future__ import annotations

import argparse
import collections
import os
import tempfile


def optimized_graph(path: str):
    """The GraphProto onnxruntime runs for the file at `path` (its optimised model, weights left out)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath, load_external_data=False).graph


def optimized_ops(path: str) -> collections.Counter:
    return collections.Counter(node.op_type for node in optimized_graph(path).node)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before")
    p.add_argument("after")
    args = p.parse_args(argv)
    before, after = optimized_ops(args.before), optimized_ops(args.after)
    print(f"nodes after onnxruntime's optimisations: {sum(before.values())} vs {sum(after.values())}")
    print("| op | before | after |\n|---|---:|---:|")
    for op in sorted(set(before) | set(after), key=lambda k: -max(before[k], after[k])):
        mark = "" if before[op] == after[op] else " ←"
        print(f"| {op} | {before[op]} | {after[op]}{mark} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
