"""LRP rules: one small registered function per rule, composed from a few modifiers.

A rule receives a `RuleContext` (the op, the relevance R arriving at its output, and an emitter that appends
tensor ops to the explainer graph) and returns the relevance for each of the op's relevance inputs. Rules for
conv/linear layers follow one pattern (Zennit's idea of a rule): for each term k, an input modifier a_k, a weight
modifier W_k and a bias modifier b_k give z = Σ_k layer(a_k; W_k, b_k); the stabilised ratio s = R / stab(z) is
sent back through the transposed layer, R_in = Σ_k c_k · a_k ⊙ layerᵀ(s; W_k). Weight modifiers are applied once,
at compile time, so the explainer holds W⁺, W⁻, … as constants.
"""
from __future__ import annotations

import inspect as _inspect
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from . import ops
from .errors import PresetError, UnsupportedOpError
from .trace import describe_node

AFFINE = (ops.CONV, ops.LINEAR)


@dataclass
class RuleSpec:
    name: str
    fn: Callable
    kinds: tuple
    defaults: dict
    doc: str


RULES: dict[str, RuleSpec] = {}


def rule(name: str, kinds: tuple):
    """Register `fn(ctx, **params)` as rule `name` for the given op kinds; its keyword defaults are its params."""

    def deco(fn):
        params = {k: p.default for k, p in list(_inspect.signature(fn).parameters.items())[1:]}
        RULES[name] = RuleSpec(name, fn, tuple(kinds), params, (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return deco


def get_rule(name: str, where: str) -> RuleSpec:
    if name not in RULES:
        raise PresetError(f"{where}: unknown rule {name!r}; known rules: {', '.join(sorted(RULES))}")
    return RULES[name]


# the values the rules' string parameters accept; checked when a preset is read, so a typo names its key
PARAM_CHOICES = {
    "stabilizer": ("add", "signed"),
    "bias": ("keep", "zero", "positive", "negative"),
    "input": ("activation", "ones"),
    "dead_units": ("drop", "spread"),
}
NONNEGATIVE_PARAMS = ("epsilon", "gamma", "alpha", "beta")


def check_params(spec: RuleSpec, params: dict, where: str) -> None:
    """Validate a preset's parameters for rule `spec`; a PresetError names the offending key `where.param`."""
    for k, v in params.items():
        if k not in spec.defaults:
            raise PresetError(f"{where}.{k}: unknown parameter of rule {spec.name!r} "
                              f"(it takes: {', '.join(spec.defaults) or 'none'})")
        default = spec.defaults[k]
        if k in PARAM_CHOICES:
            if v not in PARAM_CHOICES[k]:
                raise PresetError(f"{where}.{k}: must be one of {', '.join(map(repr, PARAM_CHOICES[k]))}, got {v!r}")
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise PresetError(f"{where}.{k}: must be a number, got {v!r}")
            if k in NONNEGATIVE_PARAMS and v < 0:
                raise PresetError(f"{where}.{k}: must be >= 0, got {v!r}")
        elif default is None:  # zbox bounds: a number or one number per channel
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) or (
                isinstance(v, list) and v and all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in v))
            if not ok:
                raise PresetError(f"{where}.{k}: must be a number or a list of numbers (one per channel), got {v!r}")
    if spec.name == "alpha_beta":
        alpha = params.get("alpha", spec.defaults["alpha"])
        beta = params.get("beta", spec.defaults["beta"])
        if abs(alpha - beta - 1) > 1e-9:
            raise PresetError(f"{where}: alpha_beta needs alpha - beta = 1 (got alpha={alpha}, beta={beta})")


# ------------------------------------------------------------------------------------------ modifiers
def stabilize(ctx, z, epsilon: float, stabilizer: str):
    """'add': z + ε (the released otsuki2024 code); 'signed': z + ε·sign(z) with sign(0) = +1 (Zennit)."""
    if epsilon == 0:
        return z
    if stabilizer == "add":
        return ctx.call(torch.add, z, epsilon)
    if stabilizer == "signed":
        return ctx.call(torch.where, ctx.call(torch.ge, z, 0.0), ctx.call(torch.add, z, epsilon),
                        ctx.call(torch.sub, z, epsilon))
    raise PresetError(f"stabilizer must be 'add' or 'signed', got {stabilizer!r}")


def positive(w):
    return w.clamp(min=0)


def negative(w):
    return w.clamp(max=0)


