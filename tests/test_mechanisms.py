"""The general mechanisms behind the wider CNN zoo, each against an independent reference:

* tracing with known sizes (control flow over sizes, extra forward arguments that default to None);
* ops off the relevance path never stop compilation;
* structural ops: the derived adjoint equals autograd's vector-Jacobian product of the op (exact for a 0/1 map),
  in the compiled explainer too, at batch 1 and 2;
* n-ary merges (add chains, stack-sum) split by ratio / symmetric / signed as the formulas say;
* gates: a model whose gate is replaced by its value as a constant gets the same relevance;
* adaptive average pooling with unequal windows: the z-rule through the exact windows, against autograd;
* parameter-only subgraphs (weight standardisation) are evaluated at compile time;
* odd models raise graphlrp's own errors only;
* one ONNX export per mechanism with onnxruntime parity.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphlrp
from graphlrp.errors import GraphLRPError, TraceError, UnsupportedOpError

LOGIT = {"output": "logit", "split": "ratio", "rules": {"first_layer": "zplus", "conv": "zplus", "linear": "zplus"}}


def rel_diff(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ------------------------------------------------------------------ tracing with known sizes
class SamePad(nn.Module):
    """timm-style 'same' padding: Python control flow over the input size, and an extra forward argument."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x, mask=None, scale: float = 1.0):
        h, w = x.shape[-2:]
        pad_h = max((-(h // -2) - 1) * 2 + 3 - h, 0)
        pad_w = max((-(w // -2) - 1) * 2 + 3 - w, 0)
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        y = F.relu(self.conv(x))
        if mask is not None:
            y = y * mask
        n = y.size(0)
        return self.fc(y.mean((2, 3)).view(n, -1)) * scale


class ComputedBuffer(nn.Module):
    """ConViT's pattern: a buffer computed in forward from a size, then `buffer.expand(B, -1, -1)` with the traced
    batch size B (and `repeat`, `view` with it)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("rel", torch.zeros(1, 1, 3), persistent=False)
        self.proj = nn.Linear(3, 3)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):  # x: [N, 12]
        b = x.shape[0]
        if self.rel.shape[1] != 4:
            self.rel = torch.arange(12.0).reshape(1, 4, 3) / 12
        pos = self.rel.expand(b, -1, -1) + self.rel.repeat(b, 1, 1) + self.rel.reshape(1, 12).view(b * 0 + 1, 4, 3)
        return self.fc((self.proj(x.reshape(b, 4, 3)) * torch.sigmoid(pos)).flatten(1))


class SliceAssign(nn.Module):
    """MViTv2's pattern: a term added into a slice of a tensor by item assignment (the cls token's row and column
    left as they are)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 12), nn.Linear(6, 8)
        self.fc = nn.Linear(12, 4)

    def forward(self, x):  # x: [N, 1, 2, 3]
        x = x.flatten(1)
        attn = self.a(x).reshape(-1, 3, 4)
        attn[:, 1:, :] = attn[:, 1:, :] + self.b(x).reshape(-1, 2, 4)
        return self.fc(F.relu(attn).flatten(1))


class FourierPosition(nn.Module):
    """EdgeNeXt's position code: a tensor made from the batch size alone (zeros((B, H, W)), ~, cumsum, sin/cos)
    through a conv, added to the features."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.proj = nn.Conv2d(2, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.conv(x)
        b, _, h, w = y.shape
        mask = ~torch.zeros((b, h, w)).to(dtype=torch.bool)
        code = torch.stack((mask.cumsum(1, dtype=torch.float32).sin(), mask.cumsum(2, dtype=torch.float32).cos()), 1)
        return self.fc(F.relu(y + self.proj(code)).mean((2, 3)))


class VarargFactory(nn.Module):
    """Gemma 4's ViT: `torch.ones(B, n, dtype=torch.bool)` and `torch.zeros(B, c, 1, 1)` with the traced batch size
    as a separate argument (not inside a tuple)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.conv(x)
        b = y.shape[0]
        valid = torch.ones(b, y.shape[2] * y.shape[3], dtype=torch.bool)
        y = y + torch.zeros(b, 4, 1, 1)
        return self.fc((F.relu(y).flatten(2) * valid[:, None]).mean(2))


class DeviceMove(nn.Module):
    """Gemma 4's ViT pools by positions: a tensor moved `.to(x.device)`, then a size of a later tensor in a Python
    `if` (which traces only while every size is known at the batch of 2 too, run on the meta device)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.conv(x).flatten(2)  # [B, 4, HW]
        weights = y.new_ones(y.shape[0], y.shape[2], 1).to(y.device) / y.shape[2]
        pooled = y @ weights  # [B, 4, 1]
        if pooled.shape[1] % 2 != 0:
            raise ValueError("odd channels")
        return self.fc(F.relu(pooled.squeeze(-1)))


def _reproduces_conserves_and_exports(model, x, tmp_path):
    """cp-lrp-conserving compiled at one sample, run at batch 3: the forward, conservation and the export's parity."""
    explainer = graphlrp.compile(model, x[:1], rules="cp-lrp-conserving")
    logits, rel, taps = explainer.explain_with_taps(x)
    assert rel_diff(logits, model(x).detach()) <= 1e-6
    assert (taps["input"] / taps["output"] - 1).abs().max() <= 1e-5
    assert explainer.export_onnx(tmp_path / "m.onnx").max_rel_diff <= 1e-4


def test_a_tensor_made_from_the_batch_size_alone_exports(tmp_path):
    torch.manual_seed(0)
    _reproduces_conserves_and_exports(FourierPosition().eval(), torch.randn(3, 3, 5, 6), tmp_path)


def test_factories_given_the_batch_size_as_an_argument_trace_and_export(tmp_path):
    torch.manual_seed(0)
    _reproduces_conserves_and_exports(VarargFactory().eval(), torch.randn(3, 3, 5, 6), tmp_path)


def test_a_tensor_moved_to_the_inputs_device_keeps_later_sizes_known(tmp_path):
    torch.manual_seed(0)
    _reproduces_conserves_and_exports(DeviceMove().eval(), torch.randn(3, 3, 5, 6), tmp_path)


def test_item_assignment_traces_out_of_place(tmp_path):
    torch.manual_seed(0)
    _reproduces_conserves_and_exports(SliceAssign().eval(), torch.randn(3, 1, 2, 3), tmp_path)


def test_a_concrete_tensor_expanded_to_the_traced_batch_size_traces():
    torch.manual_seed(0)
    model = ComputedBuffer().eval()
    x = torch.randn(3, 12)
    explainer = graphlrp.compile(model, x[:1], rules="cp-lrp-conserving")
    logits, rel, taps = explainer.explain_with_taps(x)
    assert rel_diff(logits, model(x).detach()) <= 1e-6
    assert (taps["input"] / taps["output"] - 1).abs().max() <= 1e-5
    assert torch.Tensor.expand.__qualname__ != "_SizedMethods._wrap.<locals>.method"  # restored after tracing


class KeywordLinear(nn.Module):
    """BEiT's qkv: F.linear by keyword, with a bias concatenated from parameters and a zero buffer."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(6, 9, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.rand(3)), nn.Parameter(torch.rand(3))
        self.register_buffer("k_bias", torch.zeros(3), persistent=False)
        self.fc = nn.Linear(9, 4)

    def forward(self, x):
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        return self.fc(F.relu(F.linear(input=x, weight=self.qkv.weight, bias=bias)))


def test_a_keyword_spelled_functional_linear_is_a_linear_layer():
    from graphlrp import ops
    from graphlrp.trace import trace

    torch.manual_seed(0)
    model = KeywordLinear().eval()
    traced = trace(model, torch.randn(1, 6))
    node = next(n for n in traced.graph.nodes if n.target is F.linear)
    op = ops.describe(node, traced)
    assert op.kind == ops.LINEAR and torch.equal(op.params["bias"], torch.cat((model.q_bias, model.k_bias,
                                                                               model.v_bias)).detach())
    x = torch.randn(3, 6)
    logits, rel, taps = graphlrp.compile(model, x[:1], rules="cp-lrp-conserving").explain_with_taps(x)
    assert rel_diff(logits, model(x).detach()) <= 1e-6
    assert (taps["input"] / taps["output"] - 1).abs().max() <= 1e-5


@pytest.mark.parametrize("size", [9, 10])
def test_control_flow_over_sizes_and_default_arguments_trace(size):
    torch.manual_seed(0)
    model = SamePad().eval()
    x = torch.randn(3, 3, size, size)
    explainer = graphlrp.compile(model, x[:1], rules="otsuki2024-conserving")
    logits, rel = explainer(x)  # a batch of 3 from a batch-1 compile: the batch size stayed dynamic
    with torch.no_grad():
        assert rel_diff(logits, model(x)) < 1e-6
    ratio = rel.flatten(1).sum(1) / logits.softmax(-1).max(-1).values
    assert ((ratio - 1).abs() < 1e-3).all()


# ------------------------------------------------------------------ structural ops: adjoint = autograd VJP
def _shuffle(y):
    n, c, h, w = y.shape
    return y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


STRUCTURAL = {
    "permute": lambda y: y.permute(0, 2, 3, 1),
    "transpose": lambda y: y.transpose(1, 3),
    "movedim": lambda y: y.movedim(1, 3),
    "swapaxes": lambda y: torch.swapaxes(y, 2, 3),
    "mT": lambda y: y.mT,
    "einsum_reorder": lambda y: torch.einsum("bchw->bwch", y),
    "flip": lambda y: torch.flip(y, (2, 3)),
    "roll": lambda y: torch.roll(y, (1, -2), (2, 3)),
    "repeat": lambda y: y.repeat(1, 2, 1, 1),
    "expand": lambda y: y[:, :1].expand(-1, 3, -1, -1),
    "pixel_shuffle": lambda y: F.pixel_shuffle(y, 2),
    "pixel_unshuffle": lambda y: F.pixel_unshuffle(y, 2),
    "nearest": lambda y: F.interpolate(y, scale_factor=2, mode="nearest"),
    "chunk_getitem": lambda y: torch.chunk(y, 2, 1)[1],
    "split_cat": lambda y: torch.cat(torch.split(y, [1, 3], 1)[::-1], 1),
    "unbind_stack": lambda y: torch.stack(y.unbind(1)[::-1], 2),
    "tensor_split": lambda y: torch.tensor_split(y, 3, dim=3)[2],
    "narrow": lambda y: y.narrow(2, 1, 3),
    "select": lambda y: y.select(1, 2),
    "index_select": lambda y: y.index_select(1, torch.tensor([3, 0, 0, 2])),
    "reflect_pad": lambda y: F.pad(y, (2, 1, 1, 2), mode="reflect"),
    "replicate_pad": lambda y: F.pad(y, (1, 1, 0, 2), mode="replicate"),
    "crop": lambda y: F.pad(y, (-1, 0, 0, -2)),
    "channel_shuffle": _shuffle,
    "fancy_index": lambda y: y[:, [2, 0], 1:, ::2],
}


class StructuralHead(nn.Module):
    """The structural op's values are the logits: with output relevance "logit", the input relevance is
    Jᵀ(e_t · logit_t) — autograd's vector-Jacobian product of the op."""

    def __init__(self, op):
        super().__init__()
        self.op = op

    def forward(self, x):
        return self.op(x).flatten(1)


@pytest.mark.parametrize("name", sorted(STRUCTURAL))
def test_structural_adjoint_matches_autograd(name):
    from graphlrp.ops import MOVE, describe
    from graphlrp.rules import move_map
    from graphlrp.trace import trace

    torch.manual_seed(0)
    op, head = STRUCTURAL[name], StructuralHead(STRUCTURAL[name]).eval()
    # the map derived at compile time, applied to a random R, is autograd's VJP
    y = torch.randn(1, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    out = op(y)
    r = torch.randn_like(out)
    (vjp,) = torch.autograd.grad(out, y, r)
    traced = trace(head, torch.randn(1, 4, 6, 6))
    moves = [o for n in traced.graph.nodes if (o := describe(n, traced)) is not None and o.kind == MOVE]
    if len(moves) == 1 and moves[0].inputs[0].op == "placeholder" and tuple(moves[0].out_shape) == tuple(out.shape):
        ((source, target),) = move_map(moves[0])
        back = torch.zeros(y.numel(), dtype=torch.float64).index_add_(0, source, r.flatten()[target])
        assert torch.equal(back.view_as(y), vjp)
    # end to end, in the compiled explainer: first and last target, a batch of 2
    x = torch.randn(2, 4, 6, 6)
    explainer = graphlrp.compile(head, x[:1], rules=LOGIT)
    targets = [0, out[0].numel() - 1]
    logits, rel = explainer(x, torch.tensor(targets))
    with torch.no_grad():
        assert torch.equal(logits, head(x))
    for i, t in enumerate(targets):
        xi = x[i:i + 1].double().requires_grad_(True)
        oi = op(xi).flatten(1)
        (g,) = torch.autograd.grad(oi[0, t], xi)
        assert rel_diff(rel[i], g[0] * oi[0, t].detach()) < 1e-6  # Jᵀ(e_t · logit_t)


PERMUTATIONS = {"permute": (0, 2, 3, 1), "transpose": (0, 3, 2, 1), "movedim": (0, 2, 3, 1), "swapaxes": (0, 1, 3, 2),
                "mT": (0, 1, 3, 2), "einsum_reorder": (0, 3, 1, 2), "channel_shuffle": (0, 2, 1, 3, 4)}


@pytest.mark.parametrize("name", sorted(STRUCTURAL))
def test_axis_permutations_are_recognised_by_what_they_do_and_become_one_transpose(name):
    """However a permutation of axes is spelled, its adjoint is the inverse permutation (one transpose in the
    explainer, no index table); every other move keeps the derived map, and a size-1 dim does not fool it."""
    from graphlrp.ops import MOVE, describe
    from graphlrp.rules.structure import axis_permutation
    from graphlrp.trace import trace

    head = StructuralHead(STRUCTURAL[name]).eval()
    for shape in ((1, 4, 6, 6), (1, 4, 1, 6)) if name in PERMUTATIONS else ((1, 4, 6, 6),):
        traced = trace(head, torch.randn(shape))
        moves = [o for n in traced.graph.nodes if (o := describe(n, traced)) is not None and o.kind == MOVE]
        found = [axis_permutation(o) for o in moves]
        if name in PERMUTATIONS:
            assert found == [PERMUTATIONS[name]]
        else:
            assert all(p is None for p in found), found
    graph = graphlrp.compile(head, torch.randn(1, 4, 6, 6), rules=LOGIT).graph_module.graph
    gathers = [n for n in graph.nodes if n.target in (torch.index_select, torch.scatter_add)]
    assert (not gathers) if name in PERMUTATIONS else True


def test_a_permutation_that_moves_the_batch_keeps_the_derived_map():
    from graphlrp.ops import MOVE, describe
    from graphlrp.rules.structure import axis_permutation
    from graphlrp.trace import trace

    head = StructuralHead(lambda y: y.permute(1, 0, 2, 3)).eval()
    traced = trace(head, torch.randn(1, 4, 6, 6))
    move = next(o for n in traced.graph.nodes if (o := describe(n, traced)) is not None and o.kind == MOVE)
    assert axis_permutation(move) == (1, 0, 2, 3)  # found, but not batch-first: move_relevance does not use it


def test_an_op_that_is_not_a_rearrangement_is_named():
    class Sort(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return torch.cumsum(self.conv(x), 3).mean((2, 3))

    with pytest.raises(UnsupportedOpError, match="cumsum"):
        graphlrp.compile(Sort().eval(), torch.randn(1, 3, 6, 6))


# ------------------------------------------------------------------ constant padding: a constant joining the input
class PaddedThenShifted(nn.Module):
    """Zero padding that later receives relevance, as SAM's window padding does: the padded cells become 0.5 after
    a constant add, so the linear layer gives them a share of the logit."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4 * (6 + 3), 3, bias=False)

    def forward(self, x):
        return self.fc((F.pad(x, (1, 2)) + 0.5).flatten(1))


@pytest.mark.parametrize("constant_cat", ["drop", "spread"])
def test_relevance_on_constant_padding_is_spread_over_the_input_or_dropped(constant_cat, tmp_path):
    """The relevance that lands on constant padding is relevance of a constant, as a class token's is: `drop`
    loses it, `spread` hands it to the padded tensor in proportion to |x| per sample. Reference: the z⁺ rule of the
    linear layer written out by hand (every input is positive, so z⁺ is the z-rule on W⁺)."""
    torch.manual_seed(0)
    model = PaddedThenShifted().eval()
    x = torch.rand(2, 4, 6) + 0.1
    zplus = {"rule": "zplus", "epsilon": 1e-9, "bias": "zero", "dead_units": "spread"}
    rules = {"output": "logit", "rules": {"first_layer": zplus, "linear": zplus, "constant_add": "pass",
                                          "constant_cat": constant_cat}}
    explainer = graphlrp.compile(model, x[:1], rules=rules)
    logits, rel, taps = explainer.explain_with_taps(x)

    h = (F.pad(x, (1, 2)) + 0.5).flatten(1)
    target = logits.argmax(1)
    w_pos = model.fc.weight.clamp_min(0)[target]  # [N, 36]
    r_h = (h * w_pos / (h * w_pos).sum(1, keepdim=True) * logits.gather(1, target[:, None])).view(2, 4, 9)
    on_padding = r_h.sum((1, 2)) - r_h[..., 1:7].sum((1, 2))
    expected = r_h[..., 1:7]
    if constant_cat == "spread":
        expected = expected + x * (on_padding / x.sum((1, 2)))[:, None, None]
    assert on_padding.min() > 0.05 * taps["output"].abs().min()  # the padding does receive relevance here
    assert rel_diff(rel, expected) <= 1e-5
    ratio = taps["input"] / taps["output"]
    if constant_cat == "spread":
        assert (ratio - 1).abs().max() <= 1e-5
        pytest.importorskip("onnxruntime")
        assert explainer.export_onnx(tmp_path / "pad.onnx").max_rel_diff <= 1e-4
    else:
        assert rel_diff(ratio, 1 - on_padding / taps["output"]) <= 1e-5


# ------------------------------------------------------------------ recurrent layers, unrolled
class Recurrent(nn.Module):
    """nn.LSTM / nn.GRU / nn.RNN over [N, T, C] sequences, read out by a linear head over every step's output."""

    def __init__(self, kind: str, steps: int = 5, batch_first: bool = True, **kw):
        super().__init__()
        self.batch_first = batch_first
        self.rnn = getattr(nn, kind)(4, 5, batch_first=batch_first, **kw)
        directions = 2 if kw.get("bidirectional") else 1
        self.fc = nn.Linear(5 * directions * steps, 3)

    def forward(self, x):
        y, _ = self.rnn(x if self.batch_first else x.transpose(0, 1))
        return self.fc((y if self.batch_first else y.transpose(0, 1)).flatten(1))


def arras_forward(lstm: nn.LSTM, x: torch.Tensor, suffix: str = "") -> tuple:
    """One direction of a one-layer LSTM in float64 over x [n, T, C] in x's order: (every step's h_t [n, T, H],
    the per-step values the relevance pass needs)."""
    W_ih, W_hh = getattr(lstm, "weight_ih_l0" + suffix).double(), getattr(lstm, "weight_hh_l0" + suffix).double()
    b = (getattr(lstm, "bias_ih_l0" + suffix) + getattr(lstm, "bias_hh_l0" + suffix)).double()
    x = x.double()
    n, T, _ = x.shape
    H = lstm.hidden_size
    h, c = torch.zeros(n, H, dtype=torch.float64), torch.zeros(n, H, dtype=torch.float64)
    steps = []
    for t in range(T):
        z = x[:, t] @ W_ih.T + h @ W_hh.T + b
        i, f, g, o = z[:, :H].sigmoid(), z[:, H:2 * H].sigmoid(), z[:, 2 * H:3 * H].tanh(), z[:, 3 * H:].sigmoid()
        c_prev, h_prev = c, h
        c = f * c + i * g
        h = o * c.tanh()
        steps.append((h_prev, c_prev, f, i, g))
    hs = torch.stack([s[0] for s in steps[1:]] + [h], 1)
    return hs, (x, W_ih, W_hh, steps)


def arras_backward(lstm: nn.LSTM, state: tuple, R_h: torch.Tensor, eps: float) -> torch.Tensor:
    """LRP for one direction of a one-layer LSTM written step by step (Arras et al., 2017), in float64, from the
    relevance R_h [n, T, H] of every step's output: the gates i, f, o take no relevance; c_t = f·c_{t-1} + i·g
    splits R_c in proportion to the two terms; g = tanh(W·[x_t, h_{t-1}] + b) passes R to the linear layer, whose
    bias-free ε-rule hands it to x_t and h_{t-1}. Returns R_x [n, T, C]."""
    x, W_ih, W_hh, steps = state
    n, T, C = x.shape
    H = lstm.hidden_size
    R_x = torch.zeros_like(x)
    R_c = torch.zeros(n, H, dtype=torch.float64)
    carry = torch.zeros(n, H, dtype=torch.float64)  # relevance of h_t from step t+1's linear layer
    w_g = torch.cat([W_ih[2 * H:3 * H], W_hh[2 * H:3 * H]], 1)  # [H, C + H]
    for t in reversed(range(T)):
        h_prev, c_prev, f, i, g = steps[t]
        R_c = R_c + R_h[:, t] + carry  # h_t = o·tanh(c_t): all of it to c_t
        c_t = f * c_prev + i * g
        R_prev, R_g = f * c_prev * R_c / (c_t + eps), i * g * R_c / (c_t + eps)
        inputs = torch.cat([x[:, t], h_prev], 1)
        z_g = inputs @ w_g.T
        R_in = inputs * ((R_g / (z_g + eps)) @ w_g)
        R_x[:, t], carry, R_c = R_in[:, :C], R_in[:, C:], R_prev
    return R_x


def epsilon_head(features: torch.Tensor, fc: nn.Linear, eps: float) -> tuple:
    """The logits of a linear head over flat features, and its bias-free ε-rule relevance of the features (the
    target: each sample's top logit)."""
    logits = features @ fc.weight.double().T + fc.bias.double()
    target = logits.argmax(1)
    w = fc.weight.double()[target]
    z = (features * w).sum(1, keepdim=True)
    return logits, features * w * logits.gather(1, target[:, None]) / (z + eps)


def arras_lstm_relevance(lstm: nn.LSTM, fc: nn.Linear, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Arras' LRP of a one-layer LSTM read out by a linear head over every step's output, in float64."""
    hs, state = arras_forward(lstm, x)
    _, R = epsilon_head(hs.flatten(1), fc, eps)
    return arras_backward(lstm, state, R.view(hs.shape), eps)


def test_lstm_unrolled_is_arras_lrp_with_the_gates_held_constant():
    """nn.LSTM is unrolled at compile time; its products are recognised as gates (σ gates a tanh candidate), so the
    explainer is the per-step LSTM LRP of Arras et al. Reference: that LRP written by hand in float64."""
    torch.manual_seed(0)
    model = Recurrent("LSTM").eval()
    x = torch.randn(2, 5, 4)
    eps = {"rule": "epsilon", "epsilon": 1e-12, "stabilizer": "add", "bias": "zero"}
    rules = {"output": "logit", "split": "signed",
             "rules": {"first_layer": eps, "linear": eps, "merge": {"rule": "split", "epsilon": 1e-12}}}
    explainer = graphlrp.compile(model, x[:1], rules=rules)
    logits, rel, taps = explainer.explain_with_taps(x)
    with torch.no_grad():
        assert rel_diff(logits, model(x)) <= 1e-5
        expected = arras_lstm_relevance(model.rnn, model.fc, x, 1e-12)
    assert rel_diff(rel, expected) <= 1e-4
    assert ((taps["input"] / taps["output"]) - 1).abs().max() <= 1e-4


class RowsAndColumns(nn.Module):
    """Sequencer2D's mixing: a bidirectional LSTM down the columns and one along the rows of an [n, S, S, C] grid,
    concatenated, read out by a linear head over every position (`chained`: the row LSTM reads the column LSTM's
    output instead, so the two cannot run side by side)."""

    def __init__(self, side: int = 4, channels: int = 3, hidden: int = 5, chained: bool = False):
        super().__init__()
        self.chained = chained
        self.v = nn.LSTM(channels, hidden, batch_first=True, bidirectional=True)
        self.h = nn.LSTM(2 * hidden if chained else channels, hidden, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(side * side * (2 if chained else 4) * hidden, 3)

    def forward(self, x):
        n, rows, cols, c = x.shape
        v = self.v(x.permute(0, 2, 1, 3).reshape(-1, rows, c))[0]
        v = v.reshape(n, cols, rows, -1).permute(0, 2, 1, 3)
        if self.chained:
            return self.fc(self.h(v.reshape(-1, cols, v.shape[-1]))[0].flatten(1).reshape(n, -1))
        h = self.h(x.reshape(-1, cols, c))[0].reshape(n, rows, cols, -1)
        return self.fc(torch.cat([v, h], -1).flatten(1))


def arras_rows_and_columns(model: RowsAndColumns, x: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference for RowsAndColumns: each LSTM direction by `arras_forward` / `arras_backward` on its own
    sequences (a reverse direction on them flipped), the head's ε-rule between, relevance summed back on the grid."""
    n, S, _, C = x.shape
    H = model.v.hidden_size
    x = x.double()
    sequences = {"v": x.permute(0, 2, 1, 3).reshape(-1, S, C), "h": x.reshape(-1, S, C)}
    lanes = {}
    for name, seq in sequences.items():
        lstm = getattr(model, name)
        fwd, fwd_state = arras_forward(lstm, seq)
        rev, rev_state = arras_forward(lstm, seq.flip(1), "_reverse")
        lanes[name] = (torch.cat([fwd, rev.flip(1)], -1), fwd_state, rev_state)
    v_grid = lanes["v"][0].reshape(n, S, S, 2 * H).permute(0, 2, 1, 3)
    h_grid = lanes["h"][0].reshape(n, S, S, 2 * H)
    _, R = epsilon_head(torch.cat([v_grid, h_grid], -1).flatten(1), model.fc, eps)
    R = R.view(n, S, S, 4 * H)
    R_seq = {"v": R[..., :2 * H].permute(0, 2, 1, 3).reshape(-1, S, 2 * H), "h": R[..., 2 * H:].reshape(-1, S, 2 * H)}
    R_x = {}
    for name in ("v", "h"):
        lstm, (_, fwd_state, rev_state) = getattr(model, name), lanes[name]
        R_x[name] = (arras_backward(lstm, fwd_state, R_seq[name][..., :H], eps)
                     + arras_backward(lstm, rev_state, R_seq[name][..., H:].flip(1), eps).flip(1))
    return R_x["v"].reshape(n, S, S, C).permute(0, 2, 1, 3) + R_x["h"].reshape(n, S, S, C)


def _count(explainer, target) -> int:
    return sum(n.op == "call_function" and n.target is target for n in explainer._traced.graph.nodes)


def test_independent_lstms_and_both_directions_run_side_by_side_with_arras_relevance(tmp_path):
    """Both directions of a bidirectional LSTM, and two LSTMs that read no output of one another (Sequencer2D's
    vertical and horizontal ones), are unrolled as one: each step one grouped linear layer per gate for all four
    lanes, so the graph grows with the steps, not with steps × lanes. Each unit's rule is unchanged. Reference:
    Arras' LSTM LRP per lane, in float64."""
    torch.manual_seed(0)
    model = RowsAndColumns().eval()
    x = torch.randn(2, 4, 4, 3)
    eps = {"rule": "epsilon", "epsilon": 1e-12, "stabilizer": "add", "bias": "zero"}
    rules = {"output": "logit", "split": "signed",
             "rules": {"first_layer": eps, "linear": eps, "merge": {"rule": "split", "epsilon": 1e-12}}}
    explainer = graphlrp.compile(model, x[:1], rules=rules)
    steps, gates = 4, 4
    assert _count(explainer, graphlrp.ops.grouped_linear) == steps * gates - 1  # no forget gate at the zero state
    assert _count(explainer, F.linear) == 0  # no lane unrolled on its own (the head is the module fc)
    logits, rel, taps = explainer.explain_with_taps(x)
    with torch.no_grad():
        assert rel_diff(logits, model(x)) <= 1e-5
        expected = arras_rows_and_columns(model, x, 1e-12)
    assert rel_diff(rel, expected) <= 1e-4
    assert ((taps["input"] / taps["output"]) - 1).abs().max() <= 1e-4
    pytest.importorskip("onnxruntime")
    conserving = graphlrp.compile(model, x[:1], rules="otsuki2024-conserving")
    assert conserving.export_onnx(tmp_path / "lanes.onnx").max_rel_diff <= 1e-4


def test_an_lstm_reading_another_ones_output_is_not_run_beside_it():
    """Only independent recurrent layers run side by side: an LSTM over another's output is unrolled after it
    (its two directions still side by side), and the explainer reproduces the model and conserves."""
    torch.manual_seed(0)
    model = RowsAndColumns(chained=True).eval()
    x = torch.randn(2, 4, 4, 3)
    explainer = graphlrp.compile(model, x[:1], rules="otsuki2024-conserving")
    assert _count(explainer, graphlrp.ops.grouped_linear) == 2 * (4 * 4 - 1)  # two unrolls of two lanes each
    logits, rel, taps = explainer.explain_with_taps(x)
    with torch.no_grad():
        assert rel_diff(logits, model(x)) <= 1e-5
    assert ((taps["input"] / taps["output"]) - 1).abs().max() <= 1e-4


@pytest.mark.parametrize("kind, options", [
    ("LSTM", dict(bidirectional=True, num_layers=2)), ("LSTM", dict(batch_first=False)),
    ("GRU", dict(bidirectional=True, num_layers=2)), ("RNN", dict(bidirectional=True)),
    ("RNN", dict(nonlinearity="relu"))], ids=["lstm-bi-2", "lstm-time-major", "gru-bi-2", "rnn-bi", "rnn-relu"])
@pytest.mark.parametrize("preset", ["otsuki2024-conserving", "cp-lrp-conserving"])
def test_recurrent_layers_unrolled_conserve_and_export(kind, options, preset, tmp_path):
    """Every recurrent layer of torch.nn, bidirectional, stacked or time-major, reproduces the model and conserves
    under both conserving presets, and exports with onnxruntime parity."""
    torch.manual_seed(0)
    model = Recurrent(kind, **options).eval()
    x = torch.randn(2, 5, 4)
    explainer = graphlrp.compile(model, x[:1], rules=preset)
    logits, rel, taps = explainer.explain_with_taps(x)
    with torch.no_grad():
        assert rel_diff(logits, model(x)) <= 1e-5
    assert ((taps["input"] / taps["output"]) - 1).abs().max() <= 1e-4
    gates = [op for op in (graphlrp.ops.describe(n, explainer._traced) for n in explainer._traced.graph.nodes
                           if n.op in ("call_function", "call_method") and n.meta.get("dynamic")) if op is not None]
    assert not [op for op in gates if op.kind == graphlrp.ops.PRODUCT]  # every product is a gate: Arras' rule
    if preset == "otsuki2024-conserving":
        pytest.importorskip("onnxruntime")
        assert explainer.export_onnx(tmp_path / "rnn.onnx").max_rel_diff <= 1e-4


@pytest.mark.parametrize("module", [nn.LSTM(8, 5, num_layers=2, bidirectional=True, batch_first=True),
                                    nn.LSTM(8, 5, proj_size=3), nn.GRU(8, 5, bidirectional=True),
                                    nn.RNN(8, 5, num_layers=3, batch_first=True)], ids=["lstm", "lstm-proj", "gru", "rnn"])
def test_a_recurrent_layer_on_the_meta_device_has_the_shapes_of_its_real_run(module):
    """The trace's shape run (batch 2 on the meta device) takes an RNN's output shapes from its sizes, not from
    PyTorch's step-by-step meta decomposition (seconds per layer of Sequencer2D): the same shapes as a real run."""
    from graphlrp.graph import call_on_meta

    x = torch.randn(4, 7, 8)
    flat = lambda out: [tuple(t.shape) for t in (out[0], *(out[1] if isinstance(out[1], tuple) else (out[1],)))]  # noqa: E731
    meta = call_on_meta(module, (x.to("meta"),), {})
    assert flat(meta) == flat(module(x)) and meta[0].device.type == "meta"


def test_the_batch_dims_of_repeated_ops_are_worked_out_once_and_are_those_of_running_each(monkeypatch):
    """The trace's meta run remembers an op's result by its inputs' metadata (an unrolled LSTM repeats equal steps):
    the batch dims it records are those of running every op, and 2 and 2.0 are different arguments."""
    import graphlrp.graph as graph_module
    import graphlrp.trace as trace_module

    class Repeats(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.fc = nn.LSTM(4, 6, batch_first=True, bidirectional=True), nn.Linear(12, 3)

        def forward(self, x):
            y = self.rnn(x)[0].transpose(0, 1) * 2  # the batch moves to dim 1
            return self.fc((y.transpose(0, 1) * 2.0).mean(1))

    torch.manual_seed(0)
    x = torch.randn(1, 6, 4)
    remembered = trace_module.trace(Repeats().eval(), x)
    monkeypatch.setattr(graph_module.MetaResults, "__call__", lambda self, target, args, kwargs, run: run(target, args, kwargs))
    each = trace_module.trace(Repeats().eval(), x)
    dims = lambda t: [(n.name, n.meta.get("batch_dim", "none")) for n in t.graph.nodes]  # noqa: E731
    assert dims(remembered) == dims(each)
    # the export's batch probe of the explainer (the same memo) against running each op
    from graphlrp.fx_to_onnx import _probe_batch  # noqa: PLC2701  (the probe under test)

    gm = graphlrp.compile(Repeats().eval(), x, rules="otsuki2024-conserving", verify=False).graph_module
    each_probe = _probe_batch(gm, (x, torch.tensor([-1])))
    monkeypatch.undo()
    remembered_probe = _probe_batch(gm, (x, torch.tensor([-1])))
    assert remembered_probe.remembered.results  # the memo was used
    assert {n.name: d for n, d in remembered_probe.dim0.items()} == {n.name: d for n, d in each_probe.dim0.items()}
    assert {d for _, d in dims(each)} >= {0, 1, None}  # the batch moves, and constants have none
    int_key, float_key = (graph_module.metadata_key(v) for v in (2, 2.0))
    assert int_key != float_key


def test_a_recurrent_layer_with_a_given_state_or_read_final_state_is_refused():
    class GivenState(nn.Module):
        def __init__(self, read_state: bool):
            super().__init__()
            self.read_state = read_state
            self.rnn, self.fc = nn.GRU(4, 5, batch_first=True), nn.Linear(5, 3)

        def forward(self, x):
            if self.read_state:
                return self.fc(self.rnn(x)[1][0])
            return self.fc(self.rnn(x, torch.zeros(1, x.shape[0], 5))[0][:, -1])

    for read_state, words in ((False, "initial state"), (True, "final state")):
        with pytest.raises(UnsupportedOpError, match=words):
            graphlrp.compile(GivenState(read_state).eval(), torch.randn(1, 5, 4))


# ------------------------------------------------------------------ n-ary merges
class Branches(nn.Module):
    """logits = a(x) + b(x) + c(x), or the same three stacked and summed: the merge sits at the output."""

    def __init__(self, spelling):
        super().__init__()
        self.spelling = spelling
        self.a, self.b, self.c = nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(6, 4)

    def forward(self, x):
        x = x.flatten(1)
        h = [self.a(x), self.b(x), self.c(x)]
        if self.spelling == "chain":
            return h[0] + h[1] + h[2]
        if self.spelling == "sum_stack":
            return torch.stack(h, 1).sum(1)
        return torch.stack(h).sum(0)

    def terms(self, x):
        x = x.flatten(1)
        return [self.a(x), self.b(x), self.c(x)]


@pytest.mark.parametrize("spelling", ["chain", "sum_stack", "stack_sum"])
@pytest.mark.parametrize("split", ["ratio", "symmetric", "signed"])
def test_n_ary_merge_splits(spelling, split):
    torch.manual_seed(1)
    model = Branches(spelling).eval()
    x = torch.randn(2, 6, 1, 1)
    explainer = graphlrp.compile(model, x[:1], rules={**LOGIT, "split": split}, allow_vanishing=True)
    (merge,) = explainer.merges
    assert merge.arity == 3
    assert merge.kind == ("add" if spelling == "chain" else "sum")
    logits, _, taps = explainer.explain_with_taps(x)
    with torch.no_grad():
        h = torch.stack(model.terms(x)).double()  # [3, N, K]
    t = logits.argmax(-1)
    ht = h[:, torch.arange(2), t]  # [3, N]: the terms of the target logit
    R = logits.double()[torch.arange(2), t]
    if split == "ratio":
        expected = R * ht.abs() / ht.abs().sum(0)
    elif split == "symmetric":
        expected = R.expand(3, -1) / 3
    else:
        expected = R * ht / (ht.sum(0) + 1e-6 * torch.where(ht.sum(0) >= 0, 1.0, -1.0))
    for i in range(3):
        assert rel_diff(taps[f"merge:{merge.node}.R_{i}"], expected[i]) < 1e-5
    total = sum(taps[f"merge:{merge.node}.R_{i}"] for i in range(3))
    # ratio and symmetric are exact; signed loses R·ε/(h + ε) to its stabiliser
    assert torch.allclose(total, taps[f"merge:{merge.node}.R"], rtol=1e-5 if split == "signed" else 1e-6, atol=1e-7)


# ------------------------------------------------------------------ gates
class Gated(nn.Module):
    def __init__(self, gate: str, constant=None):
        super().__init__()
        self.kind, self.constant = gate, constant
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.g = nn.Conv2d(8, 8, 1)
        self.s = nn.Conv2d(2, 1, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def gate(self, y):
        if self.constant is not None:
            return self.constant
        if self.kind == "se":
            return torch.sigmoid(self.g(y.mean((2, 3), keepdim=True)))
        if self.kind == "hard":
            return F.hardsigmoid(self.g(y.mean((2, 3), keepdim=True)))
        if self.kind == "eca":  # gate expanded to the full shape before the product
            return torch.sigmoid(self.g(y.mean((2, 3), keepdim=True))).expand_as(y)
        if self.kind == "cbam":
            return torch.sigmoid(self.s(torch.cat([y.mean(1, keepdim=True), y.amax(1, keepdim=True)], 1)))
        if self.kind == "swish":  # same shape, x * sigmoid(x)
            return torch.sigmoid(y)
        return self.g(y).softmax(1)

    def forward(self, x):
        y = F.relu(self.conv(x))
        return self.fc((y * self.gate(y)).mean((2, 3)))


@pytest.mark.parametrize("kind", ["se", "hard", "eca", "cbam", "swish", "softmax"])
def test_gate_relevance_equals_gate_held_constant(kind):
    torch.manual_seed(0)
    model = Gated(kind).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        g = model.gate(F.relu(model.conv(x)))
    frozen = Gated(kind, constant=g).eval()
    frozen.load_state_dict(model.state_dict())
    _, rel = graphlrp.compile(model, x, rules="otsuki2024-conserving")(x)
    _, rel_frozen = graphlrp.compile(frozen, x, rules="otsuki2024-conserving")(x)
    assert rel_diff(rel, rel_frozen) < 1e-5


def test_product_of_two_signals_is_a_clear_error():
    class Product(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.fc = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc((self.a(x) * self.b(x)).mean((2, 3)))

    with pytest.raises(UnsupportedOpError, match="product of two input-dependent tensors"):  # no `product` rule
        graphlrp.compile(Product().eval(), torch.randn(1, 3, 4, 4), rules="epsilon-plus-flat")


# ------------------------------------------------------------------ adaptive pooling with unequal windows
class Adaptive(nn.Module):
    def __init__(self, out):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(out)

    def forward(self, x):
        return self.pool(F.relu(x)).flatten(1)


@pytest.mark.parametrize("size,out", [(5, 3), (2, 3), (7, (2, 5))])
def test_adaptive_pool_unequal_windows_is_the_z_rule(size, out):
    torch.manual_seed(0)
    model = Adaptive(out).eval()
    x = torch.rand(2, 3, size, size) + 0.1
    rules = {**LOGIT, "rules": {"avgpool": {"rule": "z", "epsilon": 0.0}}}
    explainer = graphlrp.compile(model, x[:1], rules=rules)
    logits, rel = explainer(x)
    for i in range(2):
        a = F.relu(x[i:i + 1]).double().requires_grad_(True)
        z = model.pool(a).flatten(1)
        t = int(logits[i].argmax())
        (g,) = torch.autograd.grad(z[0, t], a)
        expected = a * g  # z-rule: R_in = a ⊙ Pᵀ(R / z) with R = z_t on the target cell
        assert rel_diff(rel[i].sum(0), expected[0].sum(0).detach()) < 1e-5


# ------------------------------------------------------------------ linear resampling: a fixed linear map
RESAMPLINGS = {
    "bilinear_x2": lambda y: F.interpolate(y, scale_factor=2, mode="bilinear"),
    "bilinear_align_corners": lambda y: F.interpolate(y, scale_factor=1.5, mode="bilinear", align_corners=True),
    "bicubic_to_size": lambda y: F.interpolate(y, size=(7, 9), mode="bicubic", align_corners=False),
    "bicubic_down": lambda y: F.interpolate(y, size=(3, 4), mode="bicubic"),
    "bilinear_antialias": lambda y: F.interpolate(y, size=(3, 2), mode="bilinear", antialias=True),
    "area": lambda y: F.interpolate(y, size=(4, 3), mode="area"),
    "upsample_module": nn.Upsample(scale_factor=2, mode="bilinear"),
    "upsampling_bilinear2d": nn.UpsamplingBilinear2d(size=(6, 7)),
    "avg_pool1d": lambda y: F.avg_pool1d(y.flatten(2), 3, 2, 1).unflatten(2, (-1, 1)),
    "avg_pool1d_module": nn.Sequential(nn.Flatten(2), nn.AvgPool1d(2, 2)),
}


class Resample(nn.Module):
    def __init__(self, op, features):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fn = op
        self.fc = nn.Linear(features, 5, bias=False)

    def forward(self, x):
        return self.fc(self.fn(F.relu(self.conv(x))).flatten(1))


@pytest.mark.parametrize("name", sorted(RESAMPLINGS))
def test_linear_resampling_is_the_z_rule_through_its_exact_weights(name):
    """relu(conv) -> resampling -> linear. Reference, in float64 from autograd: the linear layer's ε-rule
    (ε = 1e-9, no bias) R_y = y ⊙ Wᵀ(R / Wy), then the resampling's z-rule through its Jacobian J (autograd's
    vector-Jacobian product): R_a = a ⊙ Jᵀ(R_y / y). Conservation and the export (onnxruntime parity) too."""
    torch.manual_seed(0)
    op = RESAMPLINGS[name]
    x = torch.randn(2, 3, 6, 5)
    with torch.no_grad():
        features = op(torch.zeros(1, 4, 6, 5)).numel()
    model = Resample(op, features).eval()
    explainer = graphlrp.compile(model, x[:1], rules="cp-lrp-conserving")
    logits, rel, taps = explainer.explain_with_taps(x)
    assert (taps["input"] / taps["output"] - 1).abs().max() <= 1e-5
    assert rel_diff(logits, model(x).detach()) <= 1e-5
    m64 = model.double()
    for i in range(2):
        a = F.relu(m64.conv(x[i:i + 1].double())).detach().requires_grad_(True)
        y = op(a)
        z = m64.fc(y.flatten(1))
        t = int(z.argmax())
        w = m64.fc.weight[t].reshape(y.shape)
        r_y = (y * w).detach()  # R = z_t on the target: R_y = y ⊙ w_t (the ε-rule with ε → 0)
        safe = torch.where(y == 0, 1.0, y).detach()  # y = 0 (a window of dead ReLUs) carries R_y = 0
        (vjp,) = torch.autograd.grad(y, a, torch.where(y == 0, 0.0, r_y / safe))
        expected = (a * vjp).detach()
        # then ReLU passes R_a on, and the first conv's ε-rule without its bias: R_x = x ⊙ Wᵀ(R_a / Wx)
        x_i = x[i:i + 1].double().requires_grad_(True)
        wx = m64.conv(x_i) - m64.conv.bias.view(1, -1, 1, 1)
        (back,) = torch.autograd.grad(wx, x_i, expected / wx.detach())
        assert rel_diff(rel[i], (x_i * back)[0].detach()) < 1e-4, name
    model.float()
    import tempfile, os
    assert explainer.export_onnx(os.path.join(tempfile.mkdtemp(), "r.onnx")).max_rel_diff <= 1e-3


def _not_separable(x, *args, **kwargs):
    """A resampling followed by a mix of rows and columns: linear, per channel, but not H ⊗ W separable."""
    y = F.interpolate(x, *args, **kwargs)
    return y + torch.roll(y.transpose(-1, -2), 1, -1).transpose(-1, -2) * torch.arange(y.shape[-1]).float()


def _channel_mixing(x, *args, **kwargs):
    return F.interpolate(x, *args, **kwargs) + F.interpolate(x.flip(1), *args, **kwargs)


@pytest.mark.parametrize("fn", [_not_separable, _channel_mixing])
def test_a_map_that_is_not_a_separable_resampling_is_refused(fn):
    """The per-axis matrices are checked on a random input: a node whose computation is not what they describe
    (here a planted target in place of F.interpolate) is an UnsupportedOpError naming it, not a wrong rule."""
    from graphlrp.ops.pooling import separable_linear_op
    from graphlrp.trace import trace

    class Up(nn.Module):
        def forward(self, x):
            return F.interpolate(x, scale_factor=2, mode="bilinear").mean((2, 3))

    traced = trace(Up(), torch.randn(1, 3, 4, 5))
    node = next(n for n in traced.graph.nodes if n.target is F.interpolate)
    assert separable_linear_op(node, traced).params["axes"][0][1].shape == (8, 4)
    traced = trace(Up(), torch.randn(1, 3, 4, 5))  # a fresh graph: the maps are derived once per node
    node = next(n for n in traced.graph.nodes if n.target is F.interpolate)
    node.target = fn
    with pytest.raises(UnsupportedOpError, match="not a fixed linear map"):
        separable_linear_op(node, traced)


class FoldPatches(nn.Module):
    """VOLO's outlook pattern: patches cut out (unfold, a copy: a MOVE), weighted, summed back (fold)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4 * 6 * 5, 3, bias=False)
        self.register_buffer("w", torch.rand(1, 36, 1) + 0.5)

    def patches(self, x):
        return F.unfold(x, 3, padding=1) * self.w

    def forward(self, x):
        return self.fc(F.fold(self.patches(x), (6, 5), 3, padding=1).flatten(1))


def test_fold_is_the_z_rule_through_its_patches():
    """Reference from autograd in float64: R_y = y ⊙ w_t at the bias-free head; fold's z-rule
    R_u = u ⊙ Jᵀ(R_y / y) (J: fold's Jacobian, autograd's vector-Jacobian product); the scale by a constant
    passes R_u; unfold is a copy whose relevance sums back (its VJP). Conserving, exported with parity."""
    torch.manual_seed(0)
    model = FoldPatches().eval()
    x = torch.randn(2, 4, 6, 5)
    explainer = graphlrp.compile(model, x[:1], rules="cp-lrp-conserving")
    logits, rel, taps = explainer.explain_with_taps(x)
    assert (taps["input"] / taps["output"] - 1).abs().max() <= 1e-5
    m64 = model.double()
    for i in range(2):
        xi = x[i:i + 1].double().requires_grad_(True)
        cut = F.unfold(xi, 3, padding=1)
        u = (cut * m64.w).detach().requires_grad_(True)
        y = F.fold(u, (6, 5), 3, padding=1)
        t = int(m64.fc(y.flatten(1)).argmax())
        r_y = (y * m64.fc.weight[t].reshape(y.shape)).detach()
        (vjp,) = torch.autograd.grad(y, u, r_y / y.detach())
        r_u = (u * vjp).detach()
        (expected,) = torch.autograd.grad(cut, xi, r_u)
        assert rel_diff(rel[i], expected[0]) < 1e-4
    model.float()
    import tempfile, os
    assert explainer.export_onnx(os.path.join(tempfile.mkdtemp(), "f.onnx")).max_rel_diff <= 1e-3


# ------------------------------------------------------------------ 1-d convolutions
class Conv1dNet(nn.Module):
    """EfficientViM's ConvLayer1D: nn.Conv1d (grouped, padded) and F.conv1d on token sequences; no biases."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.conv1d = nn.Conv1d(4, 6, 3, padding=1, stride=2, groups=2, bias=False)
        self.w = nn.Parameter(torch.randn(5, 6, 1))
        self.fc = nn.Linear(5, 3, bias=False)

    def forward(self, x):
        y = F.relu(self.conv1d(F.relu(self.conv(x)).flatten(2)))
        return self.fc(F.relu(F.conv1d(y, self.w)).mean(2))


def test_conv1d_is_a_conv_and_lrp0_equals_gradient_times_input():
    """Without biases and with ε → 0, LRP through conv, ReLU, mean and linear is Gradient×Input (autograd)."""
    torch.manual_seed(0)
    model = Conv1dNet().eval()
    x = torch.randn(2, 3, 5, 6)
    zero = {"rule": "epsilon", "epsilon": 1e-12}  # LRP-0; 1e-12 only where a window of dead ReLUs gives z = 0
    rules = {"output": "logit", "rules": {"first_layer": zero, "conv": zero, "linear": zero,
                                          "reduction": {"rule": "z", "epsilon": 1e-12, "dead_units": "spread"},
                                          "avgpool": {"rule": "z", "epsilon": 1e-12, "dead_units": "spread"}}}
    explainer = graphlrp.compile(model, x[:1], rules=rules)
    logits, rel = explainer(x)
    xr = x.clone().requires_grad_(True)
    out = model(xr)
    (g,) = torch.autograd.grad(out.gather(1, out.argmax(1, keepdim=True)).sum(), xr)
    assert rel_diff(rel, (xr * g).detach()) < 1e-4
    import tempfile, os
    assert explainer.export_onnx(os.path.join(tempfile.mkdtemp(), "c.onnx")).max_rel_diff <= 1e-4


class ConvTransposeNet(nn.Module):
    """LowFormer's upsampling: nn.ConvTranspose2d (strided, padded, grouped, output_padding)."""

    def __init__(self, bias: bool, **geometry):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=bias)
        self.up = nn.ConvTranspose2d(4, 6, bias=bias, **geometry)
        self.fc = nn.Linear(6, 3, bias=False)

    def forward(self, x):
        return self.fc(F.relu(self.up(F.relu(self.conv(x)))).mean((2, 3)))


CONV_TRANSPOSES = [dict(kernel_size=4, stride=2, padding=1, groups=2), dict(kernel_size=3, stride=1, padding=1),
                   dict(kernel_size=3, stride=2, padding=1, output_padding=1, groups=2)]


@pytest.mark.parametrize("geometry", CONV_TRANSPOSES, ids=["k4s2p1g2", "k3s1p1", "k3s2p1op1g2"])
def test_conv_transpose_is_a_conv_and_lrp0_equals_gradient_times_input(geometry):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 6)
    model = ConvTransposeNet(False, **geometry).eval()
    zero = {"rule": "epsilon", "epsilon": 1e-12}
    spread = {"rule": "z", "epsilon": 1e-12, "dead_units": "spread"}
    rules = {"output": "logit", "rules": {"first_layer": zero, "conv": zero, "linear": zero, "avgpool": spread}}
    logits, rel = graphlrp.compile(model, x[:1], rules=rules)(x)
    xr = x.clone().requires_grad_(True)
    out = model(xr)
    (g,) = torch.autograd.grad(out.gather(1, out.argmax(1, keepdim=True)).sum(), xr)
    assert rel_diff(logits, out.detach()) <= 1e-5
    assert rel_diff(rel, (xr * g).detach()) < 1e-4
    with_bias = ConvTransposeNet(True, **geometry).eval()  # the conserving preset with biases, and the export
    explainer = graphlrp.compile(with_bias, x[:1], rules="otsuki2024-conserving")
    _, _, taps = explainer.explain_with_taps(x)
    assert (taps["input"] / taps["output"] - 1).abs().max() <= 1e-5
    import tempfile, os
    assert explainer.export_onnx(os.path.join(tempfile.mkdtemp(), "t.onnx")).max_rel_diff <= 1e-4


# ------------------------------------------------------------------ group norm, linearized (1/σ held constant)
class GroupNormHead(nn.Module):
    """nn.GroupNorm, and timm's GroupNorm1 spelling (F.group_norm with one group), before a bias-free head."""

    def __init__(self, functional: bool):
        super().__init__()
        self.functional = functional
        self.norm = nn.GroupNorm(2, 4, eps=1e-3)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)
        self.fc = nn.Linear(4 * 5 * 6, 3, bias=False)

    def norm_fn(self, x):
        if self.functional:
            return F.group_norm(x, 1, self.norm.weight, self.norm.bias, 1e-5)
        return self.norm(x)

    def forward(self, x):
        return self.fc(self.norm_fn(x).flatten(1))


@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
def test_group_norm_linearized_is_the_epsilon_rule_with_sigma_held(functional):
    """cp-lrp-conserving's `linearized` rule on a group norm, against autograd in float64: the norm with σ_g
    detached is the linear map f(x) = w (x − mean_g x) / σ_g; R_x = x ⊙ ∂⟨s, f(x)⟩/∂x, s = R_y / f(x), with
    R_y = y ⊙ w_t from the bias-free head. Conserving, and exported with parity."""
    torch.manual_seed(0)
    model = GroupNormHead(functional).eval()
    x = torch.randn(2, 4, 5, 6)
    explainer = graphlrp.compile(model, x[:1], rules="cp-lrp-conserving")
    logits, rel, taps = explainer.explain_with_taps(x)
    assert (taps["input"] / taps["output"] - 1).abs().max() <= 1e-5
    m64 = model.double()
    groups, eps = (1, 1e-5) if functional else (2, 1e-3)
    for i in range(2):
        xi = x[i:i + 1].double().requires_grad_(True)
        y = m64.norm_fn(xi)
        t = int(m64.fc(y.flatten(1)).argmax())
        r_y = (y * m64.fc.weight[t].reshape(y.shape)).detach()
        xg = xi.reshape(1, groups, -1)
        sigma = (xg.var(-1, unbiased=False, keepdim=True) + eps).sqrt().detach()
        f = ((xg - xg.mean(-1, keepdim=True)) / sigma).reshape(xi.shape) * m64.norm.weight.view(1, -1, 1, 1)
        (g,) = torch.autograd.grad(f, xi, r_y / f.detach())
        assert rel_diff(rel[i], (xi * g)[0].detach()) < 1e-4
    model.float()
    import tempfile, os
    assert explainer.export_onnx(os.path.join(tempfile.mkdtemp(), "g.onnx")).max_rel_diff <= 1e-3


# ------------------------------------------------------------------ norms that only scale: RMSNorm, F.normalize
class ScalingNorms(nn.Module):
    """A linear layer, one norm that only scales (no centring, no bias), a bias-free head."""

    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling
        self.fc1, self.fc2 = nn.Linear(6, 8, bias=False), nn.Linear(8, 3, bias=False)
        if spelling == "timm":
            from timm.layers import RmsNorm
            self.norm = RmsNorm(8)  # traced as a leaf call of timm's own rms_norm function
        else:
            self.norm = nn.RMSNorm(8, eps=1e-6)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        h = self.fc1(x)
        if self.spelling == "normalize":
            h = F.normalize(h, dim=-1)
        elif self.spelling == "functional":
            h = F.rms_norm(h, (8,), self.norm.weight, 1e-6)
        else:
            h = self.norm(h)
        return self.fc2(h)


@pytest.mark.parametrize("spelling", ["module", "functional", "timm", "normalize"])
def test_norms_that_only_scale_pass_relevance_as_a_diagonal_map(spelling):
    """With the normaliser held constant, RMSNorm (nn.RMSNorm, F.rms_norm, timm's RmsNorm) and F.normalize are
    y = c ⊙ h: cp-lrp-conserving's `linearized` rule hands each unit its relevance unchanged (ε-rule of a diagonal
    map). Against a float64 per-layer ε-rule: fc2, then the identity through the norm, then fc1; conserving, and
    exported with parity."""
    if spelling == "timm":
        pytest.importorskip("timm")
    torch.manual_seed(0)
    model = ScalingNorms(spelling).eval()
    x = torch.randn(3, 6)
    explainer = graphlrp.compile(model, x[:1], rules="cp-lrp-conserving")
    logits, rel = explainer(x)
    m = model.double()
    with torch.no_grad():
        h = m.fc1(x.double())
        if spelling == "normalize":
            y = F.normalize(h, dim=-1)
        elif spelling == "functional":
            y = F.rms_norm(h, (8,), m.norm.weight, 1e-6)
        else:
            y = m.norm(h)
        out = m.fc2(y)
        t = out.argmax(1)
        r_y = y * m.fc2.weight[t]  # the bias-free ε-rule of fc2 with R = the target logit: y_j w_tj
        r_x = x.double() * ((r_y / h) @ m.fc1.weight)  # through the norm unchanged, then fc1's ε-rule
    assert rel_diff(logits, out) <= 1e-5
    assert rel_diff(rel, r_x) <= 1e-4
    assert torch.allclose(rel.double().sum(1), out.gather(1, t[:, None])[:, 0], rtol=1e-4)
    import tempfile, os
    assert explainer.export_onnx(os.path.join(tempfile.mkdtemp(), "n.onnx")).max_rel_diff <= 1e-4


# ------------------------------------------------------------------ parameter-only subgraphs
class StdConv(nn.Conv2d):
    """Weight standardisation as timm's StdConv2d writes it: a batch norm over the weight."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                         eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def test_weight_standardisation_is_evaluated_at_compile_time():
    torch.manual_seed(0)
    model = nn.Sequential(StdConv(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    x = torch.randn(2, 3, 6, 6)
    explainer = graphlrp.compile(model, x[:1], rules="otsuki2024-conserving")
    logits, rel = explainer(x)
    with torch.no_grad():
        assert rel_diff(logits, model(x)) < 1e-6
    assert "batch_norm" not in explainer.code.split("softmax")[-1]  # the relevance pass uses the evaluated weight


# ------------------------------------------------------------------ odd models: graphlrp's errors only
class DataDependent(nn.Module):
    def forward(self, x):
        return x.flatten(1) if x.sum() > 0 else -x.flatten(1)


class TwoInputs(nn.Module):
    def forward(self, x, y):
        return (x + y).flatten(1)


class Tuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 2)

    def forward(self, x):
        return self.fc(x.flatten(1)), x


class Broken(nn.Module):
    def forward(self, x):
        return x.view(5, -1)


class Cumsum(nn.Module):
    """A linear op with no describer that is no rearrangement: no rule."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 2)

    def forward(self, x):
        return self.fc(torch.cumsum(x, -1).flatten(1))


class BatchMix(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 2)

    def forward(self, x):
        return self.fc(x.flatten(1)) - self.fc(x.flatten(1)).mean(0, keepdim=True) * 0 + x.sum()


@pytest.mark.parametrize("model,error", [
    (DataDependent(), TraceError), (TwoInputs(), TraceError), (Tuple(), TraceError), (Broken(), TraceError),
    (Cumsum(), UnsupportedOpError), (BatchMix(), GraphLRPError), ("not a model", TraceError)])
def test_odd_models_raise_graphlrp_errors(model, error):
    with pytest.raises(error):
        graphlrp.compile(model, torch.randn(1, 3, 2, 2))


# ------------------------------------------------------------------ ONNX export per mechanism
class Mechanisms(nn.Module):
    """One model with every new mechanism on the relevance path: a structural move (channel shuffle, permute,
    nearest upsampling, reflect pad), an n-ary merge and a branch-dim sum, gates, LayerNorm / GroupNorm, a
    channel reduction, an adaptive pool with unequal windows."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b = nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 1)
        self.ln, self.gn = nn.LayerNorm(8), nn.GroupNorm(2, 8)
        self.g = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8 * 9 + 9, 4)

    def forward(self, x):
        y = F.relu(self.stem(x))
        n, c, h, w = y.shape
        s = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        up = F.interpolate(F.relu(self.a(F.pad(s, (1, 1, 1, 1), mode="reflect")))[..., :h // 2, :w // 2],
                           scale_factor=2, mode="nearest")
        z = y + self.gn(self.b(s)) + up
        z = z + self.ln(z.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        z = torch.stack([z, z * torch.sigmoid(self.g(z.mean((2, 3), keepdim=True)))]).sum(0)
        pooled = F.adaptive_avg_pool2d(z, 3)
        return self.fc(torch.cat([pooled.flatten(1), pooled.sum(1).flatten(1)], 1))


def test_mechanisms_export_to_onnx_with_parity(tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = Mechanisms().eval()
    x = torch.randn(2, 3, 8, 8)
    explainer = graphlrp.compile(model, x[:1], rules="otsuki2024-conserving")
    logits, rel = explainer(x)
    with torch.no_grad():
        assert rel_diff(logits, model(x)) < 1e-5
    ratio = rel.flatten(1).sum(1) / logits.softmax(-1).max(-1).values
    assert ((ratio - 1).abs() < 1e-3).all()
    kinds = sorted(m.kind for m in explainer.merges)
    assert kinds == ["add", "add", "sum"] and max(m.arity for m in explainer.merges) == 3
    report = explainer.export_onnx(tmp_path / "m.onnx")
    assert report.max_rel_diff <= 1e-4
