"""Rules for max and average pools and reductions."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from ..errors import PresetError, UnsupportedOpError
from ..graph import describe_node
from .base import AFFINE, Term, affine_rule, bias_mode, negative, positive, rule, stabilize, input_of, signed_parts  # noqa: F401


# ------------------------------------------------------------------------------------------ pooling
@rule("winner_take_all", (ops.MAXPOOL, ops.MAX_REDUCE))
def winner_take_all_rule(ctx):
    """Max-pool: all of a window's relevance goes to its maximum (ties: the first), summed where windows overlap.
    A max (min) over dims: all of an output's relevance goes to its arg-max (arg-min), split evenly on ties."""
    p = ctx.op.params
    if ctx.op.kind == ops.MAX_REDUCE:
        return _winner_take_all_reduce(ctx)
    _, idx = ctx.call_multi(F.max_pool2d, 2, ctx.a, p["kernel"], p["stride"], p["padding"], p["dilation"],
                            p["ceil_mode"], True)
    n_in, n_out = ctx.op.in_shape, ctx.op.out_shape
    # reshapes to constant sizes (not flatten): the exported graph keeps its symbolic batch size
    flat_r = ctx.call(torch.reshape, ctx.R, (-1, n_out[1], n_out[2] * n_out[3]))
    flat_idx = ctx.call(torch.reshape, idx, (-1, n_out[1], n_out[2] * n_out[3]))
    zeros = ctx.call(torch.zeros_like, ctx.call(torch.reshape, ctx.a, (-1, n_in[1], n_in[2] * n_in[3])))
    out = ctx.call(torch.scatter_add, zeros, 2, flat_idx, flat_r)
    return [ctx.call(torch.reshape, out, (-1, *n_in[1:]))]


def _winner_take_all_reduce(ctx):
    p = ctx.op.params
    R = ctx.R
    if not p["keepdim"]:
        for d in p["dims"]:
            R = ctx.call(torch.unsqueeze, R, d)
    x = ctx.a
    extreme = ctx.call(torch.amax if p["mode"] == "max" else torch.amin, x, p["dims"], True)
    winners = ctx.call(torch.Tensor.to, ctx.call(torch.eq, x, extreme), torch.float32)  # 0/1: exact
    count = ctx.call(torch.sum, winners, p["dims"], True)
    return [ctx.call(torch.mul, winners, ctx.call(torch.div, R, count))]


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