def bias_mode(b, mode: str, weight_part: str = "all"):
    """The bias that goes with a weight modifier: 'keep', 'zero', or 'positive'/'negative' parts."""
    if b is None or mode == "zero":
        return None
    if mode == "keep":
        return b
    if mode in ("positive", "negative"):
        return positive(b) if mode == "positive" else negative(b)
    raise PresetError(f"bias must be 'keep', 'zero', 'positive' or 'negative', got {mode!r}")


@dataclass
class Term:
    """One summand of an affine rule: input a_k (a graph node or 'ones'), weight W_k, bias b_k, coefficient c_k."""

    input: object
    weight: torch.Tensor
    bias: torch.Tensor | None
    coefficient: float = 1.0


def affine_rule(ctx, groups: list[list[Term]], epsilon: float, stabilizer: str, masks=None):
    """R_in = Σ_groups Σ_terms c_k a_k ⊙ layerᵀ(mask_g ⊙ R / stab(Σ_terms layer(a_k; W_k, b_k)); W_k)."""
    total = None
    for gi, terms in enumerate(groups):
        z = None
        for t in terms:
            zk = ctx.affine(t.input, t.weight, t.bias)
            z = zk if z is None else ctx.call(torch.add, z, zk)
        s = ctx.call(torch.div, ctx.R, stabilize(ctx, z, epsilon, stabilizer))
        if masks is not None:
            s = ctx.call(torch.mul, s, masks[gi])
        for t in terms:
            back = ctx.affine_transpose(s, t.weight)
            if not (isinstance(t.input, str) and t.input == "ones"):
                back = ctx.call(torch.mul, t.input, back)
            if t.coefficient != 1.0:
                back = ctx.call(torch.mul, back, t.coefficient)
            total = back if total is None else ctx.call(torch.add, total, back)
    return [total]


def _input(ctx, input: str):
    if input == "ones":
        return "ones"
    if input == "activation":
        return ctx.a
    raise PresetError(f"input must be 'activation' or 'ones', got {input!r}")


def _signed_parts(ctx, a, weight, bias, bias_pos: str, bias_neg: str):
    """z⁺-style terms: (a⁺, W⁺) and (a⁻, W⁻); the a⁻ term is dropped where the input is known non-negative."""
    if isinstance(a, str) or ctx.nonnegative:
        return [Term(a, positive(weight), bias_mode(ctx.bias, bias_pos))]
    a_pos = ctx.call(torch.clamp, a, min=0)
    a_neg = ctx.call(torch.clamp, a, max=0)
    return [Term(a_pos, positive(weight), bias_mode(ctx.bias, bias_pos)),
            Term(a_neg, negative(weight), bias_mode(ctx.bias, bias_neg))]


# ------------------------------------------------------------------------------------------ affine rules
@rule("epsilon", AFFINE)
def epsilon_rule(ctx, epsilon=1e-6, stabilizer="signed", bias="keep", input="activation"):
    """ε-rule: z = layer(a; W, b), R_in = a ⊙ layerᵀ(R / (z + ε·sign z)); reuses the forward output."""
    a = _input(ctx, input)
    if a is ctx.a and bias == "keep" and ctx.forward_output is not None:
        s = ctx.call(torch.div, ctx.R, stabilize(ctx, ctx.forward_output, epsilon, stabilizer))
        return [ctx.call(torch.mul, a, ctx.affine_transpose(s, ctx.weight))]
    return affine_rule(ctx, [[Term(a, ctx.weight, bias_mode(ctx.bias, bias))]], epsilon, stabilizer)


@rule("zero", AFFINE)
def zero_rule(ctx, bias="keep", input="activation"):
    """LRP-0: the ε-rule with ε = 0 (unstable where z = 0; for comparisons only)."""
    return epsilon_rule(ctx, epsilon=0.0, bias=bias, input=input)


