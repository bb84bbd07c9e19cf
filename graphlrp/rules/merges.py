"""Relevance splitting at merges (Otsuki et al. 2024), generalised to k operands.

For h = Σ_i c_i h_i (an add chain, or a sum over a branch dim whose slices are the h_i):
* ratio: R_i = R·|c_i h_i| / Σ_j |c_j h_j| (an even split where all are 0);
* symmetric: R_i = R / k;
* signed: R_i = R·c_i h_i / stab(h) (Zennit's Norm rule on sums; the z-rule).
With include_identity false an identity skip operand gets nothing; the others share R. Σ_i R_i = R to float
precision for ratio and symmetric.
"""
from __future__ import annotations

import torch

from .. import ops
from ..errors import PresetError
from .base import TINY, rule, stabilize

SPLITS = ("ratio", "symmetric", "signed")


def _branch_magnitudes(ctx, x, dim: int):
    """|x| over a branch dim and its sum, with an even split where every slice is 0 (each magnitude becomes 1
    there, so no relevance is lost); elsewhere a zero slice gets exactly 0 relevance, not a subnormal float."""
    mag = ctx.call(torch.abs, x)
    total = ctx.call(torch.sum, mag, dim, True)
    empty = ctx.call(torch.add, ctx.call(torch.mul, ctx.call(torch.sign, total), -1.0), 1.0)  # 1 where Σ|h_j| = 0
    return ctx.call(torch.add, mag, empty), ctx.call(torch.add, total, ctx.call(torch.mul, empty, float(ctx.op.in_shape[dim])))


def _shares(ctx, h: list, split: str, epsilon, stabilizer, support=None):
    """Relevance for each term h_i (all at the output's shape), given R."""
    R, k = ctx.R, len(h)
    if split == "symmetric":
        out = []
        for i in range(k - 1):
            if support is not None and support[i] is not None:  # structural zeros get nothing
                out.append(ctx.call(torch.mul, R, torch.as_tensor(1.0 / k) * support[i]))
            else:
                out.append(ctx.call(torch.mul, R, 1.0 / k))
    elif split == "ratio":
        # R·(|h_i| + tiny) / (Σ|h_j| + k·tiny): an even split where all are 0. The last term takes what is left,
        # R − Σ others: a zero term placed last gets exactly 0 wherever another term is not tiny, rather than
        # R·tiny/Σ|h_j|, a subnormal float after a few more divisions, which x86 CPUs process many times slower
        mags = [ctx.call(torch.add, ctx.call(torch.abs, x), TINY) for x in h]
        den = mags[0]
        for m in mags[1:]:
            den = ctx.call(torch.add, den, m)
        scale = ctx.call(torch.div, R, den)
        out = [ctx.call(torch.mul, scale, m) for m in mags[:-1]]
    elif split == "signed":
        total = h[0]
        for x in h[1:]:
            total = ctx.call(torch.add, total, x)
        s = ctx.call(torch.div, R, stabilize(ctx, total, epsilon, stabilizer))
        return [ctx.call(torch.mul, x, s) for x in h]
    else:
        raise PresetError(f"split must be one of {SPLITS}, got {split!r}")
    rest = R  # the last share takes what is left: Σ R_i = R exactly up to one rounding
    for o in out:
        rest = ctx.call(torch.sub, rest, o)
    return out + [rest]


@rule("split", (ops.MERGE,))
def split_rule(ctx, epsilon=1e-6, stabilizer="signed"):
    """Relevance splitting at a merge: ratio, symmetric or signed (see the module docstring)."""
    if "dims" in ctx.op.params:
        return _split_branch_dim(ctx, epsilon, stabilizer)
    merge, split = ctx.merge, ctx.split
    coeffs = ctx.op.params.get("coefficients") or (1, ctx.op.params.get("alpha", 1))
    h = [ctx.fwd(x) for x in ctx.op.inputs]
    h = [x if c == 1 else ctx.call(torch.mul, x, c) for x, c in zip(h, coeffs)]
    k = len(h)
    skip_i = merge.skip_operand if merge is not None else k - 1
    drop_identity = merge is not None and merge.skip_kind == "identity" and not ctx.include_identity
    keep = [i for i in range(k) if not (drop_identity and i == skip_i)]
    if len(keep) == 1:
        parts = {keep[0]: ctx.R}
    else:
        # the skip takes the remainder, so where an identity skip is 0 (a ReLU output) it gets exactly 0; an
        # option-A skip's share is computed first instead, so its structural zeros stay exact zeros
        main = [i for i in keep if i != skip_i]
        if skip_i not in keep:
            order = keep
        elif merge is not None and merge.skip_support is not None:
            order = [skip_i] + main
        else:
            order = main + [skip_i]
        sup = [merge.skip_support if (merge is not None and i == skip_i) else None for i in order]
        shares = _shares(ctx, [h[i] for i in order], split, epsilon, stabilizer, sup)
        parts = dict(zip(order, shares))
    name = "merge:" + ctx.op.node.name
    ctx.tap(name + ".R", ctx.R)
    if k >= 2:
        ctx.tap(name + ".R_skip", parts.get(skip_i))
        main = [parts[i] for i in range(k) if i != skip_i and i in parts]
        total = main[0] if main else None
        for m in main[1:]:
            total = ctx.call(torch.add, total, m)
        ctx.tap(name + ".R_main", total)
    for i in range(k):
        ctx.tap(f"{name}.R_{i}", parts.get(i))
    return [ctx.to_input_shape(parts[i], i) if i in parts else None for i in range(k)]


def _split_branch_dim(ctx, epsilon, stabilizer):
    """A sum/mean over a branch dim: the slices along it are the merged terms."""
    p = ctx.op.params
    (dim,) = p["dims"]
    k = ctx.op.in_shape[dim]
    x = ctx.a
    R = ctx.R if p["keepdim"] else ctx.call(torch.unsqueeze, ctx.R, dim)
    if ctx.split == "symmetric":
        R_in = ctx.call(torch.mul, ctx.call(torch.cat, [R] * k, dim), 1.0 / k)
    elif ctx.split == "ratio":
        mag, den = _branch_magnitudes(ctx, x, dim)
        R_in = ctx.call(torch.mul, mag, ctx.call(torch.div, R, den))
    elif ctx.split == "signed":
        total = ctx.call(torch.sum, x, dim, True)
        R_in = ctx.call(torch.mul, x, ctx.call(torch.div, R, stabilize(ctx, total, epsilon, stabilizer)))
    else:
        raise PresetError(f"split must be one of {SPLITS}, got {ctx.split!r}")
    name = "merge:" + ctx.op.node.name
    ctx.tap(name + ".R", ctx.R)
    for i in range(k):
        ctx.tap(f"{name}.R_{i}", ctx.call(torch.select, R_in, dim, i))
    return [R_in]
