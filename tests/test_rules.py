"""The rule library, presets and canonisation: each rule against an independent formula, BN folding, pooling
rules, per-layer overrides, non-merge adds, and clear errors for malformed presets."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphlrp
from graphlrp import PresetError, UnsupportedOpError
from graphlrp.presets import available_presets, load_preset


def compile_random(*args, **kwargs):
    """graphlrp.compile for the random-weight nets of these tests, which compare rules with references: there a
    non-conserving rule may lose most of the relevance, which compile's own check refuses unless allowed
    (tests/test_verify.py tests that check); conservation itself is still checked for conserving presets."""
    kwargs.setdefault("allow_vanishing", True)
    return graphlrp.compile(*args, **kwargs)


def rel_diff(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def stab(z, eps):
    """Zennit's stabiliser: z + eps·sign(z), sign(0) = +1."""
    return z + eps * torch.where(z >= 0, 1.0, -1.0)


# ------------------------------------------------------------------------------------------ affine rules
class MLP(nn.Module):
    """Two linear layers with no activation between: the second layer sees signed inputs."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 4)

    def forward(self, x):
        return self.fc2(self.fc1(x))


def _rule_reference(rule, params, a, W, b, R, box):
    """R_in for one linear layer y = W a + b, written from the rules' definitions with contributions c_ji = W_ji a_i
    (a: [N, I], W: [J, I], R: [N, J])."""
    c = W[None] * a[:, None, :]  # [N, J, I]
    eps = params.get("epsilon", 1e-6)
    if rule == "epsilon" and params.get("bias") == "spread":
        # z keeps b; b's share R·b/z goes to the inputs by |c| / Σ|c|; cancelled units spread all of R that way
        z = c.sum(-1) + b
        dead = z.abs() <= params.get("cancelled", 0.0) * (c.abs().sum(-1) + b.abs())
        s = torch.where(dead, 0.0, R / stab(z, eps))
        share = torch.where(dead, R, s * b) / c.abs().sum(-1)
        return torch.einsum("nji,nj->ni", c, s) + torch.einsum("nji,nj->ni", c.abs(), share)
    if rule == "epsilon":
        z = c.sum(-1) + b
        # cancelled units (|z| <= cancelled · Σ|c| + |b|) hand R on in proportion to |c|; the rest divide by z
        magnitude = c.abs().sum(-1) + b.abs()
        dead = z.abs() <= params.get("cancelled", 0.0) * magnitude
        live = torch.einsum("nji,nj->ni", c, torch.where(dead, 0.0, R / stab(z, eps)))
        return live + torch.einsum("nji,nj->ni", c.abs(), torch.where(dead, R / magnitude, 0.0))
    if rule == "zplus":
        cp = c.clamp(min=0)
        return torch.einsum("nji,nj->ni", cp, R / stab(cp.sum(-1) + b.clamp(min=0), eps))
    if rule == "alpha_beta":
        alpha, beta = params["alpha"], params["beta"]
        cp, cn = c.clamp(min=0), c.clamp(max=0)
        out = alpha * torch.einsum("nji,nj->ni", cp, R / stab(cp.sum(-1) + b.clamp(min=0), eps))
        return out - beta * torch.einsum("nji,nj->ni", cn, R / stab(cn.sum(-1) + b.clamp(max=0), eps))
    if rule == "gamma":
        g = params["gamma"]
        z = c.sum(-1) + b
        up, down = c + g * c.clamp(min=0), c + g * c.clamp(max=0)
        r_up = R * (z > 0) / stab(up.sum(-1) + b + g * b.clamp(min=0), eps)
        r_down = R * (z < 0) / stab(down.sum(-1) + b + g * b.clamp(max=0), eps)
        return torch.einsum("nji,nj->ni", up, r_up) + torch.einsum("nji,nj->ni", down, r_down)
    if rule == "flat":
        return (R / stab(torch.full_like(R, W.shape[1]), eps)).sum(-1, keepdim=True).expand_as(a)
    if rule == "wsquare":
        w2 = W ** 2
        return torch.einsum("ji,nj->ni", w2, R / stab(w2.sum(-1) + b ** 2, eps))
    if rule == "zbox":
        low, high = box
        ca = c - W.clamp(min=0)[None] * low - W.clamp(max=0)[None] * high
        return torch.einsum("nji,nj->ni", ca, R / stab(ca.sum(-1), eps))
    raise AssertionError(rule)


@pytest.mark.parametrize("rule,params", [
    ("epsilon", {"epsilon": 0.25}), ("epsilon", {"epsilon": 0.25, "cancelled": 0.3}),
    ("epsilon", {"epsilon": 0.25, "bias": "spread"}), ("epsilon", {"epsilon": 0.25, "bias": "spread", "cancelled": 0.3}),
    ("zplus", {}), ("alpha_beta", {"alpha": 2.0, "beta": 1.0}),
    ("alpha_beta", {"alpha": 1.0, "beta": 0.0}), ("gamma", {"gamma": 0.25}), ("flat", {}), ("wsquare", {}),
    ("zbox", {}),
])
@pytest.mark.parametrize("layer", ["first_layer", "linear"])
def test_affine_rule_matches_its_formula(rule, params, layer):
    """Each rule on the first layer (raw, signed input) and on a hidden layer with signed inputs."""
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(3, 6)
    box = (-1.5, 2.0)
    other = "first_layer" if layer == "linear" else "linear"
    preset = {"output": "logit", "rules": {layer: {"rule": rule, **params}, other: "epsilon"}}
    logits, relevance = compile_random(model, x[:1], rules=preset, box=box)(x)
    # the reference: epsilon at the other layer, the rule under test at its own
    rules = {"fc1": ("epsilon", {}), "fc2": ("epsilon", {})}
    rules["fc1" if layer == "first_layer" else "fc2"] = (rule, params)
    target = logits.argmax(-1)
    R = torch.zeros_like(logits)
    R[torch.arange(3), target] = logits[torch.arange(3), target]
    h = model.fc1(x).detach()
    R_h = _rule_reference(*rules["fc2"], h, model.fc2.weight.detach(), model.fc2.bias.detach(), R, box)
    expected = _rule_reference(*rules["fc1"], x, model.fc1.weight.detach(), model.fc1.bias.detach(), R_h, box)
    assert rel_diff(relevance, expected) <= 1e-5


def test_epsilon_spreads_cancelled_units_and_conserves():
    """A unit whose contributions cancel (z = 1e-7 of Σ|a w|) divides R by rounding noise under the plain ε-rule;
    with `cancelled` it hands R on by |a w| instead: the float64 formula, and conservation in float32."""
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(2, 6)
    with torch.no_grad():
        w = model.fc1.weight[0]
        w[-1] = -(w[:-1] * x[0, :-1]).sum() / x[0, -1]  # unit 0 of fc1 cancels to rounding on sample 0
    rules = {"epsilon": 1e-9, "bias": "zero", "cancelled": 1e-4}
    preset = {"output": "logit", "conserving": True,
              "rules": {"first_layer": {"rule": "epsilon", **rules}, "linear": {"rule": "epsilon", **rules}}}
    explainer = graphlrp.compile(model, x[:1], rules=preset)
    logits, relevance = explainer(x)
    target = logits.argmax(-1)
    R = torch.zeros_like(logits, dtype=torch.float64)
    R[torch.arange(2), target] = logits[torch.arange(2), target].double()
    xd, m = x.double(), model.double()
    zero = lambda layer: torch.zeros(layer.out_features, dtype=torch.float64)  # noqa: E731
    R_h = _rule_reference("epsilon", rules, m.fc1(xd).detach(), m.fc2.weight.detach(), zero(m.fc2), R, None)
    expected = _rule_reference("epsilon", rules, xd, m.fc1.weight.detach(), zero(m.fc1), R_h, None)
    assert rel_diff(relevance, expected) <= 1e-5
    gap = (relevance.double().sum(-1) - R.sum(-1)).abs()
    assert (gap <= 1e-6 * relevance.double().abs().sum(-1)).all()  # conserved to float32 rounding of Σ|R|
    plain = _rule_reference("epsilon", {"epsilon": 1e-9}, xd, m.fc1.weight.detach(), zero(m.fc1), R_h, None)
    assert rel_diff(plain, expected) > 1  # the plain rule's map is dominated by the cancelled unit


def test_epsilon_stabiliser_treats_zero_as_positive():
    """ε·sign(z) with sign(0) = +1: a unit whose pre-activation is exactly 0 divides by +ε."""
    model = MLP().eval()
    with torch.no_grad():
        model.fc1.weight.copy_(torch.eye(5, 6))
        model.fc1.bias.zero_()
        model.fc2.weight.fill_(1.0)
        model.fc2.bias.zero_()
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])  # fc1's first unit: z = 0 exactly
    # flat above: unit 0 of fc1 receives relevance although its z is 0; epsilon below divides it by +eps
    preset = {"output": "logit", "rules": {"first_layer": {"rule": "epsilon", "epsilon": 0.5},
                                           "linear": "flat"}}
    logits, relevance = compile_random(model, x, rules=preset)(x, 0)
    R_h = logits[0, 0] / 5  # flat: the target's relevance spread evenly over fc1's 5 units
    z = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    expected = torch.zeros(6)
    expected[:5] = x[0, :5] * R_h / (z + 0.5)  # z >= 0 everywhere: +eps, also where z = 0
    assert torch.allclose(relevance[0], expected, atol=1e-6)
    assert relevance[0, 0] == 0  # a = 0 there; the unit itself got R_h / (0 + eps) · 0
    model.fc1.bias.data[0] = -1.0  # now z = -1 at unit 0: -eps
    logits, relevance = compile_random(model, x, rules=preset)(x, 0)
    assert torch.isfinite(relevance).all()


def test_alpha1_beta0_is_zplus():
    torch.manual_seed(1)
    model = MLP().eval()
    x = torch.randn(4, 6)
    zp = compile_random(model, x[:1], rules={"rules": {"first_layer": "zplus", "linear": "zplus"}})(x)[1]
    ab = compile_random(model, x[:1], rules={"rules": {"first_layer": {"rule": "alpha_beta", "alpha": 1.0,
                                                                         "beta": 0.0},
                                                         "linear": {"rule": "alpha_beta", "alpha": 1.0,
                                                                    "beta": 0.0}}})(x)[1]
    assert rel_diff(ab, zp) <= 1e-6


def test_gamma_zero_is_epsilon():
    torch.manual_seed(2)
    model = MLP().eval()
    x = torch.randn(4, 6)
    g0 = compile_random(model, x[:1], rules={"rules": {"first_layer": {"rule": "gamma", "gamma": 0.0},
                                                         "linear": "epsilon"}})(x)[1]
    ep = compile_random(model, x[:1], rules={"rules": {"first_layer": "epsilon", "linear": "epsilon"}})(x)[1]
    assert rel_diff(g0, ep) <= 1e-5


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def test_box_bounds_default_and_override():
    """zB bounds default to the ImageNet-normalised range of [0, 1] per channel; compile(box=...) overrides."""
    torch.manual_seed(3)
    model = ConvNet().eval()
    x = torch.randn(2, 3, 12, 12)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    default = compile_random(model, x[:1], rules="epsilon-gamma-box")(x)[1]
    explicit = compile_random(model, x[:1], rules="epsilon-gamma-box", box=((0 - mean) / std, (1 - mean) / std))
    assert torch.allclose(explicit(x)[1], default)
    other = compile_random(model, x[:1], rules="epsilon-gamma-box", box=(-3.0, 3.0))(x)[1]
    assert rel_diff(other, default) > 1e-3
    in_toml = compile_random(model, x[:1], rules={"output": "logit", "split": "signed", "batchnorm": "fold",
                                                    "rules": {"first_layer": {"rule": "zbox", "low": -3.0,
                                                                              "high": 3.0},
                                                              "conv": "gamma", "linear": "epsilon",
                                                              "avgpool": "z"}})(x)[1]
    assert torch.allclose(in_toml, other, atol=1e-7)


# ------------------------------------------------------------------------------------------ pooling
class Pooled(nn.Module):
    def __init__(self, pool: nn.Module, features: int):
        super().__init__()
        self.pool, self.fc = pool, nn.Linear(features, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(x), 1))


def _pool_case(pool, size=(7, 9)):
    torch.manual_seed(4)
    x = torch.rand(2, 4, *size) + 0.1  # positive, like post-ReLU activations
    with torch.no_grad():
        n = pool(x[:1]).numel()
    return Pooled(pool, n).eval(), x


def _flat_R(model, x):
    """Relevance at the pool's output when the linear layer uses the flat rule: the logit, spread evenly."""
    with torch.no_grad():
        logits = model(x)
        out = model.pool(x)
    t = logits.argmax(-1)
    return (logits[torch.arange(len(x)), t] / out[0].numel()).view(-1, 1, 1, 1).expand_as(out), out


