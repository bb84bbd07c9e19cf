"""`--ray`: `explain` and `evaluate` on a local Ray (2 CPUs, loopback only) give what the local commands give.

One Ray session serves the whole module (it takes seconds to start); the commands find it running and use it."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from graphlrp.cli import main

ray = pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _skips(text: str) -> list[str]:
    return sorted(line for line in text.splitlines() if line.startswith("skipped "))


def test_explain_on_ray_gives_the_local_outputs_and_skip_report(local_ray, tiny_onnx, images, tmp_path, capsys):
    folder = Path(images["wide.png"]).parent  # 4 good images, a corrupt and a truncated PNG, a text file
    assert main(["explain", tiny_onnx, str(folder), "-o", str(tmp_path / "local"), "--batch-size", "3"]) == 1
    local = capsys.readouterr()
    assert main(["explain", tiny_onnx, str(folder), "-o", str(tmp_path / "ray"), "--batch-size", "2", "--ray"]) == 1
    remote = capsys.readouterr()

    assert _skips(remote.err) == _skips(local.err) and len(_skips(local.err)) == 3
    for bad in ("broken.png", "truncated.png", "notes.txt"):
        assert bad in "".join(_skips(remote.err))
    assert "3 of 7 image(s) skipped" in remote.err
    assert sorted(l for l in remote.out.splitlines() if ": predicted" in l) == \
        sorted(l for l in local.out.splitlines() if ": predicted" in l)

    written = sorted(f.name for f in (tmp_path / "local").iterdir())
    assert len(written) == 4 * 6  # at the model's input and at the photo's resolution
    assert sorted(f.name for f in (tmp_path / "ray").iterdir()) == sorted(written + ["explanations.parquet"])
    for name in written:
        if name.endswith(".npy"):  # different batches on both sides: float32 noise only
            a, b = np.load(tmp_path / "local" / name), np.load(tmp_path / "ray" / name)
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.nanmax(np.abs(a)))  # NaN: outside the crop

    table = pq.read_table(tmp_path / "ray" / "explanations.parquet").to_pylist()
    assert [Path(r["image"]).name for r in table] == ["grey.png", "square.png", "tall.jpg", "wide.png"]
    for row in table:
        relevance = np.load(tmp_path / "local" / f"{Path(row['image']).stem}_relevance.npy")
        assert row["relevance_sum"] == pytest.approx(relevance.sum(dtype=np.float64), rel=1e-4)
        assert row["target"] == row["predicted"] and 0 < row["probability"] <= 1
        # otsuki2024 puts p(target) on the output; on this net ΣR at the input stays within a few % of it
        assert row["relevance_sum"] == pytest.approx(row["probability"], rel=0.1)


TINY_MODEL = """
import torch
from graphlrp.zoo.cifar import CifarResNet


class Tiny(CifarResNet):  # defined here: the workers cannot import this module by name
    pass


def tiny():
    torch.manual_seed(0)
    model = Tiny(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model
"""


def test_evaluate_on_ray_gives_the_local_results(local_ray, tmp_path):
    (tmp_path / "tiny_user_model.py").write_text(TINY_MODEL)
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "data.npz", images=rng.integers(0, 255, (6, 16, 16, 3), dtype=np.uint8),
             labels=np.array([0, 1, 2, 3, 4, 5]))
    base = ["evaluate", f"{tmp_path / 'tiny_user_model.py'}:tiny", "--weights", "none", "--data",
            str(tmp_path / "data.npz"), "--methods", "ours-iv,gradcam,graphlrp-otsuki2024-conserving",
            "--quantize", "all", "--step", "16", "--batch-size", "4", "--heatmap-images", "1"]
    assert main(base + ["-o", str(tmp_path / "local")]) == 0
    assert main(base + ["-o", str(tmp_path / "ray"), "--ray", "--workers", "2"]) == 0

    def read(run):
        return {r["method"]: r for r in csv.DictReader(open(tmp_path / run / "results.csv"))}

    local, remote = read("local"), read("ray")
    assert set(local) == set(remote) == {"ours-iv", "gradcam", "graphlrp-otsuki2024-conserving"}
    for method, row in local.items():
        for key in ("insertion", "deletion", "id", "insertion_se", "deletion_se", "id_se"):
            assert abs(float(remote[method][key]) - float(row[key])) <= 1e-6, (method, key)
    info = json.loads((tmp_path / "ray" / "run.json").read_text())
    assert info["engine"] == "ray" and info["workers"] == 2
    assert json.loads((tmp_path / "local" / "run.json").read_text())["engine"] == "local"
    # the paper's protocol, computed next to the like-for-like one, agrees too
    paper = {r["method"]: r for r in info["paper_protocol_results"]}
    paper_local = {r["method"]: r for r in json.loads((tmp_path / "local" / "run.json").read_text())
                   ["paper_protocol_results"]}
    for method in paper_local:
        assert abs(paper[method]["id"] - paper_local[method]["id"]) <= 1e-6
    assert "engine: ray, 2 workers" in (tmp_path / "ray" / "results.md").read_text()


def test_without_ray_flag_ray_is_not_imported(tiny_onnx, images, tmp_path):
    code = ("import sys\nfrom graphlrp.cli import main\n"
            f"main(['explain', {tiny_onnx!r}, {images['square.png']!r}, '-o', {str(tmp_path)!r}])\n"
            "print('ray imported' if any(m == 'ray' or m.startswith('ray.') for m in sys.modules) else 'no ray')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "no ray"
    assert (tmp_path / "square_relevance.npy").exists()
