"""tools/convtranspose_vs_subpixel.py times two forms of a strided transposed convolution against each other; the
comparison only means something if both forms compute the same map. Checked here against PyTorch's
conv_transpose2d in float64 for the shapes it measures (channels reduced) and for odd kernels, paddings and
strides."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

SPEC = importlib.util.spec_from_file_location(
    "convtranspose_vs_subpixel", Path(__file__).resolve().parents[1] / "tools" / "convtranspose_vs_subpixel.py")
tool = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(tool)


@pytest.mark.parametrize("size,stride,padding,side", [(7, 2, 3, 9), (3, 2, 1, 6), (1, 2, 0, 5), (5, 3, 2, 4),
                                                       (4, 2, 1, 5)])
def test_subpixel_kernel_is_the_transposed_convolution(size, stride, padding, side):
    rng = np.random.default_rng(0)
    c_in, c_out = 3, 2
    weight = rng.standard_normal((c_in, c_out, size, size))
    x = rng.standard_normal((2, c_in, side, side))
    out_side = (side - 1) * stride - 2 * padding + size
    expected = torch.nn.functional.conv_transpose2d(torch.from_numpy(x), torch.from_numpy(weight), stride=stride,
                                                    padding=padding).numpy()
    kernel, j_min, j_max = tool.subpixel_kernel(weight, stride, padding)
    phases = -(-out_side // stride)
    pad = (max(0, -j_min), max(0, phases - 1 + j_max - (side - 1)))
    padded = np.pad(x, ((0, 0), (0, 0), pad, pad))
    start = max(0, j_min)
    conv = torch.nn.functional.conv2d(torch.from_numpy(padded[..., start:, start:]),
                                      torch.from_numpy(kernel))[..., :phases, :phases]
    got = torch.nn.functional.pixel_shuffle(conv, stride)[..., :out_side, :out_side].numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12 * np.abs(expected).max())


def test_both_onnx_forms_agree_in_onnxruntime():
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    for case in [(16, 3, 7, 2, 3, 12, 1), (16, 16, 3, 2, 1, 6, 1), (32, 16, 1, 2, 0, 5, 1)]:
        weight = rng.standard_normal(case[:2] + (case[2], case[2])).astype(np.float32)
        x = {"x": rng.standard_normal((2, case[0], case[5], case[5])).astype(np.float32)}
        a, b = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
                for m in tool.build(case, weight))
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max())
