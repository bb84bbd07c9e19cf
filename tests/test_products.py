"""Products of two signals, elementwise functions of one signal and max reductions, each against an independent
reference computed in float64 (autograd or a hand computation), with conservation checked:

* an elementwise product a·b of two signals that is no gate (SwiGLU, gMLP's gating; category `product`, rule
  `uniform`): R/2 to each factor, summed back where a factor broadcasts (AttnLRP, Prop. 3.3);
* a matmul / einsum of two signals (linear attention; category `matmul`, rule `uniform`, or `constant_weights` with
  `otherwise = "uniform"`): R_a = ½ a ⊙ ∂_a Σ (R/z)·z with R/z held fixed — half of the z-rule of the bilinear map
  with the other operand held fixed, since Gradient×Input gives each factor of a bilinear map the full z;
* attention weights behind talking heads (a linear map across heads after the softmax, CaiT) or a renormalised mix
  of two attention maps (ConViT's GPSA) are still attention weights: `constant_weights` holds them constant;
* square, pow with a constant exponent, abs: relevance passes as through an activation (R_in = R_out);
* amax / amin / max(dim).values: winner-take-all, ties split evenly — the same as the gradient of torch.amax;
* presets that name no `product` rule refuse such a product only where relevance reaches it;
* one ONNX export with onnxruntime parity.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphlrp
from graphlrp import ops
from graphlrp.errors import UnsupportedOpError
from graphlrp.trace import trace

# logit output relevance; stabilisers off where a reference is exact, so the comparison can be tight
EXACT = {"output": "logit", "split": "ratio", "rules": {
    "first_layer": {"rule": "epsilon", "epsilon": 0.0, "bias": "zero"},
    "linear": {"rule": "epsilon", "epsilon": 0.0, "bias": "zero"},
    "activation": "pass", "product": "uniform", "maxpool": "winner_take_all",
    "matmul": {"rule": "uniform", "epsilon": 0.0}}}


HELD_CONSTANT_BASE = {"output": "logit", "split": "ratio", "rules": {
    "first_layer": {"rule": "epsilon", "epsilon": 0.0, "bias": "zero"},
    "linear": {"rule": "epsilon", "epsilon": 0.0, "bias": "zero"}, "softmax": "constant",
    "matmul": {"rule": "constant_weights", "epsilon": 0.0}}}


def rel_diff(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def start_relevance(logits, target):
    return F.one_hot(target, logits.shape[1]).double() * logits


def kinds(model, x) -> dict:
    traced = trace(model, x)
    out = {}
    for n in traced.graph.nodes:
        if n.op not in ("placeholder", "output", "get_attr") and n.meta.get("dynamic"):
            op = ops.describe(n, traced)
            if op is not None:
                out[n.name] = op.kind
    return out


# ------------------------------------------------------------------ elementwise products: uniform rule
class SwiGLU(nn.Module):
    """logits = W_o (W_1 x ⊙ silu(W_2 x)): the product of two signals, neither a gate."""

    def __init__(self, d=6, h=5, k=4):
        super().__init__()
        self.w1, self.w2, self.out = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False), nn.Linear(h, k, bias=False)

    def forward(self, x):
        x = x.flatten(1)
        return self.out(self.w1(x) * F.silu(self.w2(x)))


def test_elementwise_product_gives_each_factor_half():
    torch.manual_seed(0)
    model = SwiGLU().double().eval()
    x, target = torch.randn(3, 1, 2, 3, dtype=torch.float64), torch.tensor([0, 2, 3])
    assert "product" in kinds(model, x[:1]).values()
    logits, rel, taps = graphlrp.compile(model, x[:1], rules=EXACT).explain_with_taps(x, target)

    # by hand: ε = 0 z-rule at the linear layers, R/2 at the product, identity through silu
    f = x.flatten(1)
    a, pre = f @ model.w1.weight.t(), f @ model.w2.weight.t()
    m = a * F.silu(pre)
    R_out = start_relevance(logits.detach(), target)
    R_m = m * ((R_out / (m @ model.out.weight.t())) @ model.out.weight)
    R_a, R_pre = R_m / 2, R_m / 2
    R_x = f * ((R_a / a) @ model.w1.weight) + f * ((R_pre / pre) @ model.w2.weight)
    assert rel_diff(rel.flatten(1), R_x) <= 1e-9
    assert rel_diff(taps["input"], taps["output"]) <= 1e-9  # conserving


class OuterProduct(nn.Module):
    """a [N, C, 1] · b [N, 1, L]: neither factor has the output shape; each factor's half is summed back."""

    def forward(self, x):
        f = x.flatten(1)
        a, b = f[:, :3].unsqueeze(2), f[:, 3:].unsqueeze(1)
        return (a * b).flatten(1)


