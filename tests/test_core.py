"""The core compiler, as the spec reads: otsuki2024 numerics against an independent per-layer reference, every split
and include_identity setting, conservation, the merge report, batch correctness and clear errors."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import graphlrp
from reference_lrp import otsuki_reference

SIZE = 64  # a 2-core CI machine; stem, max-pool and strides are those of 224, on a smaller image
TOL = 1e-4


def rel_diff(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.fixture(scope="module", params=["resnet18", "resnet34", "resnet50"])
def tv_model(request):
    torch.manual_seed(0)
    return request.param, getattr(torchvision.models, request.param)().eval()


@pytest.mark.parametrize("split", ["ratio", "symmetric", "signed"])
@pytest.mark.parametrize("include_identity", [True, False])
def test_otsuki2024_matches_reference(tv_model, split, include_identity):
    name, model = tv_model
    x = torch.randn(2, 3, SIZE, SIZE)
    explainer = graphlrp.compile(model, x[:1], rules="otsuki2024", split=split, include_identity=include_identity)
    logits, relevance = explainer(x)
    with torch.no_grad():
        assert rel_diff(logits, model(x)) < 1e-5
    expected, _ = otsuki_reference(model, x, split_mode=split, include_identity=include_identity)
    for i in range(len(x)):
        assert rel_diff(relevance[i], expected[i]) <= TOL, f"{name} sample {i}"
    target = torch.tensor([3, 917])
    _, relevance_t = explainer(x, target)
    expected_t, _ = otsuki_reference(model, x, target=target, split_mode=split, include_identity=include_identity)
    assert rel_diff(relevance_t, expected_t) <= TOL


def test_conserving_preset_conserves_and_splits_exactly(tv_model):
    name, model = tv_model
    x = torch.randn(2, 3, SIZE, SIZE)
    explainer = graphlrp.compile(model, x[:1], rules="otsuki2024-conserving")
    logits, relevance, taps = explainer.explain_with_taps(x)
    p = logits.softmax(-1).max(-1).values
    ratio = relevance.flatten(1).sum(1) / p
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-3), ratio
    assert torch.allclose(taps["input"], relevance.flatten(1).sum(1))
    merges = [k[len("merge:"):-len(".R")] for k in taps if k.startswith("merge:") and k.endswith(".R")]
    assert len(merges) == len(explainer.merges)
    for m in merges:
        r, r_s, r_m = taps[f"merge:{m}.R"], taps[f"merge:{m}.R_skip"], taps[f"merge:{m}.R_main"]
        assert torch.allclose(r_s + r_m, r, rtol=1e-5, atol=1e-7), m
    blocks = sorted(k for k in taps if k.startswith("block_input:"))
    assert len(blocks) == len(explainer.merges)


def test_released_otsuki2024_leaks_at_the_maxpool_stand_in():
    """The released code's 2x2 average pool in place of the 3x3 max-pool loses relevance; report how much."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    x = torch.randn(2, 3, 224, 224)
    logits, relevance = graphlrp.compile(model, x[:1], rules="otsuki2024")(x)
    ratio = relevance.flatten(1).sum(1) / logits.softmax(-1).max(-1).values
    print(f"otsuki2024 on random-weight resnet50: sum R_input / p(y) = {ratio.tolist()}")
    assert ((ratio > 0.85) & (ratio < 0.999)).all(), ratio


@pytest.mark.parametrize("arch, merges, projections", [("resnet18", 8, 3), ("resnet50", 16, 4), ("resnet101", 33, 4)])
def test_inspect_counts_merges(arch, merges, projections):
    found = graphlrp.inspect(getattr(torchvision.models, arch)(), torch.randn(1, 3, 64, 64))
    kinds = [m.skip_kind for m in found]
    assert len(found) == merges
    assert kinds.count("projection") == projections and kinds.count("identity") == merges - projections
    proj = next(m for m in found if m.skip_kind == "projection")
    assert len(proj.skip_nodes) == 2 and len(proj.main_nodes) > len(proj.skip_nodes)


