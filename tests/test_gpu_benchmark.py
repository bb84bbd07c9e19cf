"""tools/gpu_benchmark.sh runs where no GPU is: --provider cpu at a tiny setting (a ResNet and a one-layer ViT at
32 px, batch 1 and 2, one round), and writes its report with a row per method and the float16 section."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_script_runs_on_the_cpu(tmp_path):
    pytest.importorskip("zennit")
    pytest.importorskip("lxt")
    out = tmp_path / "benchmark-gpu.md"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_benchmark.sh"), "--provider", "cpu", "--models",
                           "resnet18,vit_tiny", "--size", "32", "--batches", "1,2", "--repeats", "1", "--warmup", "0",
                           "--threads", "1", "--resnet-presets", "epsilon-plus-flat", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    rows = [line.split("|")[1:-1] for line in text.splitlines() if re.match(r"\| (resnet18|vit_tiny) \| \d", line)]
    methods = {(r[0].strip(), r[2].strip()) for r in rows}
    for model, preset, baseline in (("resnet18", "epsilon-plus-flat", "Zennit"), ("vit_tiny", "cp-lrp", "LXT")):
        for method in ("forward", f"graphlrp {preset}", f"graphlrp {preset} fp16", "forward (PyTorch eager)"):
            assert (model, method) in methods, (model, method)
        assert any(m == model and name.startswith(baseline) for m, name in methods)
    assert len(rows) == 2 * 2 * 5  # two models, two batches, five methods each
    for r in rows:
        ips, ms, ratio = float(r[4]), float(r[5]), float(r[6])
        assert ips > 0 and ms > 0 and ratio > 0
        if r[2].strip() == "forward":
            assert ratio == 1.0
    fp16 = [line for line in text.splitlines() if re.match(r"\| (resnet18|vit_tiny) \| [a-z]", line)]
    assert len(fp16) == 2
    for line in fp16:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert float(cells[3]) < 5e-2  # relevance vs fp32 on the parity batch
        assert all(float(v) > 0 for v in cells[6].split(", "))  # conservation ratios stated
    assert "No GPU was used" in text
