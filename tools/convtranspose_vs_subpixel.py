"""Measure a trade the relevance graph makes: a strided transposed convolution as onnxruntime's ConvTranspose, or
as its sub-pixel decomposition (one stride-1 Conv with s² phase kernels, zero-padded to a common size, then
DepthToSpace and a crop), which runs in onnxruntime's blocked NCHWc convolution.

Both forms of each of ResNet-50's strided layers (the transposed pass of its stride-2 convolutions, at the shapes
the explainer runs them) are built as one-node ONNX models, checked against each other, and timed in the same run
(median of 30 runs after a warm-up). The explainer keeps whichever is faster; this script is how that was decided.

    python tools/convtranspose_vs_subpixel.py [--threads 2] [--batches 1,8]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

# (channels into the transposed pass, channels out of it, kernel, stride, padding, input side, output padding):
# the transposed pass of ResNet-50's conv1, its three 3x3/stride-2 convolutions and three 1x1/stride-2 downsamples
RESNET50_STRIDED = [(64, 3, 7, 2, 3, 112, 1), (128, 128, 3, 2, 1, 28, 1), (512, 256, 1, 2, 0, 28, 1),
                    (256, 256, 3, 2, 1, 14, 1), (1024, 512, 1, 2, 0, 14, 1), (512, 512, 3, 2, 1, 7, 1),
                    (2048, 1024, 1, 2, 0, 7, 1)]


def subpixel_kernel(weight: np.ndarray, stride: int, padding: int) -> tuple[np.ndarray, int, int]:
    """The stride-1 Conv kernel whose output, rearranged by DepthToSpace (CRD), is ConvTranspose(weight).

    Output position Y = s·q + r of the transposed convolution receives input u = q + j through kernel tap
    k = s·(d_r − j) + k_r, with k_r = (r + p) mod s and d_r = ⌊(r + p) / s⌋: a correlation over offsets j per
    phase r. Phases share one offset range [j_min, j_max]; taps a phase lacks are zero."""
    c_in, c_out, size = weight.shape[0], weight.shape[1], weight.shape[2]
    taps = {}
    for r in range(stride):
        k_r, d_r = (r + padding) % stride, (r + padding) // stride
        taps[r] = [(d_r - m, k_r + stride * m) for m in range((size - k_r + stride - 1) // stride)]
    offsets = [j for r in taps for j, _ in taps[r]]
    j_min, j_max = min(offsets), max(offsets)
    kernel = np.zeros((c_out, stride, stride, c_in, j_max - j_min + 1, j_max - j_min + 1), weight.dtype)
    for rh in range(stride):
        for jh, kh in taps[rh]:
            for rw in range(stride):
                for jw, kw in taps[rw]:
                    kernel[:, rh, rw, :, jh - j_min, jw - j_min] = weight[:, :, kh, kw].T
    return kernel.reshape(c_out * stride * stride, c_in, *kernel.shape[-2:]), j_min, j_max


def build(case, weight):
    from onnx import TensorProto, helper, numpy_helper

    c_in, c_out, size, stride, padding, side, out_pad = case
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, c_in, side, side])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    opset = [helper.make_opsetid("", 17)]
    transposed = helper.make_model(helper.make_graph(
        [helper.make_node("ConvTranspose", ["x", "W"], ["y"], strides=[stride] * 2, pads=[padding] * 4,
                          kernel_shape=[size] * 2, output_padding=[out_pad] * 2)],
        "convtranspose", [x], [y], [numpy_helper.from_array(weight, "W")]), opset_imports=opset)
    kernel, j_min, j_max = subpixel_kernel(weight, stride, padding)
    out_side = (side - 1) * stride - 2 * padding + size + out_pad
    phases = -(-out_side // stride)
    begin, end = -j_min, (phases - 1 + j_max) - (side - 1)
    assert begin >= 0 and end >= 0, "these shapes need a cropped input"
    crop = [numpy_helper.from_array(np.array(v, np.int64), n)
            for n, v in (("start", [0, 0]), ("stop", [out_side] * 2), ("axes", [2, 3]))]
    nodes = [helper.make_node("Conv", ["x", "V"], ["c"], pads=[begin, begin, end, end],
                              kernel_shape=list(kernel.shape[2:])),
             helper.make_node("DepthToSpace", ["c"], ["d"], blocksize=stride, mode="CRD"),
             helper.make_node("Slice", ["d", "start", "stop", "axes"], ["y"])]
    subpixel = helper.make_model(helper.make_graph(nodes, "subpixel", [x], [y],
                                                   [numpy_helper.from_array(kernel, "V")] + crop), opset_imports=opset)
    return transposed, subpixel


def median_ms(fn, runs: int = 30) -> float:
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1000


def main(argv=None) -> int:
    import onnxruntime as ort

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", default="1,8")
    args = p.parse_args(argv)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.log_severity_level = 3
    rng = np.random.default_rng(0)
    print("| batch | transposed pass (in→out, kernel, stride) | ConvTranspose ms | sub-pixel Conv ms | sub-pixel / ConvTranspose | max rel. diff |")
    print("|---:|---|---:|---:|---:|---:|")
    for batch in (int(b) for b in args.batches.split(",")):
        for case in RESNET50_STRIDED:
            weight = rng.standard_normal(case[:2] + (case[2], case[2])).astype(np.float32)
            sessions = [ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
                        for m in build(case, weight)]
            x = {"x": rng.standard_normal((batch, case[0], case[5], case[5])).astype(np.float32)}
            a, b = (s.run(None, x)[0] for s in sessions)
            diff = float(np.abs(a - b).max() / np.abs(a).max())
            t_a, t_b = (median_ms(lambda s=s: s.run(None, x)) for s in sessions)
            print(f"| {batch} | {case[0]}→{case[1]}, {case[2]}x{case[2]}, /{case[3]} | {t_a:.2f} | {t_b:.2f} | "
                  f"{t_b / t_a:.2f} | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