@rule("zplus", AFFINE)
def zplus_rule(ctx, epsilon=1e-6, stabilizer="signed", bias="positive", input="activation", dead_units="drop"):
    """z⁺: positive weights on positive inputs (and negative on negative); bias 'positive', 'keep' or 'zero'.
    dead_units='spread': where no input contributes positively (z⁺ ≤ ε) relevance is not dropped but spread in
    proportion to W⁺, as if the inputs were ones (uniformly where W⁺ is zero too); every other unit divides by z⁺
    itself, not z⁺ + ε. This closes z⁺'s leaks: relevance is conserved to float precision."""
    a = _input(ctx, input)
    terms = _signed_parts(ctx, a, ctx.weight, ctx.bias, bias, "zero")
    if dead_units == "drop":
        return affine_rule(ctx, [terms], epsilon, stabilizer)
    if dead_units != "spread":
        raise PresetError(f"dead_units must be 'drop' or 'spread', got {dead_units!r}")
    z = None
    for t in terms:
        zk = ctx.affine(t.input, t.weight, t.bias)
        z = zk if z is None else ctx.call(torch.add, z, zk)
    dead = ctx.call(torch.le, z, float(epsilon))
    live = ctx.call(torch.where, dead, 0.0, ctx.call(torch.div, ctx.R, ctx.call(torch.where, dead, 1.0, z)))
    total = None
    for t in terms:
        back = ctx.affine_transpose(live, t.weight)
        if not isinstance(t.input, str):
            back = ctx.call(torch.mul, t.input, back)
        total = back if total is None else ctx.call(torch.add, total, back)
    w_pos = positive(ctx.weight)
    with torch.no_grad():
        z_ones = ctx.affine_value("ones", w_pos, None)
    inverse = torch.where(z_ones > 0, 1.0 / z_ones.clamp_min(1e-30), torch.zeros_like(z_ones))
    spread = ctx.call(torch.where, dead, ctx.call(torch.mul, ctx.R, inverse), 0.0)
    total = ctx.call(torch.add, total, ctx.affine_transpose(spread, w_pos))
    if bool((z_ones <= 0).any()):
        # units whose receptive field holds no positive weight at all (e.g. a border position of a first-layer
        # filter whose positive taps all fall on the padding): spread uniformly over the receptive field (flat)
        ones_w = torch.ones_like(ctx.weight)
        with torch.no_grad():
            count = ctx.affine_value("ones", ones_w, None)
        flat_inverse = torch.where((z_ones <= 0) & (count > 0), 1.0 / count.clamp_min(1e-30), torch.zeros_like(count))
        flat = ctx.call(torch.where, dead, ctx.call(torch.mul, ctx.R, flat_inverse), 0.0)
        total = ctx.call(torch.add, total, ctx.affine_transpose(flat, ones_w))
    return [total]


@rule("alpha_beta", AFFINE)
def alpha_beta_rule(ctx, alpha=2.0, beta=1.0, epsilon=1e-6, stabilizer="signed"):
    """αβ: α·(positive contributions) − β·(negative contributions), each normalised on its own; α − β = 1."""
    if alpha < 0 or beta < 0 or abs(alpha - beta - 1) > 1e-9:
        raise PresetError(f"alpha_beta needs alpha, beta >= 0 and alpha - beta = 1 (got {alpha}, {beta})")
    a = ctx.a
    if ctx.nonnegative:
        pos = [Term(a, positive(ctx.weight), bias_mode(ctx.bias, "positive"), alpha)]
        neg = [Term(a, negative(ctx.weight), bias_mode(ctx.bias, "negative"), -beta)]
    else:
        a_pos, a_neg = ctx.call(torch.clamp, a, min=0), ctx.call(torch.clamp, a, max=0)
        pos = [Term(a_pos, positive(ctx.weight), bias_mode(ctx.bias, "positive"), alpha),
               Term(a_neg, negative(ctx.weight), None, alpha)]
        neg = [Term(a_pos, negative(ctx.weight), bias_mode(ctx.bias, "negative"), -beta),
               Term(a_neg, positive(ctx.weight), None, -beta)]
    groups = [pos] + ([neg] if beta else [])
    return affine_rule(ctx, groups, epsilon, stabilizer)


@rule("gamma", AFFINE)
def gamma_rule(ctx, gamma=0.25, epsilon=1e-6, stabilizer="signed"):
    """γ: W + γW⁺ where the output is positive, W + γW⁻ where it is negative (generalised to signed inputs)."""
    w, b, a = ctx.weight, ctx.bias, ctx.a
    up = lambda t: t + gamma * positive(t)  # noqa: E731
    down = lambda t: t + gamma * negative(t)  # noqa: E731
    z = ctx.forward_output if ctx.forward_output is not None else ctx.affine(a, w, b)
    pos_mask = ctx.call(torch.gt, z, 0.0)
    neg_mask = ctx.call(torch.lt, z, 0.0)
    b_up = None if b is None else up(b)
    b_down = None if b is None else down(b)
    if ctx.nonnegative:
        groups = [[Term(a, up(w), b_up)], [Term(a, down(w), b_down)]]
    else:
        a_pos, a_neg = ctx.call(torch.clamp, a, min=0), ctx.call(torch.clamp, a, max=0)
        groups = [[Term(a_pos, up(w), b_up), Term(a_neg, down(w), None)],
                  [Term(a_pos, down(w), b_down), Term(a_neg, up(w), None)]]
    masks = [ctx.call(torch.Tensor.to, pos_mask, torch.float32), ctx.call(torch.Tensor.to, neg_mask, torch.float32)]
    return affine_rule(ctx, groups, epsilon, stabilizer, masks)