@pytest.mark.parametrize("pool", [nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(2), nn.MaxPool2d(3, 2, 1, ceil_mode=True)],
                         ids=["3x3s2p1", "2x2", "ceil"])
def test_winner_take_all_routes_to_the_maximum(pool):
    model, x = _pool_case(pool)
    preset = {"output": "logit", "rules": {"first_layer": "flat", "maxpool": "winner_take_all"}}
    _, relevance = compile_random(model, x[:1], rules=preset)(x)
    R, _ = _flat_R(model, x)
    a = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad(model.pool(a), a, R)  # max-pool's gradient: winner-take-all
    assert torch.allclose(relevance, expected, atol=1e-6)
    assert torch.allclose(relevance.sum((1, 2, 3)), R.sum((1, 2, 3)), rtol=1e-5)


@pytest.mark.parametrize("pool,kind", [
    (nn.MaxPool2d(3, 2, 1), "window_average"),
    (nn.AvgPool2d(3, 2, 1), "z"),
    (nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False), "z"),  # ResNet-D shortcut, odd input
    (nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False), "z"),
    (nn.AdaptiveAvgPool2d((1, 3)), "z"),
], ids=["maxpool-window-average", "avg3x3p1", "avg-ceil-nopad", "avg3x3-ceil-nopad", "adaptive"])
def test_window_z_rule_matches_formula_and_conserves(pool, kind):
    model, x = _pool_case(pool)
    category = "maxpool" if isinstance(pool, nn.MaxPool2d) else "avgpool"
    preset = {"output": "logit", "rules": {"first_layer": "flat", category: kind}}
    _, relevance = compile_random(model, x[:1], rules=preset)(x)
    R, out = _flat_R(model, x)
    avg = pool if category == "avgpool" else nn.AvgPool2d(pool.kernel_size, pool.stride, pool.padding)
    a = x.clone().requires_grad_()
    z = avg(a)
    (g,) = torch.autograd.grad(z, a, R / stab(z.detach(), 1e-6))
    expected = x * g  # z-rule: R_i = a_i Σ_w (∂z_w/∂a_i) R_w / z_w, with PyTorch's own divisors
    assert rel_diff(relevance, expected) <= 1e-5
    assert torch.allclose(relevance.sum((1, 2, 3)), R.sum((1, 2, 3)), rtol=1e-4)


