"""Rules for conv and linear layers (Zennit's rule pattern: input, weight and bias modifiers)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from ..derived import derive
from ..errors import PresetError, UnsupportedOpError
from ..graph import describe_node
from .base import AFFINE, TINY, Term, affine_rule, bias_mode, broadcast_compact, negative, positive, rule, stabilize, input_of, signed_parts  # noqa: F401


# ------------------------------------------------------------------------------------------ affine rules
@rule("epsilon", AFFINE)
def epsilon_rule(ctx, epsilon=1e-6, stabilizer="signed", bias="keep", input="activation", cancelled=0.0):
    """ε-rule: z = layer(a; W, b), R_in = a ⊙ layerᵀ(R / (z + ε·sign z)); reuses the forward output.
    cancelled > 0: a unit whose contributions cancel, |z| ≤ cancelled · Σ_i |a_i w_ij| (+ |b_j|), hands its
    relevance on in proportion to |a_i w_ij| instead of dividing by a z that is float32 rounding noise: a tiny ε
    keeps the rule conserving, but R·a_i w_ij / z at such a unit is ±10⁵·R and its rounding leaks ~1% of the
    total (volo's first convolution on a random input). Costs one more layer pass and one transposed pass.
    bias='spread': z keeps the bias, and the bias's share of the relevance, R·b/z, goes to the inputs in proportion
    to |a_i w_ij|: conserving like bias='zero', but dividing by the unit's real z, which is not ~0 where
    relevance arrives through a ReLU (bias='zero' divides by the bias-free z, ~0 wherever the bias, a folded
    batch-norm shift, makes up the unit's input: relevance then grows without bound)."""
    a = input_of(ctx, input)
    if bias == "spread" or cancelled > 0:
        b = ctx.bias if bias == "spread" else bias_mode(ctx.bias, bias)
        return _epsilon_by_magnitude(ctx, a, b, epsilon, stabilizer, cancelled, spread_bias=bias == "spread")
    if a is ctx.a and bias == "keep" and ctx.forward_output is not None:
        s = ctx.call(torch.div, ctx.R, stabilize(ctx, ctx.forward_output, epsilon, stabilizer))
        return [ctx.call(torch.mul, a, ctx.affine_transpose(s, ctx.weight))]
    return affine_rule(ctx, [[Term(a, ctx.weight, bias_mode(ctx.bias, bias))]], epsilon, stabilizer)


def _epsilon_by_magnitude(ctx, a, b, epsilon: float, stabilizer: str, cancelled: float, spread_bias: bool):
    """The ε-rule (z with bias b) where part of the relevance goes to the inputs in proportion to |a_i w_ij|
    instead of a_i w_ij / z (see epsilon_rule): with `spread_bias`, the bias's share R·b/z; with cancelled > 0, all
    the relevance of a unit whose contributions cancel, |z| ≤ cancelled · (Σ_i |a_i w_ij| + |b_j|). Where the rule
    conserves (the bias's share spread, or the bias left out), a unit none of whose inputs contributes
    (Σ_i |a_i w_ij| = 0: every input in its field is 0, so its output is its bias alone) still hands its
    relevance on, to its field by |w_ij| alone (`_spread_by_weights`): dividing by |a w| would lose it."""
    # z with the layer's own bias is its forward output: reused, not computed again
    reuse = a is ctx.a and b is ctx.bias and ctx.forward_output is not None
    z = ctx.forward_output if reuse else ctx.affine(a, ctx.weight, b)
    # |a|: "ones" and a constant support mask are their own magnitude (non-negative); a graph value gets an Abs
    a_abs = a if isinstance(a, (str, torch.Tensor)) else ctx.call(torch.abs, a)
    w_abs = derive(torch.abs, ctx.weight)
    s = ctx.call(torch.div, ctx.R, stabilize(ctx, z, epsilon, stabilizer))
    share = None
    if spread_bias:  # all of the bias's share goes to the inputs: divided by their part of the magnitude alone
        magnitude = bound = ctx.affine(a_abs, w_abs, None)
        if b is not None:
            unit_bias = _per_unit(ctx, b)
            share = ctx.call(torch.mul, s, unit_bias)
            bound = ctx.call(torch.add, magnitude, unit_bias.abs())
    else:  # a kept bias takes its |b| part of a cancelled unit's relevance
        magnitude = bound = ctx.affine(a_abs, w_abs, None if b is None else derive(torch.abs, b))
    if cancelled > 0:
        dead = ctx.call(torch.le, ctx.call(torch.abs, z), ctx.call(torch.mul, bound, float(cancelled)))
        s = ctx.call(torch.where, dead, 0.0, s)
        share = ctx.call(torch.where, dead, ctx.R, 0.0 if share is None else share)
    empty = None
    if (spread_bias or b is None) and share is not None and not isinstance(a, str):
        empty = ctx.call(torch.eq, magnitude, 0.0)
        share = ctx.call(torch.where, empty, 0.0, share)
    back = ctx.affine_transpose(s, ctx.weight)
    if not isinstance(a, str):
        back = ctx.call(torch.mul, a, back)
    if share is None:
        return [back]
    back_abs = ctx.affine_transpose(ctx.call(torch.div, share, ctx.call(torch.clamp, magnitude, min=TINY)), w_abs)
    if not isinstance(a, str):
        back_abs = ctx.call(torch.mul, a_abs, back_abs)
    total = ctx.call(torch.add, back, back_abs)
    if empty is not None:
        total = ctx.call(torch.add, total, _spread_by_weights(ctx, empty, w_abs))
    return [total]


def _per_unit(ctx, b: torch.Tensor) -> torch.Tensor:
    """A layer's bias shaped to broadcast over its output (features last for linear, channels first for conv)."""
    if ctx.op.kind == ops.LINEAR:
        return b.detach()
    return b.detach().reshape(1, -1, *[1] * (len(ctx.op.out_shape) - 2))


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
    a = input_of(ctx, input)
    terms = signed_parts(ctx, a, ctx.weight, ctx.bias, bias, "zero")
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
    total = ctx.call(torch.add, total, _spread_by_weights(ctx, dead, positive(ctx.weight)))
    return [total]


def _spread_by_weights(ctx, units, w: torch.Tensor):
    """The relevance of `units` (a graph mask over the layer's outputs) sent back to their receptive fields in
    proportion to the weights w ≥ 0 alone, as if every input were one (uniformly where a field holds no positive
    weight); positions of explicit padding get none. Conserving for every unit whose field holds an input: where
    the rule's own proportions have nothing to divide by."""
    support = ctx.input_support()  # None, or 0 at explicit padding: spreading must not reach it
    ones = "ones" if support is None else support
    masked = (lambda n: n) if support is None else (lambda n: ctx.call(torch.mul, n, support))  # noqa: E731
    with torch.no_grad():
        z_ones = ctx.affine_value(ones, w, None)
    inverse = broadcast_compact(torch.where(z_ones > 0, 1.0 / z_ones.clamp_min(1e-30), torch.zeros_like(z_ones)))
    spread = ctx.call(torch.where, units, ctx.call(torch.mul, ctx.R, inverse), 0.0)
    total = masked(ctx.affine_transpose(spread, w))
    if bool((z_ones <= 0).any()):
        # units whose receptive field holds no positive weight at all (e.g. a border position of a first-layer
        # filter whose positive taps all fall on the padding): spread uniformly over the receptive field (flat)
        ones_w = torch.ones_like(w)
        with torch.no_grad():
            count = ctx.affine_value(ones, ones_w, None)
        flat_inverse = broadcast_compact(torch.where((z_ones <= 0) & (count > 0), 1.0 / count.clamp_min(1e-30),
                                                     torch.zeros_like(count)))
        flat = ctx.call(torch.where, units, ctx.call(torch.mul, ctx.R, flat_inverse), 0.0)
        total = ctx.call(torch.add, total, masked(ctx.affine_transpose(flat, ones_w)))
    return total


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
    up = lambda t: derive(torch.add, t, derive(torch.mul, positive(t), gamma))  # noqa: E731  t + γ t⁺
    down = lambda t: derive(torch.add, t, derive(torch.mul, negative(t), gamma))  # noqa: E731  t + γ t⁻
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