def test_broadcast_product_sums_each_half_back():
    torch.manual_seed(1)
    model = OuterProduct().eval()
    x = torch.randn(2, 1, 1, 7, dtype=torch.float64)
    target = torch.tensor([4, 9])
    logits, rel, taps = graphlrp.compile(model, x[:1], rules=EXACT).explain_with_taps(x, target)

    # autograd reference: R_a = ½ a ⊙ ∂_a Σ (R/z)·z, R/z held fixed
    f = x.flatten(1).clone().requires_grad_(True)
    z = (f[:, :3].unsqueeze(2) * f[:, 3:].unsqueeze(1)).flatten(1)
    R = start_relevance(z.detach(), target)
    s = torch.where(z != 0, R / z, torch.zeros_like(z)).detach()
    (g,) = torch.autograd.grad((s * z).sum(), f)
    assert rel_diff(rel.flatten(1), 0.5 * f.detach() * g) <= 1e-12
    assert rel_diff(taps["input"], taps["output"]) <= 1e-12


def test_a_preset_without_a_product_rule_refuses_only_where_relevance_reaches_it():
    class OffPath(nn.Module):  # the product only feeds a gate: held constant, it takes no relevance
        def __init__(self):
            super().__init__()
            self.a, self.b, self.fc = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Linear(4, 2)

        def forward(self, x):
            y = self.a(x)
            return self.fc((y * torch.sigmoid(y * self.b(x))).mean((2, 3)))

    class OnPath(OffPath):
        def forward(self, x):
            return self.fc((self.a(x) * self.b(x)).mean((2, 3)))

    x = torch.randn(2, 3, 4, 4)
    explainer = graphlrp.compile(OffPath().eval(), x[:1], rules="epsilon-plus-flat")
    assert torch.isfinite(explainer(x)[1]).all()
    with pytest.raises(UnsupportedOpError, match="product of two input-dependent tensors.*product = \"uniform\""):
        graphlrp.compile(OnPath().eval(), x[:1], rules="epsilon-plus-flat")
    graphlrp.compile(OnPath().eval(), x[:1], rules="otsuki2024-conserving")  # names `product = "uniform"`


# ------------------------------------------------------------------ matmul / einsum of two signals
class LinearAttention(nn.Module):
    """q (kᵀ v) with relu kernels, no softmax anywhere: both matmuls are products of two signals."""

    def __init__(self, d=4, einsum=False):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.einsum = einsum

    def forward(self, x):
        t = x.flatten(2).transpose(1, 2)  # [N, T, D]
        q, k, v = F.relu(self.q(t)), F.relu(self.k(t)), self.v(t)
        if self.einsum:
            kv = torch.einsum("ntd,nte->nde", k, v)
            return torch.einsum("ntd,nde->nte", q, kv).flatten(1)
        return (q @ (k.transpose(1, 2) @ v)).flatten(1)


class Bilinear(nn.Module):
    """a @ bᵀ of two slices of the input: the rule's relevance at a and b is the input relevance itself."""

    def forward(self, x):
        a, b = x[:, 0], x[:, 1]  # [N, T, D] each
        return (a @ b.transpose(1, 2)).flatten(1)


def test_matmul_of_two_signals_is_half_the_z_rule_of_the_bilinear_map():
    torch.manual_seed(2)
    model = Bilinear().eval()
    x, target = torch.randn(3, 2, 4, 5, dtype=torch.float64), torch.tensor([0, 7, 15])
    logits, rel, taps = graphlrp.compile(model, x[:1], rules=EXACT).explain_with_taps(x, target)

    a = x[:, 0].clone().requires_grad_(True)
    b = x[:, 1].clone().requires_grad_(True)
    z = a @ b.transpose(1, 2)
    R = start_relevance(z.detach().flatten(1), target).view_as(z)
    s = (R / z).detach()
    ga, gb = torch.autograd.grad((s * z).sum(), (a, b))
    # Gradient×Input of a bilinear map gives each factor the full z: Σ a ⊙ ga = Σ b ⊙ gb = Σ R; the rule halves it
    assert rel_diff((a * ga).sum(), R.sum()) <= 1e-12 and rel_diff((b * gb).sum(), R.sum()) <= 1e-12
    expected = torch.stack([0.5 * a * ga, 0.5 * b * gb], 1).detach()
    assert rel_diff(rel, expected) <= 1e-12
    assert rel_diff(taps["input"], taps["output"]) <= 1e-12