@rule("flat", AFFINE)
def flat_rule(ctx, epsilon=1e-6, stabilizer="signed"):
    """flat: inputs and weights set to one, no bias — relevance spread uniformly over each receptive field."""
    return affine_rule(ctx, [[Term("ones", torch.ones_like(ctx.weight), None)]], epsilon, stabilizer)


@rule("wsquare", AFFINE)
def wsquare_rule(ctx, epsilon=1e-6, stabilizer="signed", bias="keep"):
    """w²: inputs set to one, weights squared (and bias squared unless 'zero')."""
    b = None if ctx.bias is None or bias == "zero" else ctx.bias ** 2
    return affine_rule(ctx, [[Term("ones", ctx.weight ** 2, b)]], epsilon, stabilizer)


@rule("zbox", AFFINE)
def zbox_rule(ctx, low=None, high=None, epsilon=1e-6, stabilizer="signed"):
    """zB: for inputs bounded by [low, high] (per channel); defaults: the normalised range of [0, 1] pixels."""
    low = ctx.box_bound(low, "low")
    high = ctx.box_bound(high, "high")
    w, b = ctx.weight, ctx.bias
    terms = [Term(ctx.a, w, b), Term(ctx.const_input(low), positive(w), bias_mode(b, "positive"), -1.0),
             Term(ctx.const_input(high), negative(w), bias_mode(b, "negative"), -1.0)]
    z = None
    for t in terms:
        zk = ctx.affine(t.input, t.weight, t.bias)
        z = zk if z is None else ctx.call(torch.sub, z, zk)
    s = ctx.call(torch.div, ctx.R, stabilize(ctx, z, epsilon, stabilizer))
    out = None
    for t in terms:
        back = ctx.call(torch.mul, t.input, ctx.affine_transpose(s, t.weight))
        out = back if out is None else ctx.call(torch.sub, out, back)
    return [out]


# ------------------------------------------------------------------------------------------ pass-through
@rule("pass", (ops.CONV, ops.LINEAR, ops.BATCHNORM, ops.ACTIVATION, ops.IDENTITY, ops.BIAS_ADD, ops.SCALE, ops.GATE,
               ops.MAXPOOL, ops.AVGPOOL, ops.NORM))
def pass_rule(ctx):
    """pass-through: R_in = R (elementwise layers; x + constant; the un-gated operand of a gate)."""
    if ctx.op.kind in (ops.MAXPOOL, ops.AVGPOOL, ops.CONV, ops.LINEAR) and ctx.op.in_shape != ctx.op.out_shape:
        raise UnsupportedOpError(f"{describe_node(ctx.op.node)}: 'pass' needs equal input and output shapes")
    return [ctx.R]


# ------------------------------------------------------------------------------------------ pooling
@rule("winner_take_all", (ops.MAXPOOL,))
def winner_take_all_rule(ctx):
    """Max-pool: all of a window's relevance goes to its maximum (ties: the first), summed where windows overlap."""
    p = ctx.op.params
    _, idx = ctx.call_multi(F.max_pool2d, 2, ctx.a, p["kernel"], p["stride"], p["padding"], p["dilation"],
                            p["ceil_mode"], True)
    n_in, n_out = ctx.op.in_shape, ctx.op.out_shape
    # reshapes to constant sizes (not flatten): the exported graph keeps its symbolic batch size
    flat_r = ctx.call(torch.reshape, ctx.R, (-1, n_out[1], n_out[2] * n_out[3]))
    flat_idx = ctx.call(torch.reshape, idx, (-1, n_out[1], n_out[2] * n_out[3]))
    zeros = ctx.call(torch.zeros_like, ctx.call(torch.reshape, ctx.a, (-1, n_in[1], n_in[2] * n_in[3])))
    out = ctx.call(torch.scatter_add, zeros, 2, flat_idx, flat_r)
    return [ctx.call(torch.reshape, out, (-1, *n_in[1:]))]


