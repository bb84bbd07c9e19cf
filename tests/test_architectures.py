"""Coverage of the ResNets people use: each compiles, conserves with `otsuki2024-conserving` (Σ R_input = p(target)
to 1e-3), splits exactly at every merge (R = R_skip + R_main), and `inspect` reports the right merges.

ImageNet models run at 64×64 (the stem, max-pool and four stages are those of 224×224; final maps are 2×2) so the
suite stays within minutes on a 2-core machine; the acceptance check runs the same at 224. Models with more than
~25 M parameters or 50 merges are marked `slow` (they still run in CI).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import graphlrp

SIZE = 64
CONSERVE_TOL = 1e-3
ASSETS = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "assets"


def check_conserves(model, x, split="ratio", taps=True):
    """Compile with otsuki2024-conserving; check Σ R / p and, with taps, R = R_s + R_m at every merge."""
    explainer = graphlrp.compile(model, x[:1], rules="otsuki2024-conserving", split=split)
    if taps:
        logits, relevance, sums = explainer.explain_with_taps(x)
        for m in explainer.merges:
            r, r_s, r_m = (sums[f"merge:{m.node}.{k}"] for k in ("R", "R_skip", "R_main"))
            assert torch.allclose(r_s + r_m, r, rtol=1e-5, atol=1e-7), m.node
    else:
        logits, relevance = explainer(x)
    with torch.no_grad():
        expected = model(x)
    assert ((logits - expected).abs().max() / expected.abs().max()).item() < 1e-4
    assert torch.isfinite(relevance).all()
    ratio = relevance.flatten(1).sum(1) / logits.softmax(-1).max(-1).values
    assert ((ratio - 1).abs() <= CONSERVE_TOL).all(), ratio.tolist()
    return explainer


def check_merges(model, x, n_merges, n_projection=None, n_other=0):
    kinds = [m.skip_kind for m in graphlrp.inspect(model, x[:1])]
    assert len(kinds) == n_merges, kinds
    if n_projection is not None:
        assert kinds.count("projection") == n_projection, kinds
    assert kinds.count("other") == n_other, kinds
    return kinds


# ------------------------------------------------------------------------------------------ torchvision
TORCHVISION = [
    ("resnet18", 8, 3), ("resnet34", 16, 3), ("resnet50", 16, 4),
    pytest.param("resnet101", 33, 4, marks=pytest.mark.slow),
    pytest.param("resnet152", 50, 4, marks=pytest.mark.slow),
    pytest.param("wide_resnet50_2", 16, 4, marks=pytest.mark.slow),
    pytest.param("resnext50_32x4d", 16, 4, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("arch,n_merges,n_projection", TORCHVISION)
def test_torchvision(arch, n_merges, n_projection):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)().eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    check_merges(model, x, n_merges, n_projection)
    check_conserves(model, x, taps=n_merges <= 16)


# ------------------------------------------------------------------------------------------ timm
@pytest.mark.parametrize("name,n_merges", [("resnet50d", 16), ("resnet26t", 8), ("seresnet50", 16),
                                           ("resnetv2_50", 16)])
def test_timm(name, n_merges):
    """resnet50d/resnet26t: deep stem, average-pool + conv shortcut (ResNet-D); seresnet50: squeeze-excitation
    gates (treated as constants, relevance passes to the gated mainstream); resnetv2_50: pre-activation blocks
    with the functional batch_norm of timm's BatchNormAct2d."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    check_merges(model, x, n_merges, 4)
    check_conserves(model, x, taps=False)


def test_timm_resnet50d_batchnorm_is_folded():
    """Zennit's ResNetCanonizer knows only torchvision's blocks (on timm it merges no Sum); graphlrp works on the
    traced graph, so on timm's ResNet-D every BN is folded into its conv and every add is split."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet50d", pretrained=False).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    explainer = graphlrp.compile(model, x[:1], rules="epsilon-plus-flat")
    assert explainer.info["batchnorm_folded"] == {"into_producer": n_bn, "into_consumer": 0, "kept": 0}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in explainer.graph_module.modules())
    assert len(explainer.merges) == 16 and explainer.plan.split == "signed"
    logits, relevance = explainer(x)
    with torch.no_grad():
        expected = model(x)
    assert ((logits - expected).abs().max() / expected.abs().max()).item() < 1e-5
    assert torch.isfinite(relevance).all() and relevance.abs().sum() > 0
    zennit_tv = pytest.importorskip("zennit.torchvision")
    from zennit.canonizers import AttributeCanonizer

    applied = zennit_tv.ResNetCanonizer().apply(model)
    try:
        assert not any(isinstance(c, AttributeCanonizer) for c in applied)  # no Sum module put into timm blocks
    finally:
        for c in applied:
            c.remove()


class SEBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(c, 2, 1), nn.Conv2d(2, c, 1)
        self.frozen = None  # a constant gate, to compare with

    def forward(self, x):
        out = self.conv(x)
        gate = self.frozen if self.frozen is not None else torch.sigmoid(
            self.fc2(torch.relu(self.fc1(out.mean((2, 3), keepdim=True)))))
        return torch.relu(out * gate + x)


class SENet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.block, self.fc = nn.Conv2d(3, 6, 3, padding=1), SEBlock(6), nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.block(torch.relu(self.stem(x))).mean((2, 3)))


def test_squeeze_excitation_gate_is_a_constant():
    """The SE gate multiplies the mainstream; graphlrp treats it as a constant (rule 'pass' for the gate op): the
    explanation equals that of the same network with the gate's value frozen into a constant."""
    torch.manual_seed(1)
    model, x = SENet().eval(), torch.randn(1, 3, 8, 8)
    for preset in ["otsuki2024-conserving", "epsilon-plus-flat"]:
        # a tiny random net: epsilon-plus-flat's relevance all but vanishes here (allowed: this tests the gate)
        relevance = graphlrp.compile(model, x, rules=preset, allow_vanishing=True)(x)[1]
        frozen = SENet().eval()
        frozen.load_state_dict(model.state_dict())
        with torch.no_grad():
            out = model.block.conv(torch.relu(model.stem(x)))
            frozen.block.frozen = torch.sigmoid(model.block.fc2(torch.relu(model.block.fc1(out.mean((2, 3),
                                                                                                  keepdim=True)))))
        expected = graphlrp.compile(frozen, x, rules=preset, allow_vanishing=True)(x)[1]
        assert torch.allclose(relevance, expected, rtol=1e-5, atol=1e-8), preset
    check_conserves(model, torch.randn(2, 3, 8, 8))