def test_global_mean_without_keepdim():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x.mean((2, 3)))

    torch.manual_seed(5)
    x = torch.rand(2, 4, 5, 5)
    _, relevance = compile_random(M().eval(), x[:1], rules={"output": "logit", "rules": {
        "first_layer": "flat", "avgpool": "z"}})(x)
    assert relevance.shape == x.shape and torch.isfinite(relevance).all()


def test_avgpool_divisor_override_is_a_clear_error():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4 * 4, 3)

        def forward(self, x):
            return self.fc(torch.flatten(F.avg_pool2d(x, 2, divisor_override=3), 1))

    with pytest.raises(UnsupportedOpError, match="divisor_override"):
        compile_random(M().eval(), torch.rand(1, 4, 4, 4), rules="otsuki2024-conserving")


# ------------------------------------------------------------------------------------------ batch norm
def _random_bn(bn):
    n = bn.num_features
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.5, 0.5)
    assert n > 0
    return bn


class BNConsumers(nn.Module):
    """BN after a conv (fold into producer), BN before a 1×1 grouped conv and before a linear (fold into the
    consumer: exact, no padding), BN before a padded 3×3 conv (not foldable: kept, relevance passes)."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = _random_bn(nn.BatchNorm2d(8))
        self.bn1 = _random_bn(nn.BatchNorm2d(8))
        self.conv1 = nn.Conv2d(8, 8, 1, groups=2)
        self.bn2 = _random_bn(nn.BatchNorm2d(8))
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn3 = _random_bn(nn.BatchNorm1d(8))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn0(self.conv0(x)))
        x = torch.relu(self.conv1(self.bn1(x)))
        x = torch.relu(self.conv2(self.bn2(x)))
        return self.fc(self.bn3(x.mean((2, 3))))


FOLDING_PRESET = {"output": "logit", "batchnorm": "fold", "rules": {"first_layer": "epsilon", "conv": "epsilon",
                                                                    "linear": "epsilon", "avgpool": "z"}}


def folded_by_hand(model: BNConsumers) -> BNConsumers:
    """The same model with the foldable BNs folded by hand into their producer or consumer (the reference)."""
    folded = copy.deepcopy(model)
    with torch.no_grad():
        for conv, bn, before in [(folded.conv0, folded.bn0, True), (folded.conv1, folded.bn1, False),
                                 (folded.fc, folded.bn3, False)]:
            s = bn.weight / (bn.running_var + bn.eps).sqrt()
            t = bn.bias - bn.running_mean * s
            if before:
                conv.bias.copy_(conv.bias * s + t)
                conv.weight.mul_(s.view(-1, 1, 1, 1))
            elif isinstance(conv, nn.Linear):
                conv.bias.add_(conv.weight @ t)
                conv.weight.mul_(s.view(1, -1))
            else:  # grouped 1x1 conv: output o reads input channels of its group
                cin_g = conv.weight.shape[1]
                ch = (torch.arange(8) // (8 // conv.groups)).view(-1, 1) * cin_g + torch.arange(cin_g)
                conv.bias.add_((conv.weight[:, :, 0, 0] * t[ch]).sum(1))
                conv.weight.mul_(s[ch][..., None, None])
            for name in ("running_mean", "bias"):
                getattr(bn, name).zero_()
            bn.running_var.fill_(1.0 - bn.eps)
            bn.weight.fill_(1.0)
    return folded


def test_batchnorm_folding_is_exact_and_reported():
    """Folding reports what it folded, keeps the logits, and explains exactly as the model folded by hand. The
    comparison runs in float64: this ε-rule graph cancels most of its relevance (ΣR ≈ -0.03 of the largest
    entries), so float32 rounding alone moves it by ~1e-4 and would hide, or fake, a folding error."""
    torch.manual_seed(6)
    model = BNConsumers().eval()
    x = torch.randn(3, 3, 10, 10)
    explainer = compile_random(model, x[:1], rules=FOLDING_PRESET)
    assert explainer.info["batchnorm_folded"] == {"into_producer": 1, "into_consumer": 2, "kept": 1}
    with torch.no_grad():
        assert rel_diff(explainer(x)[0], model(x)) <= 1e-6
    double = copy.deepcopy(model).double()
    by_hand = folded_by_hand(double)
    with torch.no_grad():
        assert rel_diff(by_hand(x.double()), double(x.double())) <= 1e-12
    relevance = compile_random(double, x[:1].double(), rules=FOLDING_PRESET)(x.double())[1]
    expected = compile_random(by_hand, x[:1].double(), rules={**FOLDING_PRESET, "batchnorm": "pass"})(x.double())[1]
    assert rel_diff(relevance, expected) <= 1e-10


def test_batchnorm_folding_keeps_a_float64_models_dtype():
    """A float64 model compiles with batch norm folded (the folded layers are float64 too: the float64 twin that
    tells a leak from rounding, and the advice to compile in float64, rely on it), and explains like float32 up to
    float32's rounding on this cancelling graph (3.7e-4 on an AMD EPYC; the exact check is the test above)."""
    torch.manual_seed(6)
    model = BNConsumers().eval()
    x = torch.randn(3, 3, 10, 10)
    single = compile_random(model, x[:1], rules=FOLDING_PRESET)(x)[1]
    double = compile_random(copy.deepcopy(model).double(), x[:1].double(), rules=FOLDING_PRESET)
    assert double.info["batchnorm_folded"] == {"into_producer": 1, "into_consumer": 2, "kept": 1}
    relevance = double(x.double())[1]
    assert relevance.dtype == torch.float64 and rel_diff(relevance.float(), single) <= 5e-3


