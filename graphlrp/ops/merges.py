"""Merges: sums of k >= 2 input-dependent tensors.

* `a + b`, `a - b`, `torch.add(a, b, alpha=…)`, and chains `a + b + c` (an add whose only user is another add is
  absorbed into it: one k-ary merge);
* a sum or mean over a *branch dim* (see `pooling.reduction_kind`): `torch.stack([...]).sum(0)`, ResNeSt's and SK's
  `(x * attn).sum(1)` over the radix/kernel dim. These carry `dims` in their params.

Operands may broadcast against each other; each operand's share is summed back to its own shape.
"""
from __future__ import annotations

import operator

import torch

from .base import BIAS_ADD, MERGE, Op, describes, is_dynamic_tensor, value

_ADDS = {operator.add, torch.add, "add"}
_SUBS = {operator.sub, torch.sub, "sub"}


def _operands(node, traced):
    a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs["other"]
    alpha = value(node.kwargs.get("alpha", 1), traced)
    sign = -1 if node.target in _SUBS else 1
    return a, b, sign * alpha


def _is_binary_merge(node, traced) -> bool:
    if node.op not in ("call_function", "call_method") or node.target not in (_ADDS | _SUBS):
        return False
    a, b, _ = _operands(node, traced)
    return is_dynamic_tensor(a) and is_dynamic_tensor(b)


def _flatten(node, traced, scale, terms, absorbed):
    """Collect (operand, coefficient) of a chain of adds whose inner adds have no other user."""
    a, b, alpha = _operands(node, traced)
    for operand, coeff in ((a, scale), (b, scale * alpha)):
        if (_is_binary_merge(operand, traced) and len(operand.users) == 1
                and tuple(operand.meta["shape"]) == tuple(node.meta["shape"])):
            absorbed.append(operand)
            _flatten(operand, traced, coeff, terms, absorbed)
        else:
            terms.append((operand, coeff))


@describes(functions=[operator.add, torch.add, operator.sub, torch.sub], methods=["add", "sub"])
def _add(node, traced):
    a, b, alpha = _operands(node, traced)
    if is_dynamic_tensor(a) and is_dynamic_tensor(b):
        terms, absorbed = [], []
        _flatten(node, traced, 1, terms, absorbed)
        coeffs = tuple(c for _, c in terms)
        return Op(MERGE, node, tuple(t for t, _ in terms),
                  dict(alpha=coeffs[-1] if len(terms) == 2 else 1, coefficients=coeffs, absorbed=absorbed))
    tensor = a if is_dynamic_tensor(a) else b
    return Op(BIAS_ADD, node, (tensor,), dict(negated=node.target in _SUBS and tensor is b))