# ------------------------------------------------------------------------------------------ CIFAR, option A
CIFAR_ACCURACY = {"resnet20": 0.804, "resnet56": 0.825}  # ../shared/README.md, on the 1000 dev images


def _cifar_images():
    path = ASSETS / "cifar10-test-dev.npz"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    d = np.load(path)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = torch.from_numpy(d["images"]).permute(0, 3, 1, 2).float() / 255
    return (x - mean) / std, torch.from_numpy(d["labels"])


@pytest.mark.parametrize("name", ["resnet20", pytest.param("resnet56", marks=pytest.mark.slow)])
def test_cifar_option_a_trained(name):
    """Real trained weights: identity skips with `x[:, :, ::2, ::2]` + channel zero padding (`F.pad`), `+=`,
    `F.relu`, global pooling with a kernel from `x.size()`. Accuracy as stated; conservation on every image."""
    cifar = pytest.importorskip("graphlrp.zoo.cifar")
    weights = ASSETS / "cifar10-resnet" / f"{name}.pt"
    if not weights.is_file():
        pytest.skip(f"{weights} not available")
    x, y = _cifar_images()
    model = getattr(cifar, name)()
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    n_blocks = 9 if name == "resnet20" else 27
    explainer = graphlrp.compile(model, x[:1], rules="otsuki2024-conserving")
    kinds = [m.skip_kind for m in explainer.merges]  # what `inspect` reports (the same analysis)
    assert len(kinds) == n_blocks and kinds.count("other") == 2 and kinds.count("projection") == 0, kinds
    for i in range(0, len(x), 250):
        logits, relevance = explainer(x[i:i + 250])
        with torch.no_grad():
            assert torch.allclose(logits, model(x[i:i + 250]), atol=1e-4)
        ratio = relevance.flatten(1).sum(1) / logits.softmax(-1).max(-1).values
        assert ((ratio - 1).abs() <= CONSERVE_TOL).all(), (i, ratio.min().item(), ratio.max().item())
    with torch.no_grad():
        accuracy = (model(x).argmax(-1) == y).float().mean().item()
    assert accuracy >= CIFAR_ACCURACY[name] - 1e-6, accuracy
    if name != "resnet20":
        return
    # the option-A merges split exactly too
    _, _, sums = explainer.explain_with_taps(x[:8])
    for m in explainer.merges:
        r, r_s, r_m = (sums[f"merge:{m.node}.{k}"] for k in ("R", "R_skip", "R_main"))
        assert torch.allclose(r_s + r_m, r, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------ add spellings
class PreActBlock(nn.Module):
    """Pre-activation: BN → ReLU → conv twice, then the add, which no ReLU follows."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.blocks = nn.Sequential(PreActBlock(8, 8, 1), PreActBlock(8, 16, 2), PreActBlock(16, 16, 1))
        self.bn, self.fc = nn.BatchNorm2d(16), nn.Linear(16, 10)

    def forward(self, x):
        out = F.relu(self.bn(self.blocks(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class AddSpellings(nn.Module):
    """`torch.add(a, b, alpha=...)`, in-place `out.add_(x)` and `out += x` (with a later reader of `out`)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1, self.c2, self.c3 = (nn.Conv2d(8, 8, 3, padding=1) for _ in range(3))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(torch.add(self.c1(x), x, alpha=0.5))
        out = self.c2(x)
        out.add_(x)
        x = torch.relu(out)
        out = self.c3(x)
        out += x
        out = torch.relu(out)
        return self.fc(out.mean((2, 3)))


def _random_bn(model):
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model.eval()


@pytest.mark.parametrize("model_cls,n_merges,n_projection", [(PreActResNet, 3, 1), (AddSpellings, 3, 0)])
@pytest.mark.parametrize("split", ["ratio", "symmetric"])
def test_add_spellings_and_preactivation(model_cls, n_merges, n_projection, split):
    torch.manual_seed(4)
    model = _random_bn(model_cls())
    x = torch.randn(3, 3, 16, 16)
    check_merges(model, x, n_merges, n_projection)
    check_conserves(model, x, split=split)


def test_add_alpha_is_split_with_its_scale():
    """torch.add(a, b, alpha=s) splits h = a + s·b: the operand b's share is that of s·b (signed split: exact)."""
    torch.manual_seed(5)
    model = AddSpellings().eval()
    x = torch.randn(2, 3, 16, 16)
    explainer = graphlrp.compile(model, x[:1], rules="epsilon-plus-flat", allow_vanishing=True)  # tests the split
    _, _, sums = explainer.explain_with_taps(x)
    first = explainer.merges[0].node
    r, r_s, r_m = (sums[f"merge:{first}.{k}"] for k in ("R", "R_skip", "R_main"))
    assert torch.allclose(r_s + r_m, r, rtol=1e-4)
    assert (r_s.abs() > 0).all() and (r_m.abs() > 0).all()
