"""Ops that only move values: relevance goes back along the same moves (the transpose of a 0/1 linear map), which
is exact and conserving.

RESHAPE, SLICE and CAT have direct forms (constant padding is a constant_cat: rules/attention.py). Every other
MOVE gets its adjoint derived at compile time (`move_map`): the op is evaluated on an index encoding of its inputs
(unit j of input i carries the number offset_i + j + 1) and on two random draws. A cell whose value is the same in
all three is a constant (padding, a constant operand): it came from no input. Every other cell must hold an index whose input value it equals in
both random draws — otherwise the op is not a rearrangement and has no rule (UnsupportedOpError). The adjoint is
then one `index_select` (each input unit used at most once) or one `scatter_add` (copies: expand, repeat, nearest
upsampling, reflect padding) on the flattened per-sample relevance: plain ops every exporter handles.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from ..errors import UnsupportedOpError
from ..graph import describe_node


def structural_relevance(ctx) -> list:
    """Ops that only move values around pass relevance back along the same moves: exact and conserving."""
    kind, p = ctx.op.kind, ctx.op.params
    if kind == ops.RESHAPE:
        return [ctx.call(torch.reshape, ctx.R, (-1, *ctx.op.in_shape[1:]))]
    if kind == ops.SLICE:
        return [ctx.unslice(ctx.R, p["index"])]
    if kind == ops.CAT:
        parts = ctx.call_multi(torch.split, len(p["sizes"]), ctx.R, p["sizes"], p["dim"])
        return list(parts)
    if kind == ops.MOVE:
        return move_relevance(ctx)
    raise AssertionError(kind)


# constant padding is not among them: what lands on the padding is relevance of a constant, so the preset's
# constant_cat rule decides it (dropped, or spread over the input like a class token's)
STRUCTURAL = (ops.RESHAPE, ops.SLICE, ops.CAT, ops.MOVE)


def _per_sample(shape, batch_dim):
    return tuple(s for i, s in enumerate(shape) if i != batch_dim)


def _run(op, inputs):
    with torch.no_grad():
        out = op.params["fn"](tuple(inputs))
    if not isinstance(out, torch.Tensor):
        raise UnsupportedOpError(f"{describe_node(op.node)}: does not return a tensor")
    return out


def axis_permutation(op):
    """The dims order p when the MOVE is `x.permute(p)` of its one input however it is spelled (permute,
    transpose, swapaxes, movedim, .mT, an einsum that only reorders, ...), else None.

    Found by running the op once on a probe of the input's shape whose strides are all distinct (size-1 dims
    get a stride of their own): a permutation returns a view of the same storage at offset 0 whose strides are
    the probe's in the order p. Anything else (a copy, a slice, a broadcast, a reshape) fails that test and keeps
    the general derivation of `move_map`."""
    cache = op.params.setdefault("_map", {})
    if "permutation" in cache:
        return cache["permutation"]
    perm = None
    if len(op.inputs) == 1:
        shape = tuple(op.inputs[0].meta["shape"])
        strides, step = [], 1
        for size in reversed(shape):
            strides.insert(0, step)
            step *= max(size, 2)
        probe = torch.zeros(step).as_strided(shape, strides)
        try:
            out = _run(op, [probe])
        except Exception:  # noqa: BLE001 — not evaluable on a strided probe: not a plain permutation
            out = None
        if (out is not None and out.dim() == len(shape) and out.storage_offset() == 0
                and out.untyped_storage().data_ptr() == probe.untyped_storage().data_ptr()):
            by_stride = {st: i for i, st in enumerate(strides)}
            p = tuple(by_stride.get(st, -1) for st in out.stride())
            if sorted(p) == list(range(len(shape))) and tuple(out.shape) == tuple(shape[i] for i in p):
                perm = p
    cache["permutation"] = perm
    return perm


def move_map(op) -> list:
    """For each input of a MOVE: (source, target) long tensors — per-sample flat positions such that output cell
    target[k] holds input cell source[k]. Raises UnsupportedOpError when the op is not a rearrangement."""
    cache = op.params.setdefault("_map", {})
    if "map" in cache:
        return cache["map"]
    perm = axis_permutation(op)
    if perm is not None:  # known exactly: no evaluation on index encodings and random draws needed
        n = int(torch.Size(op.inputs[0].meta["shape"]).numel())
        source = torch.arange(n).reshape(op.inputs[0].meta["shape"]).permute(perm).reshape(-1)
        cache["map"] = [(source, torch.arange(n))]
        return cache["map"]
    shapes = [tuple(x.meta["shape"]) for x in op.inputs]
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    total = sum(sizes)
    gen = torch.Generator().manual_seed(0)
    index_inputs = [(torch.arange(n, dtype=torch.float64) + 1 + off).reshape(s)
                    for n, off, s in zip(sizes, offsets, shapes)]
    draws = [[torch.randn(s, dtype=torch.float64, generator=gen) for s in shapes] for _ in range(2)]
    try:
        e0 = _run(op, index_inputs).double().reshape(-1)
        e1 = _run(op, draws[0]).double().reshape(-1)
        e2 = _run(op, draws[1]).double().reshape(-1)
    except UnsupportedOpError:
        raise
    except Exception as e:
        raise UnsupportedOpError(f"no LRP rule for {describe_node(op.node)}: it cannot be evaluated as a "
                                 f"rearrangement ({type(e).__name__}: {e})") from e
    if e0.numel() != int(torch.Size(op.out_shape).numel()):
        raise UnsupportedOpError(f"no LRP rule for {describe_node(op.node)}: its output size changes with the dtype")
    same = lambda a, b: (a == b) | (torch.isnan(a) & torch.isnan(b))  # noqa: E731
    constant = same(e0, e1) & same(e1, e2)
    src = torch.where(constant, torch.zeros_like(e0), e0)
    is_index = (src == torch.round(src)) & (src >= 1) & (src <= total)
    ok = constant | is_index
    flat = [torch.cat([d.reshape(-1) for d in draw]) for draw in draws]
    idx = (src.clamp(1, max(total, 1)) - 1).long()
    ok &= constant | (same(flat[0][idx], e1) & same(flat[1][idx], e2))
    if not bool(ok.all()):
        raise UnsupportedOpError(f"no LRP rule for {describe_node(op.node)}: it lies on the relevance path and is "
                                 "not a rearrangement of its inputs (no describer in graphlrp.ops)")
    result = []
    cells = torch.arange(e0.numel())
    for off, n in zip(offsets, sizes):
        mine = (~constant) & (idx >= off) & (idx < off + n)
        result.append((idx[mine] - off, cells[mine]))
    cache["map"] = result
    return result


def _to_batch_major(shape, b):
    """Positions in the flat per-sample layout (batch dim moved to the front) of each flat position of a batch-1
    tensor of `shape`; None when the layouts agree. The batch dim may hold k·B entries (Swin's B·windows), B-major
    as a view of a batch-first tensor gives them: a sample's values are then k consecutive blocks."""
    if not b or shape[b] == 1:
        return None
    n = int(torch.Size(shape).numel())
    order = torch.arange(n).reshape(shape).movedim(b, 0).reshape(-1)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n)
    return inverse