def test_batchnorm_pass_keeps_every_bn():
    """batchnorm = "pass": nothing folded; relevance crosses each BN unchanged."""
    torch.manual_seed(6)
    model = BNConsumers().eval()
    x = torch.randn(2, 3, 10, 10)
    explainer = compile_random(model, x[:1], rules="otsuki2024-conserving")
    assert "batchnorm_folded" not in explainer.info and explainer.info["batchnorm"] == "pass"
    assert all(f"self.bn{i}(" in explainer.code for i in range(4))

    class WithBN(MLP):
        def __init__(self):
            super().__init__()
            self.bn = _random_bn(nn.BatchNorm1d(5))

        def forward(self, x):
            return self.fc2(self.bn(self.fc1(x)))

    mlp, x = WithBN().eval(), torch.randn(3, 6)
    logits, relevance = compile_random(mlp, x[:1], rules={"output": "logit", "rules": {
        "first_layer": "epsilon", "linear": "epsilon", "batchnorm": "pass"}})(x)
    R = torch.zeros_like(logits)
    t = logits.argmax(-1)
    R[torch.arange(3), t] = logits[torch.arange(3), t]
    with torch.no_grad():
        h = mlp.fc1(x)
        R_h = _rule_reference("epsilon", {}, mlp.bn(h), mlp.fc2.weight, mlp.fc2.bias, R, None)
        expected = _rule_reference("epsilon", {}, x, mlp.fc1.weight, mlp.fc1.bias, R_h, None)  # R_h unchanged
    assert rel_diff(relevance, expected) <= 1e-5


