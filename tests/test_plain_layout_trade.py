"""tools/plain_layout_trade.py times the relevance pass's 1×1 convolutions as MatMuls (outside onnxruntime's
blocked layout) against the exported explainer; the timing only means something if the rewritten graph computes
the same logits and relevance, which the tool checks (to 1e-5) before it times. Run here at a tiny setting."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

SPEC = importlib.util.spec_from_file_location(
    "plain_layout_trade", Path(__file__).resolve().parents[1] / "tools" / "plain_layout_trade.py")
tool = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(tool)


def test_the_matmul_form_is_the_same_explainer_with_fewer_reorders(tmp_path):
    out = tmp_path / "trade.md"
    assert tool.main(["--model", "resnet50", "--size", "32", "--presets", "otsuki2024", "--batches", "2",
                      "--rounds", "1", "--out", str(out)]) == 0
    text = out.read_text()
    row = re.search(r"\| otsuki2024 \| 2 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| ([\d.e+-]+) \|", text)
    assert row and float(row.group(1)) <= 1e-5
    found = re.search(r"(\d+) relevance convolutions rewritten; NCHWc reorders onnxruntime runs: (\d+) exported, "
                      r"(\d+) with the MatMul form", text)
    rewritten, blocked, plain = (int(g) for g in found.groups())
    assert rewritten == 66  # ResNet-50: the W⁺ forward and the transposed pass of its 33 stride-1 1×1 convolutions
    assert plain < blocked