def _moved(shape, b):
    shape = list(shape)
    return tuple([shape.pop(b)] + shape) if b else tuple(shape)


def move_relevance(ctx) -> list:
    op = ctx.op
    b_out = op.node.meta.get("batch_dim", 0)
    R = ctx.R
    if b_out is None:
        raise UnsupportedOpError(f"{describe_node(op.node)}: its output does not keep the batch dim")
    perm = axis_permutation(op)
    if perm is not None and perm[0] == 0 and b_out == 0 and op.inputs[0].meta.get("batch_dim", 0) == 0:
        # a permutation that keeps the batch first: its adjoint is the inverse permutation, one transpose
        inverse = tuple(sorted(range(len(perm)), key=perm.__getitem__))
        return [ctx.call(torch.permute, R, inverse)]
    if b_out != 0:
        R = ctx.call(torch.movedim, R, b_out, 0)
    n_out = int(torch.Size(op.out_shape).numel())  # shapes are of the batch-1 example: one sample's values
    R = ctx.call(torch.reshape, R, (-1, n_out))
    layout_out = _to_batch_major(op.out_shape, b_out)
    out = []
    for x, (source, target) in zip(op.inputs, move_map(op)):
        b_in = x.meta.get("batch_dim", 0)
        shape = _moved(x.meta["shape"], b_in)[1:]
        n_in = int(torch.Size(x.meta["shape"]).numel())
        if b_in is None or len(source) == 0:
            out.append(None)
            continue
        layout_in = _to_batch_major(x.meta["shape"], b_in)
        if layout_in is not None:
            source = layout_in[source]
        if layout_out is not None:
            target = layout_out[target]
        counts = torch.bincount(source, minlength=n_in)
        if bool((counts <= 1).all()):
            if len(source) == n_in and torch.equal(source, torch.arange(n_in)) and torch.equal(
                    target, torch.arange(n_out)):
                r = R  # the same order: a reshape
            else:
                inverse = torch.full((n_in,), n_out, dtype=torch.long)  # n_out: a zero column for unused units
                inverse[source] = target
                src_R = R if bool((counts == 1).all()) else ctx.call(F.pad, R, (0, 1))
                r = ctx.call(torch.index_select, src_R, 1, inverse)
        else:
            picked = R if torch.equal(target, torch.arange(n_out)) else ctx.call(torch.index_select, R, 1, target)
            zeros = ctx.call(torch.zeros_like, ctx.call(torch.reshape, ctx.call(
                torch.movedim, ctx.fwd(x), b_in, 0) if b_in else ctx.fwd(x), (-1, n_in)))
            index = ctx.call(torch.Tensor.expand_as, source.view(1, -1), picked)
            r = ctx.call(torch.scatter_add, zeros, 1, index, picked)
        r = ctx.call(torch.reshape, r, (-1, *shape))
        if b_in:
            r = ctx.call(torch.movedim, r, 0, b_in)
        out.append(r)
    return out
