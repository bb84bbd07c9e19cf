"""Converters added for the export of the wider zoo: each checked directly against PyTorch (fx-traced module lowered
at batch 2, run in onnxruntime at another batch size) and, where it is an op graphlrp compiles, through a whole
explainer (graphlrp.compile + export_onnx, whose own onnxruntime parity check is 1e-4)."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import graphlrp
from graphlrp import fx_to_onnx
from graphlrp.errors import ExportError

from test_fx_to_onnx import check_module, run_onnx


class OnePieceSplits(nn.Module):
    """A split into one piece (DenseNet's relevance pass through the first block's one-input concat): the
    converter's output is still a sequence of one."""

    def forward(self, x):  # x: [N, 4, 6]
        (a,) = torch.split(x, [4], 1)
        (b,) = x.split(4, dim=1)
        (c,) = torch.chunk(x, 1, 2)
        (d,) = torch.tensor_split(x, 1, 2)
        return a + b * 2 + c + d, torch.split(x, [4], 1)[0] - 1


def test_a_one_piece_split_stays_a_sequence():
    model = check_module(OnePieceSplits().eval(), (4, 6))
    assert any(n.op_type == "Split" for n in model.graph.node)


def test_a_converter_returning_one_name_for_a_sequence_is_an_export_error(monkeypatch):
    class Two(nn.Module):
        def forward(self, x):
            return torch.split(x, [2, 2], 1)[1] * 2

    monkeypatch.setitem(fx_to_onnx.CONVERTERS, torch.split, lambda g, x, *a, **k: g.op("Identity", [x]))
    with pytest.raises(ExportError, match="converter returned one str for a result of 2"):
        fx_to_onnx.lower(fx.symbolic_trace(Two()), (torch.randn(2, 4),), ["x"], ["y"])


def test_densenet_style_concat_of_one_exports(tmp_path):
    """DenseNet's first dense layer concatenates a list of one tensor; its relevance pass splits into one piece."""

    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv0 = nn.Conv2d(3, 4, 3, padding=1)
            self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            x = F.relu(self.conv0(x))
            features = [x]
            y = F.relu(self.conv1(torch.cat(features, 1)))
            return self.fc(torch.cat([x, y], 1).mean((2, 3)))

    torch.manual_seed(0)
    explainer = graphlrp.compile(Dense().eval(), torch.randn(1, 3, 8, 8))
    report = explainer.export_onnx(tmp_path / "dense.onnx")
    assert report.max_rel_diff <= 1e-4



# ---------------------------------------------------------------- pooling: every keyword of F.avg_pool2d
class AvgPoolSpellings(nn.Module):
    """Inception's `F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)`, the other keywords, and ceil_mode
    windows that PyTorch drops because they would start in the end padding (ONNX's shape rule keeps them)."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AvgPool2d(2, 2, 1, ceil_mode=True)

    def forward(self, x):  # x: [N, 3, 7, 8]
        return (F.avg_pool2d(x, kernel_size=3, stride=1, padding=1),
                F.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False),
                F.avg_pool2d(input=x, kernel_size=(2, 3), stride=(2, 1), padding=(1, 0), ceil_mode=True,
                             count_include_pad=True, divisor_override=None),
                F.avg_pool2d(x, 2, 2, 1, True, True),  # 7 + 2 → ONNX 5 rows, PyTorch 4
                self.pool(x),
                F.max_pool2d(x, 2, 2, 1, ceil_mode=True),
                F.max_pool2d(x, 2, 2, 1, ceil_mode=True, return_indices=True)[1])


def test_avg_pool_keywords_and_ceil_mode_match_pytorch():
    check_module(AvgPoolSpellings().eval(), (3, 7, 8))


def test_avg_pool_with_divisor_override_is_refused_clearly():
    class Divisor(nn.Module):
        def forward(self, x):
            return F.avg_pool2d(x, 2, divisor_override=3)

    with pytest.raises(ExportError, match="divisor_override=3"):
        fx_to_onnx.lower(fx.symbolic_trace(Divisor()), (torch.randn(2, 3, 4, 4),), ["x"], ["y"])


def test_inception_style_avg_pool_branch_exports(tmp_path):
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.fc = nn.Linear(4, 5)

        def forward(self, x):
            x = F.relu(self.conv(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)))
            return self.fc(F.adaptive_avg_pool2d(x, (1, 1)).flatten(1))

    torch.manual_seed(0)
    explainer = graphlrp.compile(Branch().eval(), torch.randn(1, 3, 9, 9))
    assert explainer.export_onnx(tmp_path / "branch.onnx").max_rel_diff <= 1e-4