def test_conserving_preset_closes_dead_unit_leaks():
    """otsuki2024-conserving: units with no positive input (z⁺ ≤ ε) spread their relevance by W⁺ (evenly where W⁺
    is zero as well), pooling windows that average ~0 spread theirs evenly, all other denominators are exact.
    BN shifts that put relevance on channels whose activations are all zero therefore lose nothing."""
    torch.manual_seed(6)
    model = BNConsumers().eval()
    x = torch.randn(4, 3, 10, 10)
    logits, relevance = compile_random(model, x[:1], rules="otsuki2024-conserving")(x)
    ratio = relevance.flatten(1).sum(1) / logits.softmax(-1).max(-1).values
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5), ratio
    leaky = {"rules": {"first_layer": {"rule": "zplus", "bias": "zero", "input": "ones"},
                       "conv": {"rule": "zplus", "bias": "zero"}, "linear": {"rule": "zplus", "bias": "zero"},
                       "avgpool": "z", "maxpool": "winner_take_all"}}
    logits, relevance = compile_random(model, x[:1], rules=leaky)(x)
    assert (relevance.flatten(1).sum(1) / logits.softmax(-1).max(-1).values < 0.999).any()  # dropped

    class EdgeFilter(nn.Module):
        # a first-layer filter whose positive taps lie only on its right column: at the right border its
        # receptive field holds no positive weight at all; the second filter has none anywhere
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 2, 3, padding=1, bias=False), nn.Linear(2, 2)
            with torch.no_grad():
                self.conv.weight.fill_(-1.0)
                self.conv.weight[0, 0, :, 2] = 1.0

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x) + 5.0).mean((2, 3)))

    m, x = EdgeFilter().eval(), torch.randn(2, 1, 5, 5)
    logits, relevance = compile_random(m, x[:1], rules="otsuki2024-conserving")(x)
    ratio = relevance.flatten(1).sum(1) / logits.softmax(-1).max(-1).values
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5), ratio