@rule("avg2x2", (ops.MAXPOOL, ops.MAX_REDUCE))
def avg2x2_rule(ctx, epsilon=1e-5, stabilizer="add", otherwise="error"):
    """What the released otsuki2024 code does at ResNet's max-pool: a 2×2/stride-2 average pool (z-rule) stands in
    for the real 3×3 windows. Kept for fidelity to the paper's numbers; it does not conserve relevance.
    A max-pool whose output is not half its input (GoogLeNet's 3×3/stride-1 pools) has no 2×2 stand-in: an error, or
    with otherwise='window_average' the same z-rule over the pool's own windows (for a max over dims: over those dims)."""
    if ctx.op.kind == ops.MAX_REDUCE:
        if otherwise == "window_average":
            return _z_reduce(ctx, epsilon, stabilizer, "drop")
        raise UnsupportedOpError(f"{describe_node(ctx.op.node)}: a max over dims has no 2x2 stand-in; use "
                                 f"winner_take_all, or otherwise = \"window_average\"")
    in_hw, out_hw = ctx.op.in_shape[-2:], ctx.op.out_shape[-2:]
    if tuple(s // 2 for s in in_hw) != tuple(out_hw):
        if otherwise == "window_average":
            return window_average_rule(ctx, epsilon=epsilon, stabilizer=stabilizer)
        raise UnsupportedOpError(f"{describe_node(ctx.op.node)}: the 2x2 stand-in needs the output to be half the "
                                 f"input ({in_hw} -> {out_hw}); use winner_take_all or window_average, or "
                                 f"otherwise = \"window_average\"")
    return _pool_z_rule(ctx, (2, 2), (2, 2), (0, 0), False, epsilon, stabilizer)


@rule("z", (ops.AVGPOOL, ops.REDUCE))
def z_pool_rule(ctx, epsilon=1e-6, stabilizer="signed", dead_units="drop"):
    """z-rule for average pooling and reductions: R_in = a ⊙ poolᵀ(R / stab(pool(a))); reuses the forward output.
    dead_units='spread': a window whose average is ~0 (|z| ≤ ε) spreads its relevance evenly over its inputs
    instead of dropping it, and every other window divides by z itself: relevance is conserved."""
    if ctx.op.kind == ops.REDUCE:
        return _z_reduce(ctx, epsilon, stabilizer, dead_units)
    z = ctx.forward_output
    if dead_units == "drop":
        s = ctx.call(torch.div, ctx.R, stabilize(ctx, z, epsilon, stabilizer))
        return [ctx.call(torch.mul, ctx.a, ctx.pool_transpose(s))]
    if dead_units != "spread":
        raise PresetError(f"dead_units must be 'drop' or 'spread', got {dead_units!r}")
    dead = ctx.call(torch.le, ctx.call(torch.abs, z), float(epsilon))
    s = ctx.call(torch.where, dead, 0.0, ctx.call(torch.div, ctx.R, ctx.call(torch.where, dead, 1.0, z)))
    live = ctx.call(torch.mul, ctx.a, ctx.pool_transpose(s))
    # poolᵀ gives each input Σ_w s_w / d_w (d_w: PyTorch's divisor); R_w · d_w / n_w (n_w: the window's inputs)
    # spreads R_w evenly: d_w / n_w = 1 / avg_pool(ones)  (a pooling matrix's rows already sum to 1)
    flat = ctx.call(torch.where, dead, ctx.R, 0.0)
    p = ctx.op.params
    if "row_sums" in p:  # a resampling (rows sum to 1), a 1-d pool (the share it divides by), a fold (the count)
        sums = p["row_sums"]
        if not torch.allclose(sums, torch.ones_like(sums), rtol=0, atol=1e-9):
            flat = ctx.call(torch.mul, flat, torch.where(sums == 0, 0.0, 1.0 / sums))
    elif "matrix" not in p:
        h, w = ctx.op.in_shape[-2:]
        geometry = (p["kernel"], p["stride"], p["padding"], p["ceil_mode"], p["count_include_pad"])
        ones_avg = F.avg_pool2d(torch.ones(1, 1, h, w), *geometry)
        if not torch.allclose(ones_avg, torch.ones_like(ones_avg)):
            flat = ctx.call(torch.mul, flat, 1.0 / ones_avg)
    return [ctx.call(torch.add, live, ctx.pool_transpose(flat))]


def _z_reduce(ctx, epsilon, stabilizer, dead_units):
    """z-rule for a sum/mean over dims: R_in = x ⊙ R / stab(Σ x), the sum taken over the reduced dims."""
    p = ctx.op.params
    dims = p["dims"]
    R = ctx.R
    if not p["keepdim"]:
        for d in dims:
            R = ctx.call(torch.unsqueeze, R, d)
    x = ctx.a
    z = ctx.call(torch.sum, x, dims, True)
    if dead_units == "drop":
        return [ctx.call(torch.mul, x, ctx.call(torch.div, R, stabilize(ctx, z, epsilon, stabilizer)))]
    if dead_units != "spread":
        raise PresetError(f"dead_units must be 'drop' or 'spread', got {dead_units!r}")
    n = 1
    for d in dims:
        n *= ctx.op.in_shape[d]
    dead = ctx.call(torch.le, ctx.call(torch.abs, z), float(epsilon) * (n if p["mean"] else 1))
    s = ctx.call(torch.where, dead, 0.0, ctx.call(torch.div, R, ctx.call(torch.where, dead, 1.0, z)))
    flat = ctx.call(torch.where, dead, ctx.call(torch.mul, R, 1.0 / n), 0.0)
    return [ctx.call(torch.add, ctx.call(torch.mul, x, s), flat)]
