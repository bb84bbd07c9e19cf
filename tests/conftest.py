"""Shared fixtures: explainer ONNX files compiled once per test session with the real compiler, and a running
`graphlrp serve` for the HTTP tests.

Most tests use a tiny residual net at 32×32 (compiles and runs in well under a second); ResNet-18 only where the
ImageNet geometry matters. Parity of the ONNX file with the PyTorch explainer is the compiler tests' business,
so these exports skip the parity check."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

TINY_CLASSES = [f"class {i}" for i in range(10)]
TINY_PREPROCESSING = {"resize": 36, "crop": [32, 32], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def _tiny_resnet():
    import torch
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
            self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

        def forward(self, x):
            return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))

    class TinyResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.block = nn.Conv2d(3, 8, 3, padding=1), Block(8)
            self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, len(TINY_CLASSES))

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.block(torch.relu(self.stem(x)))), 1))

    torch.manual_seed(0)
    model = TinyResNet()
    for bn in (model.block.bn1, model.block.bn2):  # non-trivial BatchNorm statistics, as after training
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> str:
    """Explainer for a small residual net on 32×32 inputs, with labels and a resize-then-crop preprocessing."""
    import torch

    import graphlrp

    path = str(tmp_path_factory.mktemp("models") / "tiny.onnx")
    explainer = graphlrp.compile(_tiny_resnet(), torch.randn(1, 3, 32, 32), rules="otsuki2024")
    explainer.export_onnx(path, check=False, metadata={"labels": TINY_CLASSES, "preprocessing": TINY_PREPROCESSING})
    return path


@pytest.fixture(scope="session")
def resnet18_onnx(tmp_path_factory) -> str:
    """torchvision ResNet-18 with random weights: ImageNet geometry (3×224×224, 1000 classes)."""
    import torch
    import torchvision

    import graphlrp

    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("models") / "resnet18.onnx")
    graphlrp.compile(torchvision.models.resnet18().eval(), torch.randn(1, 3, 224, 224)).export_onnx(path, check=False)
    return path


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> dict[str, str]:
    """Good images of several sizes and modes, and unreadable files: a corrupt PNG, a truncated PNG, a text file."""
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = {}
    for name, size in {"wide.png": (60, 40), "tall.jpg": (40, 52), "square.png": (32, 32)}.items():
        paths[name] = str(d / name)
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(paths[name])
    paths["grey.png"] = str(d / "grey.png")
    Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8)).save(paths["grey.png"])
    paths["broken.png"] = str(d / "broken.png")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    good = (d / "wide.png").read_bytes()
    paths["truncated.png"] = str(d / "truncated.png")
    (d / "truncated.png").write_bytes(good[: len(good) // 3])
    paths["notes.txt"] = str(d / "notes.txt")
    (d / "notes.txt").write_text("not an image")
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(tiny_onnx, tmp_path_factory):
    """`graphlrp serve` on the tiny explainer, in a subprocess on a free loopback port. Yields (base URL, pid).
    A 2 MiB body limit keeps the oversized-upload tests cheap."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "graphlrp.cli", "serve", tiny_onnx, "--port", str(port),
                                 "--max-batch", "16", "--max-wait-ms", "10", "--max-body-mb", "2"],
                                stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, proc, log_path)
        yield base, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _wait_healthy(base: str, proc: subprocess.Popen, log_path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"graphlrp serve exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(base + "/healthz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"graphlrp serve did not become healthy:\n{log_path.read_text()}")