def _pool_z_rule(ctx, kernel, stride, padding, ceil_mode, epsilon, stabilizer):
    z = ctx.call(F.avg_pool2d, ctx.a, kernel, stride, padding, ceil_mode, True)
    s = ctx.call(torch.div, ctx.R, stabilize(ctx, z, epsilon, stabilizer))
    return [ctx.call(torch.mul, ctx.a, ctx.avgpool_transpose(s, kernel, stride, padding, ceil_mode))]


@rule("window_average", (ops.MAXPOOL,))
def window_average_rule(ctx, epsilon=1e-6, stabilizer="signed"):
    """Max-pool treated as an average pool over its real windows (z-rule): relevance ∝ activation in the window."""
    p = ctx.op.params
    if p["dilation"] != (1, 1):
        raise UnsupportedOpError(f"{describe_node(ctx.op.node)}: window_average with dilation")
    return _pool_z_rule(ctx, p["kernel"], p["stride"], p["padding"], p["ceil_mode"], epsilon, stabilizer)


@rule("avg2x2", (ops.MAXPOOL,))
def avg2x2_rule(ctx, epsilon=1e-5, stabilizer="add"):
    """What the released otsuki2024 code does at ResNet's max-pool: a 2×2/stride-2 average pool (z-rule) stands in
    for the real 3×3 windows. Kept for fidelity to the paper's numbers; it does not conserve relevance."""
    in_hw, out_hw = ctx.op.in_shape[-2:], ctx.op.out_shape[-2:]
    if tuple(s // 2 for s in in_hw) != tuple(out_hw):
        raise UnsupportedOpError(f"{describe_node(ctx.op.node)}: the 2x2 stand-in needs the output to be half the "
                                 f"input ({in_hw} -> {out_hw}); use winner_take_all")
    return _pool_z_rule(ctx, (2, 2), (2, 2), (0, 0), False, epsilon, stabilizer)


@rule("z", (ops.AVGPOOL, ops.REDUCE))
def z_pool_rule(ctx, epsilon=1e-6, stabilizer="signed", dead_units="drop"):
    """z-rule for average pooling and means over any dims: R_in = a ⊙ poolᵀ(R / stab(pool(a))); reuses the
    forward output. dead_units='spread': a window whose average is ~0 (|z| ≤ ε) spreads its relevance evenly over
    its inputs instead of dropping it, and every other window divides by z itself: relevance is conserved."""
    p = ctx.op.params
    if ctx.op.kind == ops.REDUCE:
        return _mean_z_rule(ctx, epsilon, stabilizer, dead_units)
    geometry = (p["kernel"], p["stride"], p["padding"], p["ceil_mode"], p["count_include_pad"])
    z = ctx.forward_output
    if dead_units == "drop":
        s = ctx.call(torch.div, ctx.R, stabilize(ctx, z, epsilon, stabilizer))
        return [ctx.call(torch.mul, ctx.a, ctx.avgpool_transpose(s, *geometry))]
    if dead_units != "spread":
        raise PresetError(f"dead_units must be 'drop' or 'spread', got {dead_units!r}")
    dead = ctx.call(torch.le, ctx.call(torch.abs, z), float(epsilon))
    s = ctx.call(torch.where, dead, 0.0, ctx.call(torch.div, ctx.R, ctx.call(torch.where, dead, 1.0, z)))
    live = ctx.call(torch.mul, ctx.a, ctx.avgpool_transpose(s, *geometry))
    # poolᵀ gives each input Σ_w s_w / d_w (d_w: PyTorch's divisor); R_w · d_w / n_w (n_w: the window's inputs)
    # spreads R_w evenly: d_w / n_w = 1 / avg_pool(ones)
    flat = ctx.call(torch.where, dead, ctx.R, 0.0)
    h, w = ctx.op.in_shape[-2:]
    ones_avg = F.avg_pool2d(torch.ones(1, 1, h, w), *geometry)
    if not torch.allclose(ones_avg, torch.ones_like(ones_avg)):
        flat = ctx.call(torch.mul, flat, 1.0 / ones_avg)
    return [ctx.call(torch.add, live, ctx.avgpool_transpose(flat, *geometry))]


def _mean_z_rule(ctx, epsilon, stabilizer, dead_units):
    p = ctx.op.params
    z = ctx.forward_output
    R = ctx.R
    if not p["keepdim"]:
        z = ctx.call(torch.reshape, z, (-1, *p["kept_shape"][1:]))
        R = ctx.call(torch.reshape, R, (-1, *p["kept_shape"][1:]))
    if dead_units == "drop":
        s = ctx.call(torch.div, R, stabilize(ctx, z, epsilon, stabilizer))
        return [ctx.call(torch.mul, ctx.a, ctx.call(torch.mul, s, 1.0 / p["count"]))]
    if dead_units != "spread":
        raise PresetError(f"dead_units must be 'drop' or 'spread', got {dead_units!r}")
    dead = ctx.call(torch.le, ctx.call(torch.abs, z), float(epsilon))
    s = ctx.call(torch.where, dead, 0.0, ctx.call(torch.div, R, ctx.call(torch.where, dead, 1.0, z)))
    live = ctx.call(torch.mul, ctx.a, ctx.call(torch.mul, s, 1.0 / p["count"]))
    flat = ctx.call(torch.mul, ctx.call(torch.where, dead, R, 0.0), 1.0 / p["count"])
    return [ctx.call(torch.add, live, flat)]


# ------------------------------------------------------------------------------------------ merges
SPLITS = ("ratio", "symmetric", "signed")
_TINY = 1e-30  # ratio split: keeps 0/0 an even split; a normal float32 (smallest normal ≈ 1.2e-38)


@rule("split", (ops.MERGE,))
def split_rule(ctx, epsilon=1e-6, stabilizer="signed"):
    """Relevance splitting at a residual add h = h_s + h_m (Otsuki et al. 2024): ratio, symmetric or signed.

    Returns [R for operand 0, R for operand 1]. With include_identity false an identity skip gets nothing.
    """
    merge, split = ctx.merge, ctx.split
    a, b = ctx.fwd(ctx.op.inputs[0]), ctx.fwd(ctx.op.inputs[1])
    alpha = ctx.op.params.get("alpha", 1)
    if alpha != 1:
        b = ctx.call(torch.mul, b, alpha)
    h = [a, b]
    skip_i = merge.skip_operand if merge is not None else 1
    h_s, h_m = h[skip_i], h[1 - skip_i]
    R = ctx.R
    if merge is not None and merge.skip_kind == "identity" and not ctx.include_identity:
        r_m, r_s = R, None
    elif split == "symmetric":
        if merge is not None and merge.skip_support is not None:  # structural zeros of the skip get nothing
            r_s = ctx.call(torch.mul, R, 0.5 * merge.skip_support)
            r_m = ctx.call(torch.sub, R, r_s)
        else:
            r_m = ctx.call(torch.mul, R, 0.5)
            r_s = ctx.call(torch.sub, R, r_m)
    elif split == "ratio":
        # share = (|h_m| + δ) / (|h_m| + |h_s| + 2δ) with δ = 1e-30: equal to |h_m| / (|h_m| + |h_s|) in float32
        # wherever either is above ~1e-23, and an even split where both are 0 — without a where() pass
        num = ctx.call(torch.add, ctx.call(torch.abs, h_m), _TINY)
        den = ctx.call(torch.add, num, ctx.call(torch.add, ctx.call(torch.abs, h_s), _TINY))
        r_m = ctx.call(torch.mul, R, ctx.call(torch.div, num, den))
        r_s = ctx.call(torch.sub, R, r_m)
    elif split == "signed":
        s = ctx.call(torch.div, R, stabilize(ctx, ctx.forward_output, epsilon, stabilizer))
        r_m, r_s = ctx.call(torch.mul, h_m, s), ctx.call(torch.mul, h_s, s)
    else:
        raise PresetError(f"split must be one of {SPLITS}, got {split!r}")
    ctx.tap("merge:" + ctx.op.node.name + ".R", R)
    ctx.tap("merge:" + ctx.op.node.name + ".R_skip", r_s)
    ctx.tap("merge:" + ctx.op.node.name + ".R_main", r_m)
    out = [None, None]
    out[skip_i], out[1 - skip_i] = r_s, r_m
    return out


# ------------------------------------------------------------------------------------------ structure (fixed)
def structural_relevance(ctx) -> list:
    """Ops that only move values around pass relevance back along the same moves: exact and conserving."""
    kind, p = ctx.op.kind, ctx.op.params
    if kind == ops.RESHAPE:
        return [ctx.call(torch.reshape, ctx.R, (-1, *ctx.op.in_shape[1:]))]
    if kind == ops.PAD:
        return [ctx.unpad(ctx.R, p["pad"])]
    if kind == ops.SLICE:
        return [ctx.unslice(ctx.R, p["index"])]
    if kind == ops.CAT:
        parts = ctx.call_multi(torch.split, len(p["sizes"]), ctx.R, p["sizes"], p["dim"])
        return list(parts)
    if kind == ops.SPLIT:
        return [ctx.R]
    if kind == ops.ITEM:  # one part of unbind / split / chunk: back in its place, zeros elsewhere
        if p["sizes"] is None:
            zeros = ctx.call(torch.zeros_like, ctx.R)
            count = len(ctx.op.inputs[0].meta["value"])
            return [ctx.call(torch.stack, [ctx.R if i == p["index"] else zeros for i in range(count)], p["dim"])]
        before, after = sum(p["sizes"][:p["index"]]), sum(p["sizes"][p["index"] + 1:])
        pad = [0, 0] * (len(ctx.op.out_shape) - 1 - p["dim"]) + [before, after]
        return [ctx.call(F.pad, ctx.R, tuple(pad))]
    if kind == ops.ROLL:
        return [ctx.call(torch.roll, ctx.R, tuple(-k for k in p["shifts"]), p["dims"])]
    if kind == ops.PERMUTE:
        inverse = sorted(range(len(p["order"])), key=lambda i: p["order"][i])
        return [ctx.call(torch.permute, ctx.R, tuple(inverse))]
    raise AssertionError(kind)


STRUCTURAL = (ops.RESHAPE, ops.PAD, ops.SLICE, ops.CAT, ops.PERMUTE, ops.SPLIT, ops.ITEM, ops.ROLL)


# ------------------------------------------------------------------------------------------ transformers
@rule("linearized", (ops.NORM,))
def linearized_norm_rule(ctx, epsilon=1e-6, stabilizer="signed", bias="keep"):
    """LayerNorm with the normaliser 1/σ held constant (AttnLRP's identity rule on it): what remains, the centring
    x − mean(x) and the affine part, is a linear layer y = W x + b, and it gets the ε-rule. bias='zero' leaves the
    bias out of z, so the layer conserves relevance."""
    p = ctx.op.params
    x = ctx.a
    dims = tuple(range(-p["dims"], 0))
    z = ctx.forward_output
    if bias == "zero" and p["bias"] is not None:
        z = ctx.call(torch.sub, z, p["bias"])
    elif bias not in ("keep", "zero"):
        raise PresetError(f"bias must be 'keep' or 'zero' for layer norms, got {bias!r}")
    s = ctx.call(torch.div, ctx.R, stabilize(ctx, z, epsilon, stabilizer))
    centred = ctx.call(torch.sub, x, ctx.call(torch.mean, x, dims, True))
    variance = ctx.call(torch.mean, ctx.call(torch.mul, centred, centred), dims, True)
    g = ctx.call(torch.mul, s, ctx.call(torch.rsqrt, ctx.call(torch.add, variance, p["eps"])))
    if p["weight"] is not None:
        g = ctx.call(torch.mul, g, p["weight"])
    # Wᵀ g for W = diag(w/σ)(I − 11ᵀ/n): the centring's transpose subtracts the mean again
    return [ctx.call(torch.mul, x, ctx.call(torch.sub, g, ctx.call(torch.mean, g, dims, True)))]


@rule("taylor", (ops.SOFTMAX,))
def softmax_taylor_rule(ctx):
    """AttnLRP's softmax rule (Achtibat et al. 2024, Prop. 3.1): R_in = x ⊙ (R − s ⊙ ΣR) along the softmax dim.
    Not conservative by construction (the share of the bias term is dropped). Masked scores (−inf) get nothing."""
    x = ctx.a
    if ctx.op.params.get("masked"):
        x = ctx.call(torch.where, ctx.call(torch.isinf, x), 0.0, x)
    total = ctx.call(torch.sum, ctx.R, ctx.op.params["dim"], True)
    return [ctx.call(torch.mul, x, ctx.call(torch.sub, ctx.R, ctx.call(torch.mul, ctx.forward_output, total)))]


@rule("constant", (ops.SOFTMAX,))
def softmax_constant_rule(ctx):
    """CP-LRP (Ali et al. 2022): the attention weights are held constant, so no relevance flows into the scores."""
    return [None]


def _product_transpose(ctx, s, which: int):
    """∂/∂operand of Σ s ⊙ (a ∘ b): the other operand contracted with s, shaped like operand `which`."""
    p = ctx.op.params
    a, b = (ctx.fwd(t) for t in ctx.op.inputs)
    ins, out = p["inputs"], p["output"]
    if which == 0:
        return ctx.call(torch.einsum, f"{out},{ins[1]}->{ins[0]}", s, b)
    return ctx.call(torch.einsum, f"{ins[0]},{out}->{ins[1]}", a, s)


@rule("uniform", (ops.MATMUL,))
def uniform_rule(ctx, epsilon=1e-8, stabilizer="signed"):
    """AttnLRP's rule for a product of two signals (Prop. 3.3, Q·Kᵀ and A·V): the ε-rule on the bilinear map with
    half of the relevance to each factor, R_a = a ⊙ ∂_a⟨s, a∘b⟩, R_b likewise, s = R / stab(2·a∘b)."""
    s = ctx.call(torch.div, ctx.R, stabilize(ctx, ctx.call(torch.mul, ctx.forward_output, 2.0), epsilon, stabilizer))
    return [ctx.call(torch.mul, ctx.fwd(t), _product_transpose(ctx, s, i)) for i, t in enumerate(ctx.op.inputs)]


@rule("constant_weights", (ops.MATMUL,))
def constant_weights_rule(ctx, epsilon=1e-6, stabilizer="signed"):
    """CP-LRP's A·V: the attention weights A (a softmax output) are held constant, so the product is a linear map
    of the values and all relevance goes to them by the ε-rule. A product with no softmax operand is an error."""
    held = ctx.op.params.get("attention_weights")
    if held is None:
        raise UnsupportedOpError(f"{describe_node(ctx.op.node)}: 'constant_weights' needs one operand to be "
                                 "attention weights (a softmax output); neither is")
    s = ctx.call(torch.div, ctx.R, stabilize(ctx, ctx.forward_output, epsilon, stabilizer))
    out = [None, None]
    other = 1 - held
    out[other] = ctx.call(torch.mul, ctx.fwd(ctx.op.inputs[other]), _product_transpose(ctx, s, other))
    return out


@rule("proportional", (ops.BIAS_ADD,))
def proportional_rule(ctx, epsilon=1e-6, stabilizer="signed"):
    """x + c (position embedding): the ε-rule on the sum, x keeps its share x / (x + c) and the constant's share is
    dropped, as Gradient×Input does. ('pass' gives x everything.)"""
    if ctx.op.in_shape != ctx.op.out_shape:
        raise UnsupportedOpError(f"{describe_node(ctx.op.node)}: 'proportional' where the constant broadcasts x")
    s = ctx.call(torch.div, ctx.R, stabilize(ctx, ctx.forward_output, epsilon, stabilizer))
    return [ctx.call(torch.mul, ctx.a, s)]


def _cat_parts(ctx):
    p = ctx.op.params
    return list(ctx.call_multi(torch.split, len(p["sizes"]), ctx.R, p["sizes"], p["dim"]))


@rule("drop", (ops.CONST_CAT,))
def constant_cat_drop_rule(ctx):
    """cat of constants (a class token) and input-dependent tensors: each part gets its slice of the relevance
    back; the constants' slices are dropped, as Gradient×Input does."""
    return [r if dynamic else None for r, dynamic in zip(_cat_parts(ctx), ctx.op.params["dynamic"])]


@rule("spread", (ops.CONST_CAT,))
def constant_cat_spread_rule(ctx):
    """cat of constants (a class token) and input-dependent tensors: the constants' relevance is spread over the
    input-dependent parts in proportion to |x|, per sample, so the cat conserves relevance."""
    parts, dynamic = _cat_parts(ctx), ctx.op.params["dynamic"]
    dims = tuple(range(1, len(ctx.op.out_shape)))
    constant = None
    for r, dyn in zip(parts, dynamic):
        if not dyn:
            total = ctx.call(torch.sum, r, dims, True)
            constant = total if constant is None else ctx.call(torch.add, constant, total)
    sizes = [ctx.call(torch.abs, ctx.fwd(t)) if dyn else None for t, dyn in zip(ctx.op.inputs, dynamic)]
    norm = None
    for a in sizes:
        if a is not None:
            total = ctx.call(torch.sum, a, dims, True)
            norm = total if norm is None else ctx.call(torch.add, norm, total)
    share = ctx.call(torch.div, constant, ctx.call(torch.add, norm, _TINY))
    return [ctx.call(torch.add, r, ctx.call(torch.mul, a, share)) if dyn else None
            for r, a, dyn in zip(parts, sizes, dynamic)]