def test_functional_batch_norm_is_folded():
    """timm's BatchNormAct2d calls F.batch_norm: folded like the module."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = _random_bn(nn.BatchNorm2d(4))
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            b = self.bn
            x = F.batch_norm(self.conv(x), b.running_mean, b.running_var, b.weight, b.bias, False, 0.1, b.eps)
            return self.fc(torch.relu(x).mean((2, 3)))

    torch.manual_seed(7)
    model, x = M().eval(), torch.randn(2, 3, 8, 8)
    explainer = compile_random(model, x[:1], rules="epsilon-plus-flat")
    assert explainer.info["batchnorm_folded"]["into_producer"] == 1
    with torch.no_grad():
        assert rel_diff(explainer(x)[0], model(x)) <= 1e-6


def test_compile_leaves_the_global_rng_alone():
    """Folding builds new layers without random initialisation: compiling does not shift the user's random
    stream (a script that seeds once and then draws models and inputs draws the same ones with or without it)."""
    torch.manual_seed(12)
    model, x = BNConsumers().eval(), torch.randn(1, 3, 10, 10)
    state = torch.get_rng_state()
    for preset in ["epsilon-plus-flat", "otsuki2024-conserving"]:
        compile_random(model, x, rules=preset)(x)
    assert torch.equal(state, torch.get_rng_state())


# ------------------------------------------------------------------------------------------ presets
def test_shipped_presets():
    names = available_presets()
    for name in ["otsuki2024", "otsuki2024-conserving", "epsilon-plus-flat", "epsilon-gamma-box",
                 "epsilon-alpha2-beta1"]:
        assert name in names
    for name in ["epsilon-plus-flat", "epsilon-gamma-box", "epsilon-alpha2-beta1"]:
        p = load_preset(name)
        assert (p.output, p.split, p.batchnorm, p.include_identity) == ("logit", "signed", "fold", True)
    assert load_preset("epsilon-plus-flat").rules["first_layer"].rule == "flat"
    assert load_preset("epsilon-gamma-box").rules["first_layer"].rule == "zbox"
    assert load_preset("epsilon-gamma-box").rules["conv"].rule == "gamma"
    assert load_preset("epsilon-alpha2-beta1").rules["conv"].params == {"alpha": 2.0, "beta": 1.0,
                                                                       "epsilon": 1e-6, "stabilizer": "signed"}


def test_compiled_graph_is_readable():
    torch.manual_seed(8)
    model, x = ConvNet().eval(), torch.randn(1, 3, 8, 8)
    explainer = compile_random(model, x, rules="epsilon-plus-flat")
    assert isinstance(explainer.graph_module, torch.fx.GraphModule)
    assert "conv_transpose2d" in explainer.code or "conv2d" in explainer.code
    assert explainer.graph_module(x, torch.tensor([-1]))[1].shape == x.shape


@pytest.mark.parametrize("data,key", [
    ({"outputs": "logit"}, "'outputs'"),
    ({"output": "logits"}, "output"),
    ({"split": "half"}, "split"),
    ({"batchnorm": "merge"}, "batchnorm"),
    ({"include_identity": "yes"}, "include_identity"),
    ({"rules": "zplus"}, "[rules]"),
    ({"rules": {"convolution": "zplus"}}, "rules.convolution"),
    ({"rules": {"conv": "zpls"}}, "rules.conv: unknown rule 'zpls'"),
    ({"rules": {"conv": {"epsilon": 1e-6}}}, "rules.conv: a rule table needs a 'rule' key"),
    ({"rules": {"conv": {"rule": "zplus", "eps": 1e-6}}}, "rules.conv.eps"),
    ({"rules": {"conv": {"rule": "zplus", "stabilizer": "sign"}}}, "rules.conv.stabilizer"),
    ({"rules": {"conv": {"rule": "zplus", "epsilon": "small"}}}, "rules.conv.epsilon"),
    ({"rules": {"conv": {"rule": "gamma", "gamma": -1}}}, "rules.conv.gamma"),
    ({"rules": {"conv": {"rule": "zbox", "low": "zero"}}}, "rules.conv.low"),
    ({"rules": {"conv": {"rule": "alpha_beta", "alpha": 2.0, "beta": 2.0}}}, "rules.conv: alpha_beta"),
    ({"rules": {"conv": "winner_take_all"}}, "rules.conv: rule 'winner_take_all' does not apply"),
    ({"rules": {"conv": 3}}, "rules.conv"),
    ({"overrides": {"layer4.*": "nonsense"}}, "overrides.'layer4.*'"),
    ({"overrides": ["layer4.*"]}, "[overrides]"),
])
def test_malformed_preset_names_the_key(data, key):
    with pytest.raises(PresetError) as e:
        load_preset(data)
    assert key in str(e.value)


def test_preset_files(tmp_path):
    good = tmp_path / "mine.toml"
    good.write_text('output = "logit"\n[rules]\nconv = "zplus"\n[overrides]\n"fc" = "flat"\n')
    p = load_preset(str(good))
    assert p.name == "mine" and p.rules["conv"].rule == "zplus" and p.overrides["fc"].rule == "flat"
    bad = tmp_path / "bad.toml"
    bad.write_text('output = "logit"\n[rules]\nconv = { rule = "zplus", bais = "zero" }\n')
    with pytest.raises(PresetError, match=r"rules\.conv\.bais"):
        load_preset(str(bad))
    broken = tmp_path / "broken.toml"
    broken.write_text("output = \n")
    with pytest.raises(PresetError, match="not valid TOML"):
        load_preset(str(broken))
    with pytest.raises(PresetError, match="unknown preset 'epsilon-plus-flatt'"):
        load_preset("epsilon-plus-flatt")
    with pytest.raises(PresetError, match="not found"):
        load_preset(str(tmp_path / "missing.toml"))


def test_preset_without_a_needed_rule_is_a_clear_error():
    with pytest.raises(PresetError, match="no rule for conv layers"):
        compile_random(ConvNet().eval(), torch.randn(1, 3, 8, 8), rules={"rules": {"first_layer": "zplus"}})


# ------------------------------------------------------------------------------------------ overrides
def test_overrides_in_toml_and_as_argument(tmp_path):
    torch.manual_seed(9)
    model, x = ConvNet().eval(), torch.randn(2, 3, 8, 8)
    base = compile_random(model, x[:1], rules="epsilon-plus-flat")(x)[1]
    by_arg = compile_random(model, x[:1], rules="epsilon-plus-flat", overrides={"conv2": "epsilon"})(x)[1]
    assert rel_diff(by_arg, base) > 1e-3
    text = (graphlrp.presets.preset_dir() / "epsilon-plus-flat.toml").read_text()
    path = tmp_path / "custom.toml"
    path.write_text(text + '\n[overrides]\n"conv2" = "epsilon"\n')
    by_toml = compile_random(model, x[:1], rules=str(path))(x)[1]
    assert torch.equal(by_toml, by_arg)
    # the argument wins over the file's own override for the same pattern
    back = compile_random(model, x[:1], rules=str(path), overrides={"conv2": "zplus"})(x)[1]
    assert torch.allclose(back, base)
    # an override reaches only layers its rule fits: "*" = "winner_take_all" changes nothing here
    same = compile_random(model, x[:1], rules="epsilon-plus-flat", overrides={"*": "winner_take_all"})(x)[1]
    assert torch.equal(same, base)
    with pytest.raises(PresetError, match="overrides"):
        compile_random(model, x[:1], rules="epsilon-plus-flat", overrides={"conv2": "bogus"})


def test_overrides_match_node_names_of_functional_layers():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w2 = nn.Parameter(torch.randn(4, 3, 3, 3)), nn.Parameter(torch.randn(5, 4))

        def forward(self, x):
            return F.linear(torch.relu(F.conv2d(x, self.w1, padding=1)).mean((2, 3)), self.w2)

    torch.manual_seed(10)
    model, x = M().eval(), torch.randn(2, 3, 6, 6)
    base = compile_random(model, x[:1], rules="epsilon-plus-flat")(x)[1]
    over = compile_random(model, x[:1], rules="epsilon-plus-flat", overrides={"conv2d*": "zplus"})(x)[1]
    assert rel_diff(over, base) > 1e-3


# ------------------------------------------------------------------------------------------ adds and errors
class NonMergeAdds(nn.Module):
    """x + constant, x + parameter, torch.add(param, x, alpha=...) and x * constant: no merges; relevance passes to
    the input-dependent operand."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.shift = nn.Parameter(torch.randn(1, 6, 1, 1) * 0.1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = self.conv(x) + 0.5
        x = x + self.shift
        x = torch.add(self.shift, x, alpha=2.0)
        x = torch.relu(x * 1.5)
        return self.fc(x.mean((2, 3)))


