"""Attention: the softmax and products of two input-dependent tensors (Q·Kᵀ, A·V).

`graphlrp.decompose` writes `nn.MultiheadAttention` and `F.scaled_dot_product_attention` as these parts at trace
time. A SOFTMAX (rule category `softmax`) gets AttnLRP's Taylor rule or CP-LRP's constant rule; a MATMUL (category
`matmul`) is described as an einsum equation, so one pair of rules (`uniform`, `constant_weights`) covers matmul,
bmm and einsum; an operand that depends on the input only through softmax outputs (behind moves, talking heads, a renormalised mix) is marked as attention weights. A softmax whose value only gates a product (`x * softmax(s)`) stays a gate (`elementwise`).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UnsupportedOpError
from ..graph import describe_node
from .base import MATMUL, SOFTMAX, Op, describer_of, arg, describe, describes, dynamic_tensor_inputs, is_dynamic_tensor, is_tensor, move_op, value


@describes(modules=[nn.Softmax], functions=[F.softmax, torch.softmax], methods=["softmax"])
def _softmax(node, traced):
    rank = len(node.meta["shape"])
    dim = traced.module(node).dim if node.op == "call_module" else value(arg(node, 1, "dim"), traced)
    if dim is None:
        raise UnsupportedOpError(f"{describe_node(node)}: softmax without an explicit dim")
    return Op(SOFTMAX, node, (node.args[0],), dict(dim=dim % rank, masked=_masked(node.args[0], traced)))


def _masked(scores, traced) -> bool:
    """Whether softmax scores come from an add of a constant holding -inf (a boolean or causal attention mask)."""
    if not (isinstance(scores, fx.Node) and scores.op == "call_function" and scores.target in (operator.add, torch.add)):
        return False
    for a in scores.args[:2]:
        if is_tensor(a) and not a.meta.get("dynamic", False):
            if bool(torch.isinf(value(a, traced)).any()):
                return True
    return False


# how far the search for the softmax behind attention weights may go (nodes visited) before it gives up
_WEIGHTS_SEARCH_LIMIT = 256


def _attention_weights(a, traced) -> bool:
    """Whether `a` depends on the input only through softmax outputs: the attention weights that CP-LRP holds
    constant (or a global-context block's pooling weights). Between the softmax and the product there may be any
    computation of softmax outputs and constants — moves, eval-mode dropout, talking heads (a linear map across
    heads: CaiT, EfficientFormerV2), constant scales, a gated mix of two attention maps renormalised by its own sum
    (ConViT's GPSA) — since holding the softmax outputs constant holds all of it constant. A path that reaches the
    input without passing a softmax makes `a` a signal, not weights."""
    if not isinstance(a, fx.Node):
        return False
    seen, stack, found = set(), [a], False
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder" or len(seen) > _WEIGHTS_SEARCH_LIMIT:
            return False
        if describer_of(n, traced) is _softmax and describe(n, traced).kind == SOFTMAX:
            found = True
            continue
        stack.extend(dynamic_tensor_inputs(n))
    return found


_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@describes(functions=[torch.matmul, operator.matmul, torch.bmm, torch.einsum], methods=["matmul", "bmm"])
def _matmul(node, traced):
    """A product of two tensors, at least one input-dependent, as an einsum equation. A constant operand
    (`constant_operand`: its index) makes the product a linear map of the other, whose relevance rule treats the
    constant as weights (timm's lambda layer: a relative-position embedding @ the values); two signals are a
    product of signals, where one may be attention weights (`attention_weights`)."""
    if node.target is torch.einsum:
        equation, operands = value(node.args[0], traced), list(node.args[1:])
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = list(operands[0])
    else:
        operands, equation = list(node.args[:2]), None
    if len(operands) == 1 and is_dynamic_tensor(operands[0]):  # one operand: a reorder or diagonal is a MOVE
        return move_op(node, traced)
    if len(operands) != 2 or not all(is_tensor(t) for t in operands) or not any(is_dynamic_tensor(t) for t in operands):
        raise UnsupportedOpError(f"{describe_node(node)}: a product of {len(operands)} operands, none of them or not "
                                 "all of them tensors that depend on the input (only two tensors, at least one "
                                 "input-dependent, have a rule)")
    a, b = operands
    constant = next((i for i, t in enumerate(operands) if not is_dynamic_tensor(t)), None)
    if equation is None:
        sa, sb = tuple(a.meta["shape"]), tuple(b.meta["shape"])
        rank = max(len(sa), len(sb)) - 2
        # batch dimensions aligned from the right (a constant [K, M] @ a signal [B, M, N]); they must be equal
        # where both have them (decompose expands a broadcast of size 1 between operands of one rank)
        if min(len(sa), len(sb)) < 2 or any(x != y for x, y in zip(reversed(sa[:-2]), reversed(sb[:-2]))):
            raise UnsupportedOpError(f"{describe_node(node)}: matmul of shapes {list(sa)} and {list(sb)} (only "
                                     "batch dimensions equal where both operands have them)")
        batch = _LETTERS[:rank]
        ba, bb = batch[rank - (len(sa) - 2):], batch[rank - (len(sb) - 2):]
        equation = f"{ba}xy,{bb}yz->{batch}xz"
    equation = equation.replace(" ", "")
    lhs, _, out = equation.partition("->")
    ins = lhs.split(",")
    if not out or len(ins) != 2:
        raise UnsupportedOpError(f"{describe_node(node)}: einsum {equation!r} needs an explicit output")
    for term in ins:
        letters = term.replace("...", "")
        if len(set(letters)) != len(letters):
            raise UnsupportedOpError(f"{describe_node(node)}: einsum {equation!r} with a repeated index (a trace)")
    for i, term in enumerate(ins):
        if any(c not in out and c not in ins[1 - i] for c in term.replace("...", "")):
            raise UnsupportedOpError(f"{describe_node(node)}: einsum {equation!r} sums an index of one operand alone")
    if constant is not None:  # a linear map of the other operand: the constant is held like attention weights
        return Op(MATMUL, node, (a, b), dict(equation=equation, inputs=tuple(ins), output=out,
                                             attention_weights=constant, constant_operand=constant))
    weights = [_attention_weights(t, traced) for t in (a, b)]
    return Op(MATMUL, node, (a, b), dict(equation=equation, inputs=tuple(ins), output=out,
                                         attention_weights=weights.index(True) if any(weights) else None))