class BroadcastBilinear(nn.Module):
    """a @ bᵀ where b broadcasts over a's heads (timm's lambda layer: q [B, heads, M, 1, K] @ [B, 1, M, K, V])."""

    def forward(self, x):  # x: [N, 2, 3, 4, 5]
        a, b = x[:, 0, :, :2], x[:, 1, :1]  # [N, 3 heads, 2, 5] and [N, 1 head, 4, 5]
        return (a @ b.transpose(-1, -2)).flatten(1)


def test_a_broadcast_matmul_of_two_signals_sums_the_shared_operands_half_back():
    """The broadcast is made explicit (an expand of b to every head) before the rules apply: b's half of the
    bilinear z-rule is summed over the heads it was read by, as autograd sums its gradient."""
    torch.manual_seed(2)
    x, target = torch.randn(3, 2, 3, 4, 5, dtype=torch.float64), torch.tensor([0, 7, 23])
    logits, rel, taps = graphlrp.compile(BroadcastBilinear().eval(), x[:1], rules=EXACT).explain_with_taps(x, target)

    a = x[:, 0, :, :2].clone().requires_grad_(True)
    b = x[:, 1, :1].clone().requires_grad_(True)
    z = a @ b.transpose(-1, -2)
    R = start_relevance(z.detach().flatten(1), target).view_as(z)
    ga, gb = torch.autograd.grad(((R / z).detach() * z).sum(), (a, b))
    expected = torch.zeros_like(x)
    expected[:, 0, :, :2] = 0.5 * a.detach() * ga
    expected[:, 1, :1] = 0.5 * b.detach() * gb
    assert rel_diff(rel, expected) <= 1e-12
    assert rel_diff(taps["input"], taps["output"]) <= 1e-12


class ConstantMix(nn.Module):
    """A constant matrix times a signal: a linear map written as a matmul (timm's lambda layer: the relative-
    position embedding @ the values), in three spellings."""

    def __init__(self, spelling: str):
        super().__init__()
        self.spelling, self.embed = spelling, nn.Linear(6, 5, bias=False)
        self.register_buffer("mix", torch.randn(3, 4))
        self.head = nn.Linear(15, 7, bias=False)

    def forward(self, x):  # x: [N, 4, 6]
        h = self.embed(x)  # [N, 4, 5]
        if self.spelling == "matmul":  # [3, 4] @ [N, 4, 5]: the constant has no batch dimension
            y = self.mix @ h
        elif self.spelling == "einsum":
            y = torch.einsum("km,nmc->nkc", self.mix, h)
        else:  # [1, 3, 4] @ [N, 4, 5]: a batch dimension of size 1 against N (expanded at trace time)
            y = self.mix[None] @ h
        return self.head(torch.relu(y).flatten(1))


@pytest.mark.parametrize("spelling", ["matmul", "einsum", "broadcast"])
@pytest.mark.parametrize("preset", [EXACT, HELD_CONSTANT_BASE], ids=["uniform", "constant_weights"])
def test_a_matmul_with_a_constant_is_a_linear_map_all_relevance_to_the_signal(spelling, preset):
    """A constant operand takes no relevance, whatever the preset's rule for products of signals (half to a
    constant would leak): the product is the ε-rule of the linear map it is. In a bias-free ReLU network with
    ε = 0 that is Gradient×Input exactly, in float64."""
    torch.manual_seed(6)
    model = ConstantMix(spelling).double().eval()
    x, target = torch.randn(3, 4, 6, dtype=torch.float64), torch.tensor([0, 3, 6])
    rules = {**preset, "rules": {**preset["rules"], "activation": "pass"}}
    explainer = graphlrp.compile(model, x[:1], rules=rules)
    logits, rel, taps = explainer.explain_with_taps(x, target)
    assert list(kinds(model, x[:1]).values()).count(ops.MATMUL) == 1
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xr).gather(1, target[:, None]).sum(), xr)
    assert rel_diff(rel, x * g) <= 1e-12
    assert rel_diff(taps["input"], taps["output"]) <= 1e-12


