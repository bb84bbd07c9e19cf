"""Rules of vision transformers: softmax, products of two signals, LayerNorm linearized, x + constant in
proportion, class-token concatenation.

AttnLRP (Achtibat et al., ICML 2024): the softmax Taylor rule (Prop. 3.1) and the uniform rule at Q·Kᵀ and A·V
(Prop. 3.3); LayerNorm with 1/σ held constant and the ε-rule on what is left. CP-LRP (Ali et al., ICML 2022): the
attention weights held constant (`constant` at the softmax, `constant_weights` at A·V).
"""
from __future__ import annotations

import torch

from .. import ops
from ..errors import PresetError, UnsupportedOpError
from ..graph import describe_node
from .base import rule, stabilize
from .base import TINY


@rule("linearized", (ops.NORM,))
def linearized_norm_rule(ctx, epsilon=1e-6, stabilizer="signed", bias="keep"):
    """LayerNorm with the normaliser 1/σ held constant (AttnLRP's identity rule on it): what remains, the centring
    x − mean(x) and the affine part, is a linear layer y = W x + b, and it gets the ε-rule. bias='zero' leaves the
    bias out of z, so the layer conserves relevance. A norm that only scales (RMSNorm, F.normalize, local response
    norm) is then a diagonal map y = c ⊙ x: the ε-rule gives R ⊙ y / stab(y). Instance norms have only the identity
    rule, `pass`."""
    p = ctx.op.params
    if bias not in ("keep", "zero"):
        raise PresetError(f"bias must be 'keep' or 'zero' for layer norms, got {bias!r}")
    if p.get("group_norm"):
        return _linearized_group_norm(ctx, epsilon, stabilizer, bias)
    if p.get("scaling"):
        y = ctx.forward_output
        return [ctx.call(torch.mul, ctx.R, ctx.call(torch.div, y, stabilize(ctx, y, epsilon, stabilizer)))]
    if not p.get("layer_norm"):
        raise UnsupportedOpError(f"{describe_node(ctx.op.node)}: 'linearized' is a LayerNorm / GroupNorm / RMSNorm "
                                 "rule; use 'pass' (the identity rule) for instance norms")
    x = ctx.a
    dims = tuple(range(-p["dims"], 0))
    z = ctx.forward_output
    if bias == "zero" and p["bias"] is not None:
        z = ctx.call(torch.sub, z, p["bias"])
    s = ctx.call(torch.div, ctx.R, stabilize(ctx, z, epsilon, stabilizer))
    centred = ctx.call(torch.sub, x, ctx.call(torch.mean, x, dims, True))
    variance = ctx.call(torch.mean, ctx.call(torch.mul, centred, centred), dims, True)
    g = ctx.call(torch.mul, s, ctx.call(torch.rsqrt, ctx.call(torch.add, variance, p["eps"])))
    if p["weight"] is not None:
        g = ctx.call(torch.mul, g, p["weight"])
    # Wᵀ g for W = diag(w/σ)(I − 11ᵀ/n): the centring's transpose subtracts the mean again
    return [ctx.call(torch.mul, x, ctx.call(torch.sub, g, ctx.call(torch.mean, g, dims, True)))]


