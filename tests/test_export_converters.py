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