@pytest.mark.parametrize("einsum", [False, True])
@pytest.mark.parametrize("rules", ["uniform", "constant_weights"])
def test_linear_attention_gets_the_uniform_rule_and_conserves(einsum, rules):
    torch.manual_seed(3)
    model = LinearAttention(einsum=einsum).double().eval()
    x, target = torch.randn(2, 4, 3, 2, dtype=torch.float64), torch.tensor([1, 20])
    preset = {**EXACT, "rules": {**EXACT["rules"], "matmul": (
        {"rule": "uniform", "epsilon": 0.0} if rules == "uniform" else
        {"rule": "constant_weights", "epsilon": 0.0, "otherwise": "uniform"})}}
    logits, rel, taps = graphlrp.compile(model, x[:1], rules=preset).explain_with_taps(x, target)

    # reference by autograd, rule by rule: half the bilinear z-rule at each product, ε = 0 z-rule at the linears
    t = x.flatten(2).transpose(1, 2)
    W = {n: getattr(model, n).weight for n in "qkv"}
    pre = {n: t @ W[n].t() for n in "qkv"}
    q, k, v = F.relu(pre["q"]), F.relu(pre["k"]), pre["v"]

    def half_z_rule(f, R, *operands):
        operands = [o.detach().clone().requires_grad_(True) for o in operands]
        z = f(*operands)
        grads = torch.autograd.grad(((R / z).detach() * z).sum(), operands)
        return [0.5 * o.detach() * g for o, g in zip(operands, grads)]

    kv = k.transpose(1, 2) @ v
    out = q @ kv
    R_out = start_relevance(out.flatten(1), target).view_as(out)
    R_q, R_kv = half_z_rule(torch.matmul, R_out, q, kv)
    R_k, R_v = half_z_rule(lambda k_, v_: k_.transpose(1, 2) @ v_, R_kv, k, v)
    R_t = sum(t * ((R / pre[n]) @ W[n]) for n, R in (("q", R_q), ("k", R_k), ("v", R_v)))
    assert rel_diff(rel, R_t.transpose(1, 2).reshape(x.shape)) <= 1e-9
    assert rel_diff(taps["input"], taps["output"]) <= 1e-9


@pytest.mark.parametrize("preset", ["otsuki2024-conserving", "cp-lrp-conserving"])
def test_both_conserving_presets_conserve_on_linear_attention(preset):
    torch.manual_seed(3)
    model = LinearAttention(einsum=False).eval()
    x = torch.randn(2, 4, 3, 2)
    logits, rel, taps = graphlrp.compile(model, x[:1], rules=preset).explain_with_taps(x)
    assert ((taps["input"] / taps["output"]) - 1).abs().max() <= 1e-4


def test_constant_weights_still_refuses_a_product_without_attention_weights_by_default():
    x = torch.randn(1, 4, 3, 2)
    with pytest.raises(UnsupportedOpError, match="attention weights"):
        graphlrp.compile(LinearAttention().eval(), x, rules={**EXACT, "rules": {**EXACT["rules"], "matmul": "constant_weights"}})


class TinyValueAttention(nn.Module):
    """softmax(q kᵀ) · (v ⊙ scale): the values of column 0 scaled to ~1e-12 (below the matmul's ε = 1e-9, as
    random-weight NextViT's attention values are ~1e-7 against its ε), the others normal."""

    def __init__(self, d=4, tiny=1e-12):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.register_buffer("scale", torch.tensor([tiny] + [1.0] * (d - 1)))

    def forward(self, x):
        t = x.flatten(2).transpose(1, 2)
        a = torch.softmax(self.q(t) @ self.k(t).transpose(1, 2), -1)
        return (a @ (self.v(t) * self.scale)).flatten(1)


SPREAD = {**HELD_CONSTANT_BASE, "rules": {**HELD_CONSTANT_BASE["rules"], "matmul": {
    "rule": "constant_weights", "epsilon": 1e-9, "dead_units": "spread"}}}


