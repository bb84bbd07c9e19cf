"""Elementwise ops: activations, identities (dropout, stochastic depth in eval), products and quotients.

Every elementwise activation of `torch.nn` is an ACTIVATION (rule category `activation`, usually `pass`).

A product of two input-dependent tensors is a GATE when one operand is a gate: a value computed by a squashing
function (sigmoid, hard-sigmoid, softmax, tanh, hard-tanh, relu6, erf, clamp to a range) followed only by ops
that keep it a gate (reshapes and other moves, identities, adding or multiplying constants). All relevance goes to
the other operand, the gated signal, whatever the broadcast (SE, ECA, CBAM, split attention, x·sigmoid(x)). Where
both operands are squashed, a [0, 1] gate (sigmoid) gates a signed candidate (tanh): LSTM's i·g and o·tanh(c).
Without a recognised gate, an operand that broadcasts over the other is held constant (a normaliser such as
FRN's rsqrt(ν²+ε)); any other product of two signals (SwiGLU's x₁·act(x₂), gMLP's spatial gating u·v, FocalNet's
modulation q·h) is a PRODUCT (rule category `product`: AttnLRP's uniform rule). A quotient of two
input-dependent tensors holds the divisor constant (normalisers spelled out).

Elementwise functions of one signal — `square`, `pow` with a constant exponent, `abs` — are ACTIVATIONs too.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UnsupportedOpError
from ..graph import describe_node
from .base import (ACTIVATION, BIAS_ADD, GATE, IDENTITY, PRODUCT, SCALE, Op, arg, describes, is_dynamic_tensor,
                   is_tensor, target_name, value)

ACTIVATION_MODULES = [nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU,
                      nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus,
                      nn.Softsign, nn.Softshrink, nn.Hardshrink, nn.Tanhshrink, nn.LogSigmoid, nn.Threshold]
ACTIVATION_FUNCTIONS = [F.relu, torch.relu, F.relu6, F.leaky_relu, F.prelu, torch.prelu, F.rrelu, torch.rrelu, F.elu,
                        F.celu, torch.celu, F.selu, torch.selu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
                        F.hardtanh, F.sigmoid, torch.sigmoid, F.tanh, torch.tanh, F.softplus, F.softsign,
                        F.softshrink, F.hardshrink, F.tanhshrink, F.logsigmoid, F.threshold, torch.threshold,
                        torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max, torch.erf]
ACTIVATION_METHODS = ["relu", "sigmoid", "tanh", "clamp", "clip", "clamp_min", "clamp_max", "erf"]

# what makes a value a gate: squashing functions (by module class, function or method name, lower case); those
# with a signed range ([-1, 1]) are the candidates a [0, 1] gate gates where the two meet (LSTM, GRU, WaveNet)
SQUASHING = {"sigmoid", "hardsigmoid", "hard_sigmoid", "softmax", "tanh", "hardtanh", "relu6", "erf"}
SIGNED_SQUASHING = {"tanh", "hardtanh", "erf"}


@describes(modules=ACTIVATION_MODULES, functions=ACTIVATION_FUNCTIONS, methods=ACTIVATION_METHODS)
def _activation(node, traced):
    return Op(ACTIVATION, node, (node.args[0],))


@describes(functions=[torch.square, torch.abs, operator.abs], methods=["square", "abs"])
def _one_signal(node, traced):
    """x², |x|: elementwise functions of one signal, through which relevance passes as through an activation."""
    return Op(ACTIVATION, node, (node.args[0],))


@describes(functions=[torch.pow, operator.pow], methods=["pow"])
def _pow(node, traced):
    """x ** p with a constant exponent p (StarReLU's relu(x)², an explicit x.pow(2)): an elementwise function of
    one signal, an ACTIVATION. An input-dependent exponent has no rule."""
    x, p = node.args[0], arg(node, 1, "exponent")
    if not is_dynamic_tensor(x) or is_dynamic_tensor(p):
        raise UnsupportedOpError(f"{describe_node(node)}: a power with an input-dependent exponent has no LRP rule "
                                 "(only x ** constant)")
    if is_tensor(p) and tuple(x.meta["shape"]) != tuple(node.meta["shape"]):
        raise UnsupportedOpError(f"{describe_node(node)}: the exponent broadcasts the input to a larger shape")
    return Op(ACTIVATION, node, (x,))


@describes(functions=[torch.maximum, torch.minimum, torch.fmax, torch.fmin], methods=["maximum", "minimum"])
def threshold(node, traced):
    """max(x, τ) / min(x, τ) with a constant τ (FRN's thresholded linear unit): an elementwise activation, so
    relevance passes. Of two input-dependent tensors it is a selection with no rule."""
    a, b = node.args[:2]
    dynamic = [is_dynamic_tensor(t) for t in (a, b)]
    if sum(dynamic) != 1:
        raise UnsupportedOpError(f"{describe_node(node)}: {target_name(node, traced)} of two input-dependent tensors "
                                 "has no LRP rule (only of a tensor and a constant threshold)")
    x = a if dynamic[0] else b
    if tuple(x.meta["shape"]) != tuple(node.meta["shape"]):
        raise UnsupportedOpError(f"{describe_node(node)}: the threshold broadcasts the input to a larger shape")
    return Op(ACTIVATION, node, (x,))


def _stochastic_depth_functions():
    try:
        from torchvision.ops import stochastic_depth
        return [stochastic_depth]
    except ImportError:  # pragma: no cover
        return []


@describes(modules=[nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                    nn.FeatureAlphaDropout],
           functions=[F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
                      torch.dropout, *_stochastic_depth_functions()],
           methods=["contiguous", "clone", "float", "detach", "type_as", "to"])
def _identity(node, traced):
    """Identities in eval mode: every dropout and stochastic depth (the explainer always runs in eval mode)."""
    return Op(IDENTITY, node, (node.args[0],))


def gate_range(node, traced, _depth=0) -> str | None:
    """"signed" for a gate computed by a squashing function with a signed range (tanh, hardtanh, erf, a clamp
    below 0), "unit" for any other gate (sigmoid, softmax, a clamp to [0, c], ...), None for a value that is no gate.
    The range is the squashing function's; moves, identities and constant scales or shifts after it keep it."""
    from .base import describe
    if not isinstance(node, fx.Node) or _depth > 64:
        return None
    name = target_name(node, traced) if node.op.startswith("call") else ""
    name = name if name in SQUASHING else name.rstrip("_")
    if name in SQUASHING:
        return "signed" if name in SIGNED_SQUASHING else "unit"
    if name in ("clamp", "clip"):  # clamp to a finite range, e.g. timm's hard_sigmoid: (x + 3).clamp(0, 6) / 6
        lo, hi = arg(node, 1, "min"), arg(node, 2, "max")
        if lo is None or hi is None:
            return None
        return "unit" if isinstance(lo, (int, float)) and lo >= 0 else "signed"
    if node.op not in ("call_function", "call_method", "call_module"):
        return None
    op = describe(node, traced)
    if op is None or not op.inputs:
        return None
    from .base import MOVE, RESHAPE, SLICE
    if op.kind in (MOVE, RESHAPE, SLICE, IDENTITY, SCALE, BIAS_ADD):
        return gate_range(op.inputs[0], traced, _depth + 1)
    return None


REDUCTIONS = {"norm", "vector_norm", "std", "var", "mean", "sum", "amax", "amin"}


def is_reduction(node, _depth=0) -> bool:
    """Whether `node` is a keepdim reduction (GRN's ‖x‖ / mean ‖x‖), possibly divided, shifted or scaled: a value
    that broadcasts over its input, even where the reduced dims happen to be 1 at the compile size."""
    if not isinstance(node, fx.Node) or _depth > 8 or node.op not in ("call_function", "call_method"):
        return False
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if name in REDUCTIONS:
        return bool(node.kwargs.get("keepdim") or (len(node.args) > 2 and node.args[2] is True)
                    or (name == "norm" and len(node.args) > 3 and node.args[3] is True))
    if name in ("truediv", "div", "add", "mul", "sub", "pow", "sqrt", "rsqrt", "clamp", "to", "float", "type_as",
                "expand", "expand_as", "contiguous"):
        first = node.args[0] if node.args else None
        return is_reduction(first, _depth + 1)
    return False


@describes(functions=[operator.mul, torch.mul], methods=["mul"])
def _mul(node, traced):
    a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs["other"]
    if not (is_dynamic_tensor(a) and is_dynamic_tensor(b)):
        return Op(SCALE, node, (a if is_dynamic_tensor(a) else b,))
    ranges = [gate_range(a, traced), gate_range(b, traced)]
    gates = [r is not None for r in ranges]
    if gates[0] != gates[1]:
        signal, gate = (b, a) if gates[0] else (a, b)
        return Op(GATE, node, (signal,), dict(gate=gate, recognised="squashing"))
    if set(ranges) == {"unit", "signed"}:  # a [0, 1] gate on a tanh candidate (LSTM's i·g, o·tanh(c), GRU, WaveNet)
        signal, gate = (a, b) if ranges[0] == "signed" else (b, a)
        return Op(GATE, node, (signal,), dict(gate=gate, recognised="squashing"))
    out = node.meta["shape"]
    full = [t for t in (a, b) if tuple(t.meta["shape"]) == tuple(out)]
    if len(full) == 1:
        signal = full[0]
        return Op(GATE, node, (signal,), dict(gate=b if signal is a else a, recognised="broadcast"))
    reduced = [is_reduction(a), is_reduction(b)]
    if reduced[0] != reduced[1]:  # a normaliser computed by a keepdim reduction whose reduced dims are 1 already
        signal, gate = (b, a) if reduced[0] else (a, b)
        return Op(GATE, node, (signal,), dict(gate=gate, recognised="broadcast"))
    # two signals, neither a gate nor a normaliser: AttnLRP's uniform rule (category `product`) splits R in half
    return Op(PRODUCT, node, (a, b))


@describes(functions=[operator.truediv, torch.div, torch.true_divide], methods=["div", "true_divide"])
def _div(node, traced):
    a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs["other"]
    if not is_dynamic_tensor(a):
        raise UnsupportedOpError(f"{describe_node(node)}: dividing by an input-dependent tensor has no LRP rule")
    if not is_dynamic_tensor(b):
        return Op(SCALE, node, (a,))
    return Op(GATE, node, (a,), dict(gate=b, recognised="divisor"))


@describes(functions=[torch.neg, operator.neg], methods=["neg"])
def _neg(node, traced):
    return Op(SCALE, node, (node.args[0],))


_ = value  # re-exported helper kept for describers added here


@describes(functions=[torch.addcmul], methods=["addcmul"])
def _addcmul(node, traced):
    """input + value·t1·t2 (ConvNeXt-V2's GRN: bias + weight·(x·x_n)): with one input-dependent term it is a scale
    of that term plus a constant, or the input plus a constant."""
    x, t1, t2 = node.args[0], arg(node, 1, "tensor1"), arg(node, 2, "tensor2")
    dynamic = [t for t in (x, t1, t2) if is_dynamic_tensor(t)]
    if len(dynamic) != 1:
        raise UnsupportedOpError(f"{describe_node(node)}: addcmul of several input-dependent tensors has no LRP rule")
    return Op(BIAS_ADD if dynamic[0] is x else SCALE, node, (dynamic[0],))