class Nested(nn.Module):
    """Functional torch.add, in-place +=, add_, nested containers, F.relu and torch.relu, a projection skip."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.b = nn.ModuleDict({"main": nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)),
                                "proj": nn.Conv2d(8, 16, 1, stride=2)})
        self.c = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(torch.add(self.a(x), x))
        y = self.b["main"](x)
        y += self.b["proj"](x)
        y = F.relu(y)
        z = self.c(y)
        z.add_(y)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(F.relu(z), 1), 1))


def test_custom_model_compiles_and_conserves():
    torch.manual_seed(0)
    model = Nested().eval()
    x = torch.randn(3, 3, 32, 32)
    merges = graphlrp.inspect(model, x[:1])
    assert [m.skip_kind for m in merges] == ["identity", "projection", "identity"]
    logits, relevance = graphlrp.compile(model, x[:1], rules="otsuki2024-conserving")(x)
    with torch.no_grad():
        assert rel_diff(logits, model(x)) < 1e-5  # the in-place ops did not corrupt the forward
    ratio = relevance.flatten(1).sum(1) / logits.softmax(-1).max(-1).values
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-3), ratio


def test_batch_correct_and_stateless():
    torch.manual_seed(0)
    model = Nested().eval()
    x = torch.randn(4, 3, 32, 32)
    explainer = graphlrp.compile(model, x[:1], allow_vanishing=True)  # random weights: z+ drops ~half of R here
    buffers = {k: v.clone() for k, v in explainer.graph_module.state_dict().items()}
    target = torch.tensor([0, -1, 4, 2])
    _, together = explainer(x, target)
    # each sample is explained on its own: checked in float64, where the choice of conv algorithm per batch size
    # (which moves float32 results by ~1e-4 on some CPUs) is far below the bound
    graph64 = copy.deepcopy(explainer.graph_module).double()
    with torch.no_grad():
        _, together64 = graph64(x.double(), target)
        for i in range(4):
            _, alone64 = graph64(x[i:i + 1].double(), target[i:i + 1])
            assert rel_diff(alone64[0], together64[i]) < 1e-9
    assert rel_diff(together, together64) < 1e-3  # the float32 explainer computes the same thing
    _, again = explainer(x, target)
    assert torch.equal(together, again)
    assert all(torch.equal(buffers[k], v) for k, v in explainer.graph_module.state_dict().items())
    assert "conv_transpose2d" in explainer.code or "conv2d" in explainer.code  # the graph is readable code


def test_ratio_split_without_signal_is_finite():
    """Where |h_m| + |h_s| = 0 the ratio split must not produce NaN."""

    class Silent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            a = torch.relu(self.conv1(x))
            return self.fc(torch.relu(a + self.conv2(a)).mean((2, 3)))

    x = torch.zeros(2, 3, 16, 16)
    for split in ("ratio", "symmetric", "signed"):
        # a zero input: no relevance reaches it (vanishing allowed, this tests the split's 0/0)
        _, relevance = graphlrp.compile(Silent().eval(), x[:1], split=split, allow_vanishing=True)(x)
        assert torch.isfinite(relevance).all()


def test_unsupported_op_names_node_op_and_line():
    class Cumulative(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            y = torch.cumsum(self.conv(x), dim=1)
            return self.fc(y.mean((2, 3)))

    with pytest.raises(graphlrp.UnsupportedOpError) as err:
        graphlrp.compile(Cumulative().eval(), torch.randn(1, 3, 8, 8))
    message = str(err.value)
    assert "cumsum" in message and "test_core.py" in message and "y = torch.cumsum" in message


def test_a_module_without_a_rule_is_named_by_its_class():
    """A module graphlrp has no rule for (a 3-d convolution) is refused with its class, attribute name and line."""
    class Volumetric(nn.Module):
        def __init__(self):
            super().__init__()
            self.volume = nn.Conv3d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(torch.relu(self.volume(x)).mean((2, 3, 4)))

    with pytest.raises(graphlrp.UnsupportedOpError) as err:
        graphlrp.compile(Volumetric().eval(), torch.randn(1, 3, 4, 4, 4))
    message = str(err.value)
    assert "(call_module volume: Conv3d)" in message and "test_core.py" in message, message


def test_untraceable_model_is_a_clear_error():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            if x.sum() > 0:
                x = x * 2
            return self.fc(x.mean((2, 3)))

    with pytest.raises(graphlrp.TraceError, match="cannot trace DataDependent"):
        graphlrp.compile(DataDependent(), torch.randn(1, 3, 8, 8))


@pytest.fixture(scope="module")
def nested_explainer():
    torch.manual_seed(0)  # the weights and the example, whatever ran before
    return graphlrp.compile(Nested().eval(), torch.randn(1, 3, 16, 16), rules="otsuki2024-conserving")


@pytest.mark.parametrize("x, target, said", [
    (torch.randn(2, 3, 32, 32), None, r"input has shape \[2, 3, 32, 32\]; this explainer takes \[N, 3, 16, 16\]"),
    (torch.randn(3, 16, 16), None, r"input has shape \[3, 16, 16\]"),
    (torch.randn(2, 3, 16, 16).double(), None, "input is torch.float64; this explainer computes in torch.float32"),
    (torch.full((2, 3, 16, 16), float("nan")), None, "input contains NaN or infinite values"),
    (torch.randn(2, 3, 16, 16).numpy(), None, "input must be a torch.Tensor"),
    (torch.randn(2, 3, 16, 16), torch.tensor([5, 0]), r"unknown target class 5: this explainer has 5 classes \(0..4\)"),
    (torch.randn(2, 3, 16, 16), -2, "unknown target class -2"),
    (torch.randn(2, 3, 16, 16), torch.tensor([1]), "target must be an integer class or 2 of them"),
    (torch.randn(2, 3, 16, 16), torch.tensor([0.5, 1.0]), "target must be an integer class or 2 of them"),
])
def test_a_call_that_does_not_fit_the_explainer_is_an_input_error(nested_explainer, x, target, said):
    """The graph would broadcast a one-element target over the batch and give an unknown class's relevance as
    zeros without a word; the explainer says what does not fit, as the onnxruntime session does."""
    explainer = nested_explainer
    with pytest.raises(graphlrp.InputError, match=said):
        explainer(x, target)
    with pytest.raises(graphlrp.InputError, match=said):
        explainer.explain_with_taps(x, target)


def test_an_example_without_its_batch_dimension_is_named():
    with pytest.raises(graphlrp.TraceError, match=r"is the example one image \[C, H, W\] = \[3, 16, 16\]\?"):
        graphlrp.compile(Nested().eval(), torch.randn(3, 16, 16))


def test_unknown_preset_and_split_are_clear_errors():
    model = Nested().eval()
    with pytest.raises(graphlrp.PresetError, match="unknown preset 'nope'"):
        graphlrp.compile(model, torch.randn(1, 3, 16, 16), rules="nope")
    with pytest.raises(graphlrp.PresetError, match="split must be one of"):
        graphlrp.compile(model, torch.randn(1, 3, 16, 16), split="half")