@pytest.mark.parametrize("target_column", [0, 1], ids=["output below epsilon", "normal output"])
def test_constant_weights_spreads_outputs_below_epsilon_by_the_weights_and_conserves(target_column):
    """Below ε: R_v[j] = A_ij·R_i / Σ_j A_ij (the weights alone); above: the plain z-rule, no ε (Gradient×Input
    with A held constant). Either way ΣR_in = R_out; with dead_units = 'drop' the tiny output's relevance is lost."""
    torch.manual_seed(6)
    model = TinyValueAttention().double().eval()
    x = torch.randn(2, 4, 3, 2, dtype=torch.float64)
    target = torch.tensor([4 * 2 + target_column, 4 * 5 + target_column])  # token 2 / 5, column target_column
    logits, rel, taps = graphlrp.compile(model, x[:1], rules=SPREAD).explain_with_taps(x, target)
    assert rel_diff(taps["input"], taps["output"]) <= 1e-9
    t = x.flatten(2).transpose(1, 2)
    with torch.no_grad():
        a = torch.softmax(model.q(t) @ model.k(t).transpose(1, 2), -1)
        pre_v = model.v(t)  # R at v ⊙ scale passes to v unchanged (a constant scale), then the ε = 0 z-rule
    i = target // 4
    R = logits.gather(1, target[:, None]).squeeze(1)
    if target_column == 0:  # by the weights alone, then through the linear map by the z-rule
        R_v = torch.zeros_like(pre_v)
        R_v[:, :, 0] = a[torch.arange(2), i] * R[:, None]
        expected = t * ((R_v / pre_v) @ model.v.weight)
    else:
        expected = gradient_x_input_with_weights_held(HeldTinyValueAttention(model), x, target).flatten(2).transpose(1, 2)
    assert rel_diff(rel.flatten(2).transpose(1, 2), expected) <= 1e-9
    drop = {**SPREAD, "rules": {**SPREAD["rules"], "matmul": {"rule": "constant_weights", "epsilon": 1e-9}}}
    _, _, taps = graphlrp.compile(model, x[:1], rules=drop).explain_with_taps(x, target)
    lost = (1 - taps["input"] / taps["output"]).abs().max()
    assert lost > 0.5 if target_column == 0 else lost < 1e-6


class HeldTinyValueAttention(nn.Module):
    """The same model with the attention weights detached: its Gradient×Input is the z-rule with A held."""

    def __init__(self, model):
        super().__init__()
        self.m = model
        self.frozen = False

    def forward(self, x):
        m, t = self.m, x.flatten(2).transpose(1, 2)
        a = torch.softmax(m.q(t) @ m.k(t).transpose(1, 2), -1)
        return ((a.detach() if self.frozen else a) @ (m.v(t) * m.scale)).flatten(1)


def test_uniform_matmul_spreads_outputs_below_epsilon_evenly_and_conserves():
    torch.manual_seed(7)
    model = Bilinear().double().eval()
    x = torch.randn(2, 2, 4, 5, dtype=torch.float64)
    x[:, 1, 0] *= 1e-12  # b's row 0: every output a_i·b_0 is below ε
    preset = {**EXACT, "rules": {**EXACT["rules"], "matmul": {"rule": "uniform", "epsilon": 1e-9,
                                                              "dead_units": "spread"}}}
    target = torch.tensor([0, 5])  # output (0, 0): dead; output (1, 1): live
    logits, rel, taps = graphlrp.compile(model, x[:1], rules=preset).explain_with_taps(x, target)
    assert rel_diff(taps["input"], taps["output"]) <= 1e-9
    # dead: R/2 to each factor, spread evenly over the 5 terms a_0k·b_0k
    assert rel_diff(rel[0, 0, 0], torch.full((5,), logits[0, 0].item() / 10, dtype=torch.float64)) <= 1e-9
    assert rel_diff(rel[0, 1, 0], torch.full((5,), logits[0, 0].item() / 10, dtype=torch.float64)) <= 1e-9
    # live: half the z-rule (a_1k·b_1k·R/2z to each factor)
    a, b = x[1, 0, 1], x[1, 1, 1]
    assert rel_diff(rel[1, 0, 1], a * b / 2) <= 1e-9 and rel_diff(rel[1, 1, 1], a * b / 2) <= 1e-9