def _linearized_group_norm(ctx, epsilon, stabilizer, bias):
    """GroupNorm (x: [N, C, ...], G groups) with 1/σ_g held constant: y = w_c/σ_g · (x − mean_g x) + b_c, a linear
    layer W x + b with W = diag(w/σ) (I − 11ᵀ/n) per group; the ε-rule R_in = x ⊙ Wᵀ(R / stab(z)), z = y (− b)."""
    p = ctx.op.params
    shape = tuple(ctx.op.in_shape)
    c, groups = shape[1], p["groups"]
    channel = (1, c) + (1,) * (len(shape) - 2)
    grouped = (-1, groups, int(torch.Size(shape[1:]).numel()) // groups)
    x = ctx.a
    z = ctx.forward_output
    if bias == "zero" and p["bias"] is not None:
        z = ctx.call(torch.sub, z, p["bias"].reshape(channel))
    s = ctx.call(torch.div, ctx.R, stabilize(ctx, z, epsilon, stabilizer))
    if p["weight"] is not None:
        s = ctx.call(torch.mul, s, p["weight"].reshape(channel))
    xg = ctx.call(torch.reshape, x, grouped)
    centred = ctx.call(torch.sub, xg, ctx.call(torch.mean, xg, (-1,), True))
    variance = ctx.call(torch.mean, ctx.call(torch.mul, centred, centred), (-1,), True)
    g = ctx.call(torch.mul, ctx.call(torch.reshape, s, grouped),
                 ctx.call(torch.rsqrt, ctx.call(torch.add, variance, p["eps"])))
    back = ctx.call(torch.reshape, ctx.call(torch.sub, g, ctx.call(torch.mean, g, (-1,), True)), (-1, *shape[1:]))
    return [ctx.call(torch.mul, x, back)]


@rule("taylor", (ops.SOFTMAX,))
def softmax_taylor_rule(ctx):
    """AttnLRP's softmax rule (Prop. 3.1): R_in = x ⊙ (R − s ⊙ ΣR) along the softmax dim. Not conservative by
    construction (the share of the bias term is dropped). Masked scores (−inf) get nothing."""
    x = ctx.a
    if ctx.op.params.get("masked"):
        x = ctx.call(torch.where, ctx.call(torch.isinf, x), 0.0, x)
    total = ctx.call(torch.sum, ctx.R, ctx.op.params["dim"], True)
    return [ctx.call(torch.mul, x, ctx.call(torch.sub, ctx.R, ctx.call(torch.mul, ctx.forward_output, total)))]


@rule("constant", (ops.SOFTMAX,))
def softmax_constant_rule(ctx):
    """CP-LRP: the attention weights are held constant, so no relevance flows into the scores."""
    return [None]


def _product_transpose(ctx, s, which: int, operands: dict | None = None):
    """∂/∂operand of Σ s ⊙ (a ∘ b): the other operand contracted with s, shaped like operand `which`."""
    p = ctx.op.params
    a, b = (ctx.fwd(t) for t in ctx.op.inputs)
    if operands:
        a, b = operands.get(0, a), operands.get(1, b)
    ins, out = p["inputs"], p["output"]
    if which == 0:
        return ctx.call(torch.einsum, f"{out},{ins[1]}->{ins[0]}", s, b)
    return ctx.call(torch.einsum, f"{ins[0]},{out}->{ins[1]}", a, s)


@rule("uniform", (ops.MATMUL, ops.PRODUCT))
def uniform_rule(ctx, epsilon=1e-8, stabilizer="signed", dead_units="drop"):
    """AttnLRP's rule for a product of two signals (Prop. 3.3): the ε-rule on the bilinear map with half of the
    relevance to each factor, R_a = a ⊙ ∂_a⟨s, a∘b⟩, R_b likewise, s = R / stab(2·a∘b). For an elementwise product
    a·b that is exactly R/2 to each factor (summed back where it broadcasts): no ε, conserving.

    dead_units='spread' (matmul): outputs with |z| ≤ ε give R/2 to each factor spread evenly over the terms of
    their sum, and every other output divides by 2z itself, with no ε: relevance is conserved.

    A matmul with a constant operand is a linear map of the other, not a product of signals: the constant takes
    no relevance, all of it goes to the signal as `constant_weights` sends it (half to a constant would leak)."""
    if ctx.op.params.get("constant_operand") is not None:
        return constant_weights_rule(ctx, epsilon, stabilizer, dead_units=dead_units)
    if ctx.op.kind == ops.PRODUCT:
        half = ctx.call(torch.mul, ctx.R, 0.5)
        return [ctx.to_input_shape(half, i) for i in range(len(ctx.op.inputs))]
    if dead_units == "drop":
        s = ctx.call(torch.div, ctx.R, stabilize(ctx, ctx.call(torch.mul, ctx.forward_output, 2.0), epsilon,
                                                 stabilizer))
        return [ctx.call(torch.mul, ctx.fwd(t), _product_transpose(ctx, s, i)) for i, t in enumerate(ctx.op.inputs)]
    if dead_units != "spread":
        raise PresetError(f"dead_units must be 'drop' or 'spread', got {dead_units!r}")
    z = ctx.forward_output
    dead = ctx.call(torch.le, ctx.call(torch.abs, z), float(epsilon))
    s = ctx.call(torch.where, dead, 0.0, ctx.call(torch.div, ctx.R, ctx.call(
        torch.mul, ctx.call(torch.where, dead, 1.0, z), 2.0)))
    ones = [ctx.call(torch.ones_like, ctx.fwd(t)) for t in ctx.op.inputs]
    terms = _product(ctx, {0: ones[0], 1: ones[1]})  # how many products each output sums
    flat = ctx.call(torch.where, dead, ctx.call(torch.div, ctx.R, ctx.call(torch.mul, terms, 2.0)), 0.0)
    out = []
    for i, t in enumerate(ctx.op.inputs):
        live = ctx.call(torch.mul, ctx.fwd(t), _product_transpose(ctx, s, i))
        out.append(ctx.call(torch.add, live, _product_transpose(ctx, flat, i, {0: ones[0], 1: ones[1]})))
    return out


@rule("refuse", (ops.PRODUCT,))
def refuse_rule(ctx):
    """no rule: an UnsupportedOpError naming the node if relevance reaches it (the default for products of two
    signals in presets that name no `product` rule)."""
    raise UnsupportedOpError(
        f"{describe_node(ctx.op.node)}: a product of two input-dependent tensors, neither of which is a gate (a "
        "sigmoid/softmax/tanh-like value), attention weights or broadcasts over the other, has no rule in this "
        "preset; name one in its [rules] (product = \"uniform\": AttnLRP's uniform rule, R/2 to each factor)")


@rule("constant_weights", (ops.MATMUL,))
def constant_weights_rule(ctx, epsilon=1e-6, stabilizer="signed", otherwise="error", dead_units="drop"):
    """CP-LRP's A·V: the attention weights A (a softmax output) are held constant, so the product is a linear map
    of the values and all relevance goes to them by the ε-rule. A product with no softmax operand (linear
    attention) is an error, or with otherwise='uniform' gets AttnLRP's uniform rule.

    dead_units='spread': outputs with |z| ≤ ε send their relevance back in proportion to the weights alone
    (R_i·A_ij / Σ_j A_ij), and every other output divides by z itself, with no ε: relevance is conserved however
    small the values are (random-weight models reach attention with values ~1e-7, where ε = 1e-9 drops 0.5%).

    A constant operand (a matmul that is a linear map of its other operand) is held the same way."""
    held = ctx.op.params.get("attention_weights")
    if held is None and otherwise == "uniform":
        return uniform_rule(ctx, epsilon, stabilizer, dead_units)
    if held is None:
        raise UnsupportedOpError(f"{describe_node(ctx.op.node)}: 'constant_weights' needs one operand to be "
                                 "attention weights (a softmax output); neither is (otherwise = \"uniform\" "
                                 "gives such products AttnLRP's uniform rule)")
    other = 1 - held
    out = [None, None]
    if dead_units == "drop":
        s = ctx.call(torch.div, ctx.R, stabilize(ctx, ctx.forward_output, epsilon, stabilizer))
        out[other] = ctx.call(torch.mul, ctx.fwd(ctx.op.inputs[other]), _product_transpose(ctx, s, other))
        return out
    if dead_units != "spread":
        raise PresetError(f"dead_units must be 'drop' or 'spread', got {dead_units!r}")
    z = ctx.forward_output
    dead = ctx.call(torch.le, ctx.call(torch.abs, z), float(epsilon))
    s = ctx.call(torch.where, dead, 0.0, ctx.call(torch.div, ctx.R, ctx.call(torch.where, dead, 1.0, z)))
    live = ctx.call(torch.mul, ctx.fwd(ctx.op.inputs[other]), _product_transpose(ctx, s, other))
    # Σ_j A_ij for each output: the product with the values replaced by ones
    ones = ctx.call(torch.ones_like, ctx.fwd(ctx.op.inputs[other]))
    weight_sums = _product(ctx, {held: ctx.fwd(ctx.op.inputs[held]), other: ones})
    flat = ctx.call(torch.where, dead, ctx.call(torch.div, ctx.R, ctx.call(
        torch.where, ctx.call(torch.eq, weight_sums, 0.0), 1.0, weight_sums)), 0.0)
    out[other] = ctx.call(torch.add, live, _product_transpose(ctx, flat, other))
    return out


def _product(ctx, operands: dict):
    """The op's own contraction on other operands (index 0 and 1)."""
    p = ctx.op.params
    return ctx.call(torch.einsum, f"{p['inputs'][0]},{p['inputs'][1]}->{p['output']}", operands[0], operands[1])


@rule("proportional", (ops.BIAS_ADD,))
def proportional_rule(ctx, epsilon=1e-6, stabilizer="signed"):
    """x + c (position embedding): the ε-rule on the sum, x keeps its share x / (x + c) and the constant's share is
    dropped, as Gradient×Input does. ('pass' gives x everything.)"""
    if ctx.op.in_shape != ctx.op.out_shape:
        raise UnsupportedOpError(f"{describe_node(ctx.op.node)}: 'proportional' where the constant broadcasts x")
    s = ctx.call(torch.div, ctx.R, stabilize(ctx, ctx.forward_output, epsilon, stabilizer))
    return [ctx.call(torch.mul, ctx.a, s)]


def _constant_parts(ctx):
    """The relevance of each input (cat: its slice; pad: the unpadded region) and whether it is input-dependent,
    plus, for a pad, the relevance that landed on the padding (a constant, as a class token is)."""
    p = ctx.op.params
    if ctx.op.kind == ops.PAD:
        inner = ctx.unpad(ctx.R, p["pad"])
        dims = tuple(range(1, len(ctx.op.out_shape)))
        on_padding = ctx.call(torch.sub, ctx.call(torch.sum, ctx.R, dims, True), ctx.call(torch.sum, inner, dims, True))
        return [inner], (True,), on_padding
    return list(ctx.call_multi(torch.split, len(p["sizes"]), ctx.R, p["sizes"], p["dim"])), p["dynamic"], None


@rule("drop", (ops.CONST_CAT, ops.PAD))
def constant_cat_drop_rule(ctx):
    """cat of constants (a class token) and input-dependent tensors, or constant padding: each input gets its slice
    of the relevance back; what lands on the constants is dropped, as Gradient×Input does."""
    parts, dynamic, _ = _constant_parts(ctx)
    return [r if dyn else None for r, dyn in zip(parts, dynamic)]


@rule("spread", (ops.CONST_CAT, ops.PAD))
def constant_cat_spread_rule(ctx):
    """cat of constants (a class token) and input-dependent tensors, or constant padding (SAM's window padding):
    the relevance that lands on the constants is spread over the input-dependent parts in proportion to |x|, per
    sample, so the op conserves relevance."""
    parts, dynamic, constant = _constant_parts(ctx)
    dims = tuple(range(1, len(ctx.op.out_shape)))
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
    share = ctx.call(torch.div, constant, ctx.call(torch.add, norm, TINY))
    return [ctx.call(torch.add, r, ctx.call(torch.mul, a, share)) if dyn else None
            for r, a, dyn in zip(parts, sizes, dynamic)]
