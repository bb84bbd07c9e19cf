"""Every residual CNN: one representative of each torchvision CNN family and over 40 timm architectures compile
with `otsuki2024-conserving` (random weights, BatchNorm statistics away from the identity, small inputs, batch 2),
reproduce the model's logits (≤ 1e-5 relative), conserve relevance (|ΣR_input / p(ŷ) − 1| ≤ 1e-3 per sample),
and — on the models with k-ary adds and branch-dim sums — split exactly at every merge (R = Σ_i R_i).

`graphlrp coverage` runs the same check over the whole zoo and writes results/coverage.md."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import graphlrp

TORCHVISION = {  # family: (model, input size)
    "resnet": ("resnet18", 32), "resnext": ("resnext50_32x4d", 32), "regnet_x": ("regnet_x_400mf", 32),
    "regnet_y": ("regnet_y_400mf", 32), "mobilenet_v2": ("mobilenet_v2", 32),
    "mobilenet_v3": ("mobilenet_v3_small", 32), "mnasnet": ("mnasnet0_5", 32), "efficientnet": ("efficientnet_b0", 32),
    "efficientnet_v2": ("efficientnet_v2_s", 32), "convnext": ("convnext_tiny", 32),
    "shufflenet_v2": ("shufflenet_v2_x0_5", 32), "squeezenet": ("squeezenet1_1", 32),
    "densenet": ("densenet121", 32), "googlenet": ("googlenet", 64), "inception": ("inception_v3", 80),
    "vgg": ("vgg11_bn", 32), "alexnet": ("alexnet", 64),
}
TIMM = ["resnet10t", "resnet18d", "resnet26t", "seresnet18", "seresnext26t_32x4d", "ecaresnet26t", "skresnet18",
        "skresnext50_32x4d", "resnest14d", "res2net50_26w_4s", "res2next50", "cspresnet50", "cspresnext50",
        "resnetv2_50", "resnetv2_50x1_bit", "resnetrs50", "resnetblur18", "resnet50_gn", "nf_resnet26",
        "regnetx_002", "regnety_002", "regnetz_b16", "efficientnet_b0", "tf_efficientnet_b0", "mobilenetv3_small_100",
        "mobilenetv2_050", "mixnet_s", "convnext_atto", "convnextv2_atto", "rexnet_100", "ghostnet_050", "dla46_c",
        "dpn48b", "repvgg_a0", "hrnet_w18_small", "ese_vovnet19b_dw", "lcnet_050", "gernet_s", "cs3darknet_s",
        "xception41", "selecsls42b", "fbnetc_100", "tinynet_e", "densenet121", "mnasnet_small", "spnasnet_100",
        "darknet17", "legacy_seresnet18", "mobileone_s0", "hardcorenas_a", "efficientnetv2_rw_t",
        "ghostnetv2_100", "poolformer_s12", "gcresnet33ts", "resnetv2_50d_frn"]
TIMM_SIZES = {"hrnet_w18_small": 64, "regnetz_b16": 64, "xception41": 64, "poolformer_s12": 64, "ghostnetv2_100": 64}
SPLIT_CHECK = {"res2net50_26w_4s", "resnest14d", "skresnet18", "repvgg_a0", "convnext_atto", "dpn48b"}


def _settled(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _check(model: nn.Module, size: int, split_check: bool = False) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        reference = model(x)
    explainer = graphlrp.compile(model, x[:1], rules="otsuki2024-conserving")
    if split_check:
        logits, relevance, taps = explainer.explain_with_taps(x)
    else:
        logits, relevance = explainer(x)
    diff = ((logits - reference).abs().max() / reference.abs().max()).item()
    assert diff <= 1e-5, diff
    p = logits.double().softmax(-1).max(-1).values
    ratio = relevance.double().flatten(1).sum(1) / p
    assert ((ratio - 1).abs() <= 1e-3).all(), ratio.tolist()
    if split_check:
        assert explainer.merges
        for m in explainer.merges:
            parts = sum(taps[f"merge:{m.node}.R_{i}"] for i in range(m.arity))
            assert torch.allclose(parts, taps[f"merge:{m.node}.R"], rtol=1e-5, atol=1e-8), m.node


@pytest.mark.parametrize("family", sorted(TORCHVISION))
def test_torchvision_family(family):
    torchvision = pytest.importorskip("torchvision")
    name, size = TORCHVISION[family]
    kw = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    torch.manual_seed(0)
    _check(_settled(torchvision.models.get_model(name, weights=None, **kw)), size)


@pytest.mark.parametrize("name", TIMM)
def test_timm_architecture(name):
    timm = pytest.importorskip("timm")
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    _check(_settled(timm.create_model(name, pretrained=False)), TIMM_SIZES.get(name, 32), name in SPLIT_CHECK)



class _SignalProduct(nn.Module):
    """Two convolutions of the input multiplied with `@`: neither factor is a gate (no softmax behind it)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4, 10)

    def forward(self, x):
        a, b = self.a(x).flatten(2), self.b(x).flatten(2)
        return self.fc((a @ b.transpose(1, 2)).flatten(1))