class TalkingHeads(nn.Module):
    """softmax, then a linear map across heads (CaiT's proj_w), then A·V. Bias-free on the relevance path."""

    def __init__(self, d=4, heads=2):
        super().__init__()
        self.qkv, self.fc = nn.Linear(d, 3 * d * heads, bias=False), nn.Linear(d * heads, 3, bias=False)
        self.mix = nn.Linear(heads, heads)
        self.heads, self.d, self.frozen = heads, d, False

    def forward(self, x):
        t = x.flatten(2).transpose(1, 2)  # [N, T, d]
        n, T, _ = t.shape
        q, k, v = self.qkv(t).view(n, T, 3, self.heads, self.d).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-1, -2)).softmax(-1)
        attn = self.mix(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        if self.frozen:
            attn = attn.detach()
        return self.fc((attn @ v).transpose(1, 2).reshape(n, T, -1).mean(1))


class GatedPositionalAttention(nn.Module):
    """ConViT's GPSA: A = (1 − σ(g))·softmax(QKᵀ) + σ(g)·softmax(P), renormalised by its own row sum, then A·V.
    The mix and the renormalisation are computed from softmax outputs and constants alone."""

    def __init__(self, d=4, heads=2, tokens=3, k=3):
        super().__init__()
        self.heads, self.d = heads, d // heads
        self.qk, self.v = nn.Linear(d, 2 * d, bias=False), nn.Linear(d, d, bias=False)
        self.pos = nn.Parameter(torch.randn(heads, tokens, tokens))
        self.gating = nn.Parameter(torch.randn(heads))
        self.fc = nn.Linear(d, k, bias=False)
        self.frozen = False

    def forward(self, x):
        t = x.flatten(2).transpose(1, 2)  # [n, tokens, d]
        n, T, _ = t.shape
        q, k = self.qk(t).view(n, T, 2, self.heads, self.d).permute(2, 0, 3, 1, 4)
        v = self.v(t).view(n, T, self.heads, self.d).transpose(1, 2)
        gate = torch.sigmoid(self.gating).view(1, -1, 1, 1)
        attn = (1.0 - gate) * (q @ k.transpose(-1, -2)).softmax(-1) + gate * self.pos.softmax(-1)
        attn = attn / attn.sum(dim=-1).unsqueeze(-1)
        if self.frozen:
            attn = attn.detach()
        return self.fc((attn @ v).transpose(1, 2).reshape(n, T, -1).mean(1))


# ε = 0 rules with the attention weights held constant: the relevance path is linear and bias-free, where they are
# Gradient×Input of the model with its attention weights detached
HELD_CONSTANT = {"output": "logit", "split": "ratio", "rules": {
    "first_layer": {"rule": "epsilon", "epsilon": 0.0, "bias": "zero"},
    "linear": {"rule": "epsilon", "epsilon": 0.0, "bias": "zero"}, "softmax": "constant",
    "matmul": {"rule": "constant_weights", "epsilon": 0.0}, "avgpool": {"rule": "z", "epsilon": 0.0}}}


def gradient_x_input_with_weights_held(model, x, target):
    model.frozen = True
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xr).gather(1, target[:, None]).sum(), xr)
    model.frozen = False
    return xr.detach() * g


@pytest.mark.parametrize("make, seed, shape", [(TalkingHeads, 4, (4, 3, 2)), (GatedPositionalAttention, 5, (4, 3, 1))],
                         ids=["talking heads (CaiT)", "renormalised gated mix (ConViT)"])
def test_weights_computed_from_softmax_outputs_are_attention_weights_held_constant(make, seed, shape):
    torch.manual_seed(seed)
    model = make().double().eval()
    x, target = torch.randn(2, *shape, dtype=torch.float64), torch.tensor([2, 0])
    traced = trace(model, x[:1])
    av = [ops.describe(n, traced) for n in traced.graph.nodes if n.op == "call_function" and "matmul" in n.name]
    assert [op.params["attention_weights"] for op in av] == [None, 0]  # Q·Kᵀ: none; A·V: A is held
    logits, rel, taps = graphlrp.compile(model, x[:1], rules=HELD_CONSTANT).explain_with_taps(x, target)
    assert rel_diff(taps["input"], taps["output"]) <= 1e-9
    assert rel_diff(rel, gradient_x_input_with_weights_held(model, x, target)) <= 1e-9
    _, _, taps = graphlrp.compile(model, x[:1], rules="cp-lrp-conserving").explain_with_taps(x)
    assert rel_diff(taps["input"], taps["output"]) <= 1e-6


