"""Ops that only move, copy or select values.

Four common ones have direct descriptions with cheap exact adjoints (RESHAPE, SLICE of basic indexing, constant
PAD, CAT). Everything else — permute, transpose, chunk/split/unbind/tensor_split and `getitem` on their results,
stack, expand, repeat, flip, roll, narrow, select, index_select with constant indices, pixel_(un)shuffle, channel
shuffle, nearest interpolation, reflect/replicate padding, and any op added to PyTorch later — is a MOVE: an op
with no describer gets one (`base.move_op`), its computation captured as a function of its input-dependent
tensors. The rule (`graphlrp.rules.structure`) evaluates that function at compile time on an index encoding of the
inputs, checks on random inputs that the op really is a rearrangement, and emits the exact adjoint (each unit's
relevance goes back where the value came from; copies sum back). No op in this family needs a hand-written rule.
"""
from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import CAT, CONST_CAT, PAD, RESHAPE, SLICE, Op, arg, describes, is_dynamic_tensor, is_tensor, value
from .base import move_op  # the generic MOVE fallback: in base, with the registry that falls back to it


def _batch_first(*nodes) -> bool:
    return all(n.meta.get("batch_dim", 0) == 0 for n in nodes)


@describes(modules=[nn.Flatten], functions=[torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze],
           methods=["flatten", "view", "reshape", "squeeze", "unsqueeze", "view_as", "reshape_as"])
def _reshape(node, traced):
    x = node.args[0]
    if not is_dynamic_tensor(x):
        return None
    if not _batch_first(x, node) or len(node.meta["shape"]) == 0:
        return move_op(node, traced)
    return Op(RESHAPE, node, (x,))


def _basic_index(index) -> bool:
    return all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in index)


@describes(functions=[operator.getitem])
def _getitem(node, traced):
    if not is_tensor(node.args[0]):
        from .pooling import values_of
        reduced = values_of(node, node.args[0], node.args[1], traced)  # max(x, dim)[0]
        if reduced is not None:
            return reduced
        return None  # an element of a tuple (chunk, split, …): a MOVE through the producer
    index = value(node.args[1], traced)
    index = index if isinstance(index, tuple) else (index,)
    if (_basic_index(index) and _batch_first(node.args[0], node) and not any(i is None for i in index)
            and (not index or index[0] in (slice(None), Ellipsis))
            and all(s.step in (None, 1) or s.step > 0 for s in index if isinstance(s, slice))):
        return Op(SLICE, node, (node.args[0],), dict(index=index))
    return move_op(node, traced)


@describes(functions=[F.pad])
def _pad(node, traced):
    pad = tuple(value(arg(node, 1, "pad"), traced))
    mode = value(arg(node, 2, "mode", "constant"), traced)
    if mode != "constant" or any(p < 0 for p in pad) or not _batch_first(node.args[0]):
        return move_op(node, traced)
    return Op(PAD, node, (node.args[0],), dict(pad=pad))


@describes(functions=[torch.cat, torch.concat])
def _cat(node, traced):
    if not isinstance(node.args[0], (list, tuple)):  # a tuple computed in the graph (split(...)[::-1])
        return move_op(node, traced)
    tensors = list(node.args[0])
    dim = value(arg(node, 1, "dim", 0), traced)
    if not _batch_first(node, *tensors) or not all(is_tensor(t) for t in tensors):
        return move_op(node, traced)
    dynamic = tuple(is_dynamic_tensor(t) for t in tensors)
    if not all(dynamic):  # a class token: constants join the input-dependent tokens (rule category constant_cat)
        return Op(CONST_CAT, node, tuple(tensors), dict(dim=dim % len(node.meta["shape"]), dynamic=dynamic,
                                                        sizes=[t.meta["shape"][dim] for t in tensors]))
    return Op(CAT, node, tuple(tensors), dict(dim=dim % len(node.meta["shape"]),
                                              sizes=[t.meta["shape"][dim] for t in tensors]))