def test_global_context_pooling_gives_its_relevance_to_the_signal_and_a_product_of_signals_is_split_or_refused():
    """A CNN preset holds a matmul's softmax operand constant (global-context attention pooling, as a gate): gcresnet33ts
    is in the zoo above and conserves. A matmul of two signals with no softmax behind either gets AttnLRP's uniform
    rule under otsuki2024-conserving and otsuki2024 (matmul `otherwise = "uniform"`), which conserves in the first; a
    preset with no such rule (epsilon-plus-flat) refuses it, and its error names the node and the source line."""
    from graphlrp.errors import UnsupportedOpError

    torch.manual_seed(0)
    net, x = _SignalProduct().eval(), torch.randn(2, 3, 8, 8)
    explainer = graphlrp.compile(net, x, rules="otsuki2024-conserving")
    _, relevance, taps = explainer.explain_with_taps(x)
    ratio = relevance.double().flatten(1).sum(1) / taps["output"].double()
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-3), ratio
    graphlrp.compile(net, x, rules="otsuki2024", allow_vanishing=True)
    with pytest.raises(UnsupportedOpError, match=r"matmul.*test_zoo.py.*attention weights"):
        graphlrp.compile(net, x, rules="epsilon-plus-flat", allow_vanishing=True)


class _SignalMaximum(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.maximum(self.a(x), self.b(x)).mean((2, 3)))


def test_threshold_units_pass_and_a_maximum_of_two_signals_is_a_clear_error():
    """max(x, τ) with a constant τ (FRN's TLU in resnetv2_50d_frn, in the zoo above) is an activation; the maximum of
    two input-dependent tensors selects between signals and has no rule."""
    from graphlrp.errors import UnsupportedOpError

    with pytest.raises(UnsupportedOpError, match=r"maximum.*two input-dependent tensors"):
        graphlrp.compile(_SignalMaximum().eval(), torch.randn(1, 3, 8, 8), rules="otsuki2024-conserving")


def test_coverage_command_reports_every_model_even_when_the_last_is_skipped(tmp_path):
    """`graphlrp coverage` lists each model with its status; a model skipped by --max-params at the end of the list
    still lands in the report, and a finished run is not marked partial."""
    pytest.importorskip("timm")
    import subprocess
    import sys

    out = tmp_path / "coverage.md"
    proc = subprocess.run([sys.executable, "-m", "graphlrp.cli", "coverage", "--no-torchvision", "--timm",
                           "resnet10t", "--timm", "vgg11", "--max-params", "100", "--skip-large", "--no-onnx",
                           "--size", "32", "-o", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = out.read_text()
    assert "Partial run" not in report
    assert "| timm | resnet10t | 32 | ok |" in report
    assert "| timm | vgg11 | 32 | skipped |" in report