class QueryDependentBias(nn.Module):
    """SAM's attention: F.scaled_dot_product_attention with a float mask computed from Q (a decomposed relative
    position bias, q·R over a constant table, indexed with None to broadcast)."""

    def __init__(self, d=4, heads=2, tokens=3, k=3):
        super().__init__()
        self.heads, self.d = heads, d // heads
        self.qkv, self.fc = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, k, bias=False)
        self.table = nn.Parameter(torch.randn(tokens, self.d))
        self.frozen = False

    def forward(self, x):
        t = x.flatten(2).transpose(1, 2)  # [n, tokens, d]
        n, T, _ = t.shape
        q, k, v = self.qkv(t).view(n, T, 3, self.heads, self.d).permute(2, 0, 3, 1, 4)
        bias = (q * self.table.sum(0)).sum(-1)[:, :, :, None] * torch.ones(T)  # [n, h, T, T], from Q
        if self.frozen:  # the reference: attention weights held constant, computed in the open
            attn = ((q @ k.transpose(-1, -2)) / self.d ** 0.5 + bias).softmax(-1).detach()
            out = attn @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.fc(out.transpose(1, 2).reshape(n, T, -1).mean(1))


def test_an_attention_mask_computed_from_the_input_is_a_signal_added_to_the_scores():
    torch.manual_seed(6)
    model = QueryDependentBias().double().eval()
    x, target = torch.randn(2, 4, 3, 1, dtype=torch.float64), torch.tensor([0, 2])
    logits, rel, taps = graphlrp.compile(model, x[:1], rules=HELD_CONSTANT).explain_with_taps(x, target)
    with torch.no_grad():
        assert rel_diff(logits, model(x)) <= 1e-12
    assert rel_diff(taps["input"], taps["output"]) <= 1e-9
    # the bias (like the scores) gets no relevance: Gradient×Input with the weights held constant
    assert rel_diff(rel, gradient_x_input_with_weights_held(model, x, target)) <= 1e-9