def test_adds_that_are_not_merges_pass_relevance():
    torch.manual_seed(11)
    model, x = NonMergeAdds().eval(), torch.randn(2, 3, 8, 8)
    assert graphlrp.inspect(model, x[:1]) == []
    logits, relevance = compile_random(model, x[:1], rules="otsuki2024-conserving")(x)
    ratio = relevance.flatten(1).sum(1) / logits.softmax(-1).max(-1).values
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-3)
    # The same function with the constants folded into the conv: relu(3·conv(x) + 1.5 + 4.5·shift). z⁺ without
    # biases is invariant to the scale, so if the adds and the product pass relevance unchanged (their rule), the
    # two explanations agree.
    with torch.no_grad():
        conv = nn.Conv2d(3, 6, 3, padding=1)
        conv.weight.copy_(model.conv.weight * 3.0)
        conv.bias.copy_(model.conv.bias * 3.0 + 1.5 + model.shift.view(-1) * 4.5)
    ref = _Plain(conv, model.fc).eval()
    with torch.no_grad():
        assert rel_diff(ref(x), model(x)) <= 1e-5
    r_plain = compile_random(ref, x[:1], rules="otsuki2024-conserving")(x)[1]
    assert rel_diff(relevance, r_plain) <= 1e-4


class _Plain(nn.Module):
    def __init__(self, conv, fc):
        super().__init__()
        self.conv, self.fc = conv, fc

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("body,needle", [
    (lambda self, x: self.conv(x) * self.conv(x), "mul"),  # a same-shape product of two signals, neither a gate
    (lambda self, x: torch.cumsum(self.conv(x), 1), "cumsum"),  # linear, but no rearrangement: no derived adjoint
    (lambda self, x: torch.exp(self.conv(x)), "exp"),  # not a torch.nn activation
])
def test_ops_with_no_rule_are_clear_errors(body, needle):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(body(self, x).mean((2, 3)))

    with pytest.raises(UnsupportedOpError) as e:
        compile_random(M().eval(), torch.randn(1, 3, 8, 8), rules="epsilon-plus-flat")
    assert needle in str(e.value)


