"""graphlrp.zoo.cifar: the CIFAR-10 ResNets load the shared trained weights and reach the accuracy stated for them
in ../shared/README.md on the 1000 dev images (80.4% ResNet-20, 82.5% ResNet-56)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from graphlrp.models import load_model
from graphlrp.zoo.cifar import resnet20, resnet56

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.mark.parametrize("factory, blocks", [(resnet20, 3), (resnet56, 9)])
def test_architecture(factory, blocks):
    model = factory().eval()
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [blocks] * 3
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert model.layer2[0].downsample and not model.layer2[1].downsample


@pytest.mark.skipif(not (ASSETS / "cifar10-test-dev.npz").is_file(), reason="needs ../shared/assets")
@pytest.mark.parametrize("name, accuracy", [("resnet20", 0.804), ("resnet56", 0.825)])
def test_shared_weights_reach_the_stated_dev_accuracy(name, accuracy):
    spec = str(Path(__file__).resolve().parents[1] / "graphlrp" / "zoo" / "cifar.py") + f":{name}"
    model, info = load_model(spec, str(ASSETS / "cifar10-resnet" / f"{name}.pt"))
    assert info.input_size == (32, 32) and info.labels[0] == "airplane"
    data = np.load(ASSETS / "cifar10-test-dev.npz")
    x = (torch.from_numpy(data["images"]).permute(0, 3, 1, 2).float() / 255 - MEAN) / STD
    with torch.inference_mode():
        pred = torch.cat([model(x[i:i + 250]).argmax(1) for i in range(0, len(x), 250)])
    assert (pred == torch.from_numpy(data["labels"])).float().mean().item() == pytest.approx(accuracy, abs=5e-4)