def test_a_product_whose_operand_also_depends_on_the_input_directly_is_not_attention_weights():
    """softmax(s) ⊙ x reaches the input without a softmax: a signal, so it gets no constant-weights treatment."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.fc = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False), nn.Linear(4, 2)

        def forward(self, x):
            t = x.flatten(2).transpose(1, 2)  # [n, 3, 4]
            s = self.a(t) @ self.b(t).transpose(-1, -2)
            w = s.softmax(-1) * (1.0 + s)
            return self.fc((w @ t).mean(1))

    traced = trace(M().eval(), torch.randn(1, 4, 3, 1))
    av = [ops.describe(n, traced) for n in traced.graph.nodes if n.op == "call_function" and "matmul" in n.name]
    assert [op.params["attention_weights"] for op in av] == [None, None]


# ------------------------------------------------------------------ elementwise functions of one signal
@pytest.mark.parametrize("name,f", [
    ("square", torch.square), ("square method", lambda y: y.square()), ("pow 2", lambda y: y ** 2),
    ("pow 3 method", lambda y: y.pow(3)), ("torch.pow", lambda y: torch.pow(y, 1.5 * torch.ones(6))),
    ("abs", torch.abs), ("abs builtin", abs)])
def test_functions_of_one_signal_pass_relevance(name, f):
    class M(nn.Module):
        def forward(self, x):
            return f(x.flatten(1).abs() if "1.5" in name or "torch.pow" in name else x.flatten(1))

    torch.manual_seed(5)
    x, target = torch.randn(3, 1, 2, 3, dtype=torch.float64), torch.tensor([0, 3, 5])
    model = M().eval()
    logits, rel, taps = graphlrp.compile(model, x[:1], rules=EXACT).explain_with_taps(x, target)
    assert rel_diff(rel.flatten(1), start_relevance(model(x), target)) <= 1e-12  # identity rule: R_in = R_out
    assert rel_diff(taps["input"], taps["output"]) <= 1e-12


def test_a_power_with_an_input_dependent_exponent_is_refused():
    class M(nn.Module):
        def forward(self, x):
            f = x.flatten(1)
            return f.abs() ** f

    with pytest.raises(UnsupportedOpError, match="exponent"):
        graphlrp.compile(M().eval(), torch.randn(1, 1, 2, 3), rules=EXACT)


# ------------------------------------------------------------------ max / min over dims: winner-take-all
@pytest.mark.parametrize("name,f,mode,dims", [
    ("amax", lambda y: y.amax(dim=1), "max", (1,)),
    ("torch.amax keepdim", lambda y: torch.amax(y, (1, 3), keepdim=True), "max", (1, 3)),
    ("max.values", lambda y: y.max(dim=2).values, "max", (2,)),
    ("max[0] keepdim", lambda y: torch.max(y, 2, keepdim=True)[0], "max", (2,)),
    ("amin", lambda y: y.amin(1), "min", (1,)),
    ("min.values", lambda y: y.min(dim=-1).values, "min", (3,))])
def test_max_over_dims_is_winner_take_all_with_ties_split(name, f, mode, dims):
    class M(nn.Module):
        def forward(self, x):
            return f(x).flatten(1)

    torch.manual_seed(6)
    x = torch.randint(-2, 3, (3, 3, 4, 4)).double()  # few distinct values: many ties
    target = torch.tensor([0, 2, 3])
    model = M().eval()
    explainer = graphlrp.compile(model, x[:1], rules=EXACT)
    assert "max_reduce" in kinds(model, x[:1]).values()
    logits, rel, taps = explainer.explain_with_taps(x, target)

    # reference: torch.amax/amin's gradient sends each output's gradient to its extreme, split evenly on ties
    xr = x.clone().requires_grad_(True)
    extreme = (torch.amax if mode == "max" else torch.amin)(xr, dims, keepdim=False)
    R = start_relevance(extreme.flatten(1).detach(), target)
    (g,) = torch.autograd.grad((extreme.flatten(1) * R).sum(), xr)  # ∂/∂x of Σ R·max: R at the winners
    assert rel_diff(rel, g) <= 1e-12
    assert (rel != 0).sum() >= 2  # there were ties, or at least a winner per sample
    assert rel_diff(taps["input"], taps["output"]) <= 1e-12


def test_max_over_the_batch_or_everything_is_refused():
    class All(nn.Module):
        def forward(self, x):
            return x.flatten(1) * 0 + x.max()

    with pytest.raises(UnsupportedOpError, match="mixes the samples"):
        graphlrp.compile(All().eval(), torch.randn(1, 1, 2, 3), rules=EXACT)


# ------------------------------------------------------------------ ONNX export
class Everything(nn.Module):
    """SwiGLU, linear attention, a matmul broadcast over heads, a constant @ signal matmul, StarReLU's relu(x)², abs
    and a max over a dim in one model."""

    def __init__(self, d=8):
        super().__init__()
        self.stem = nn.Conv2d(3, d, 3, padding=1)
        self.w1, self.w2 = nn.Linear(d, d), nn.Linear(d, d)
        self.att = LinearAttention(d)
        self.fc = nn.Linear(2 * d, 5)
        self.register_buffer("mix", torch.randn(36, 36) / 6)

    def forward(self, x):
        t = self.stem(x).flatten(2).transpose(1, 2)
        t = t + self.mix @ t  # [T, T] @ [N, T, d]
        t = t + self.w1(t) * F.silu(self.w2(t))
        t = t + self.att(t.transpose(1, 2).unsqueeze(-1)).view_as(t)
        heads = t.unflatten(-1, (2, -1)).transpose(1, 2)  # [N, 2, T, d/2]
        t = t + (heads @ heads[:, :1].transpose(-1, -2) @ heads[:, 1:]).transpose(1, 2).flatten(2) / t.shape[1]
        t = F.relu(t) ** 2 + t.abs()
        return self.fc(torch.cat([t.amax(1), t.max(dim=1).values], 1))


def test_new_mechanisms_export_to_onnx_with_parity(tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(7)
    model = Everything().eval()
    x = torch.randn(2, 3, 6, 6)
    explainer = graphlrp.compile(model, x[:1], rules="cp-lrp-conserving")
    logits, rel, taps = explainer.explain_with_taps(x)
    with torch.no_grad():
        assert rel_diff(logits, model(x)) < 1e-5
    assert ((taps["input"] / taps["output"] - 1).abs() < 1e-3).all()
    report = explainer.export_onnx(tmp_path / "m.onnx")
    assert report.max_rel_diff <= 1e-4


@pytest.mark.parametrize("preset", ["otsuki2024-conserving", "cp-lrp-conserving"])
def test_timm_cait_talking_heads_and_class_token_conserve(preset):
    """A small timm CaiT: talking heads before A·V (attention weights held constant behind a linear map across
    heads), class attention with a class token joined to the tokens (its relevance spread, not dropped)."""
    timm = pytest.importorskip("timm")
    from timm.models.cait import Cait

    torch.manual_seed(0)
    model = Cait(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, depth_token_only=2,
                 num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    logits, rel, taps = graphlrp.compile(model, x[:1], rules=preset).explain_with_taps(x)
    with torch.no_grad():
        assert rel_diff(logits, model(x)) < 1e-5
    assert ((taps["input"] / taps["output"] - 1).abs() <= 1e-3).all()