class _ZeroAtTheAdd(nn.Module):
    """h = conv(x) + relu(x) with both operands exactly 0 in channel 0 for x = [-1, 0]; the output is h itself."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 1.0]]).view(2, 2, 1, 1))

    def forward(self, x):
        return torch.flatten(self.conv(x) + torch.relu(x), 1)


@pytest.mark.parametrize("split", ["ratio", "symmetric"])
def test_split_of_relevance_where_both_operands_are_zero_is_even(split):
    """|h_m| + |h_s| = 0 leaves the ratio undefined: both operands get half, and the sum is kept."""
    x = torch.tensor([-1.0, 0.0]).view(1, 2, 1, 1)
    explainer = compile_random(_ZeroAtTheAdd().eval(), x, rules="otsuki2024", split=split)
    _, _, taps = explainer.explain_with_taps(x, torch.tensor([0]))
    (name,) = {k.rsplit(".", 1)[0] for k in taps if k.startswith("merge:")}
    R, r_skip, r_main = (taps[f"{name}.{part}"] for part in ("R", "R_skip", "R_main"))
    assert R.item() == pytest.approx(torch.softmax(torch.tensor([0.0, -1.0]), 0)[0].item(), rel=1e-6)
    assert r_skip.item() == pytest.approx(R.item() / 2, rel=1e-6)
    assert r_main.item() == pytest.approx(R.item() / 2, rel=1e-6)


def test_epsilon_with_the_bias_share_spread_conserves_on_trained_batchnorm_resnets():
    """An ε-rule that leaves biases out of z (bias = "zero"): on the trained CIFAR ResNet-20, with batch norm
    passed, it divides by bias-free z that is ~0 where the unit's input is not, and Σ|R| reaches 10¹⁵× the output
    (the compile refuses it). With batch norm folded into the convolutions and bias = "spread" on every layer
    (z keeps the folded shift, whose share of R goes to the inputs by |a w|) it conserves to 1e-6 with Σ|R| about
    10× the output. (cp-lrp-conserving spreads at its convolutions, not at the first layer: ~300×.)"""
    from pathlib import Path

    import numpy as np

    from graphlrp.presets import load_preset
    from graphlrp.zoo.cifar import resnet20

    assets = Path(__file__).resolve().parents[2] / "shared" / "assets"
    if not (assets / "cifar10-resnet" / "resnet20.pt").is_file():
        pytest.skip("needs ../shared/assets")
    model = resnet20().eval()
    model.load_state_dict(torch.load(assets / "cifar10-resnet" / "resnet20.pt", weights_only=True))
    x = torch.from_numpy(np.load(assets / "cifar10-test-dev.npz")["images"][:4]).permute(0, 3, 1, 2).float() / 255
    base = load_preset("cp-lrp-conserving")
    spread = {k: {**v, "bias": "spread"} for k, v in
              {"first_layer": base.rules["first_layer"].params, "conv": base.rules["conv"].params,
               "linear": base.rules["linear"].params}.items()}
    preset = {"output": "logit", "split": "ratio", "conserving": True, "batchnorm": "fold",
              "rules": {**{k: {"rule": "epsilon", **v} for k, v in spread.items()}, "activation": "pass",
                        "avgpool": {"rule": "z", "epsilon": 1e-6, "stabilizer": "signed", "dead_units": "spread"},
                        "merge": {"rule": "split", "epsilon": 1e-9, "stabilizer": "signed"}}}
    explainer = graphlrp.compile(model, x[:1], rules=preset)
    logits, relevance, taps = explainer.explain_with_taps(x)
    assert ((taps["input"] / taps["output"] - 1).abs() <= 1e-6).all()
    assert (relevance.flatten(1).abs().sum(1) / taps["output"].abs() <= 100).all()


class _DeadWindows(nn.Module):
    """A depthwise convolution fed by a ReLU that is mostly 0, then batch norm (folded into it as a bias): many of
    its units see only zeros in their 3×3 window, so their output is their bias alone, and relevance reaches them."""

    def __init__(self, bias: bool):
        super().__init__()
        self.c1 = nn.Conv2d(3, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=bias)
        self.bn = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 5)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)
            self.bn.weight.uniform_(0.5, 2)
            self.bn.bias.uniform_(-1, 1)
            self.c1.bias.fill_(-1.0)  # most of the ReLU's outputs are 0

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.c2(torch.relu(self.c1(x))))).mean((2, 3)))


@pytest.mark.parametrize("bias", ["spread", "zero"])
def test_epsilon_hands_on_the_relevance_of_units_that_see_only_zeros(bias):
    """The conserving ε variants (bias share spread; bias left out with cancelled units spread) divide by
    Σ_i |a_i w_ij|, which is 0 for a unit whose whole window is 0. Such a unit still hands its relevance on, to its
    window by |w| alone: the sum is conserved (it lost ~65% here before), and every window position gets its share
    by the weights (checked against a hand computation for one unit)."""
    torch.manual_seed(0)
    model = _DeadWindows(bias=True).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a = torch.relu(model.c1(x))
        window_sums = F.conv2d(a, torch.ones(32, 1, 3, 3), padding=1, groups=32)
    assert (window_sums == 0).float().mean() > 0.05  # the case is there: units whose window is all 0
    rule = {"rule": "epsilon", "epsilon": 1e-9, "stabilizer": "signed", "bias": bias, "cancelled": 1e-4}
    preset = {"output": "logit", "split": "ratio", "conserving": True, "batchnorm": "fold",
              "rules": {"first_layer": {**rule, "bias": "spread"}, "conv": rule, "linear": {**rule, "bias": "zero"},
                        "activation": "pass",
                        "avgpool": {"rule": "z", "epsilon": 1e-6, "stabilizer": "signed", "dead_units": "spread"}}}
    explainer = graphlrp.compile(model, x[:1], rules=preset)
    _, _, taps = explainer.explain_with_taps(x)
    assert ((taps["input"] / taps["output"] - 1).abs() <= 1e-5).all(), taps["input"] / taps["output"]


def test_spreading_by_weights_follows_the_weights_and_skips_padding():
    """A unit whose window is all 0 sends R_j·|w_ij| / Σ_i |w_ij| to each input of its window; at a border the sum
    runs over the positions inside the image only (padding gets nothing)."""
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=True)
    fc = nn.Linear(9, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.arange(1.0, 10.0).view(1, 1, 3, 3) * torch.tensor([1, -1, 1] * 3).view(1, 1, 3, 3))
        conv.bias.fill_(0.5)
        fc.weight.zero_()
        fc.weight[0, 0] = 1.0  # only the corner unit (0, 0) gets relevance
    model = nn.Sequential(nn.ReLU(), conv, nn.Flatten(), fc).eval()
    x = -torch.ones(1, 1, 3, 3)  # the ReLU makes every input 0: the corner unit's output is its bias alone
    rule = {"rule": "epsilon", "epsilon": 1e-9, "stabilizer": "signed", "bias": "spread"}
    preset = {"output": "logit", "conserving": True, "rules": {"first_layer": rule, "conv": rule,
                                                               "linear": "epsilon", "activation": "pass"}}
    explainer = graphlrp.compile(model, x, rules=preset, allow_vanishing=True)
    _, relevance = explainer(x)
    w = conv.weight.detach().abs()[0, 0]
    field = w[1:, 1:]  # the corner unit's window inside the image: kernel taps (1..2, 1..2) over pixels (0..1, 0..1)
    expected = torch.zeros(3, 3)
    expected[:2, :2] = 0.5 * field / field.sum()
    assert torch.allclose(relevance[0, 0], expected, atol=1e-7), relevance
