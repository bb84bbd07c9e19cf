"""What each traced node *is*, in LRP terms: a small registry of describers, one per op kind.

A describer turns an fx node (module call, function call or method call — all spellings of the same op) into an
`Op`: its kind, the tensor inputs that receive relevance, and normalised parameters with concrete values. Rules
(`graphlrp.rules`) work on `Op`s only, so adding a spelling means adding one describer here.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .errors import UnsupportedOpError
from .trace import Traced, describe_node

# op kinds
CONV, LINEAR, BATCHNORM, ACTIVATION, IDENTITY = "conv", "linear", "batchnorm", "activation", "identity"
MERGE, BIAS_ADD, SCALE, GATE = "merge", "bias_add", "scale", "gate"
MAXPOOL, AVGPOOL, RESHAPE, SLICE, PAD, CAT = "maxpool", "avgpool", "reshape", "slice", "pad", "cat"
PERMUTE, CONST_CAT, SPLIT, ITEM, ROLL = "permute", "constant_cat", "split", "item", "roll"
NORM, SOFTMAX, MATMUL, REDUCE = "norm", "softmax", "matmul", "reduce"


@dataclass
class Op:
    kind: str
    node: fx.Node
    inputs: tuple  # fx nodes that receive relevance, in the order the rule returns it
    params: dict = field(default_factory=dict)

    @property
    def in_shape(self) -> tuple:
        return self.inputs[0].meta["shape"]

    @property
    def out_shape(self) -> tuple:
        return self.node.meta["shape"]


Describer = Callable[[fx.Node, Traced], Op]
_BY_MODULE: dict[type, Describer] = {}
_BY_FUNCTION: dict[Any, Describer] = {}
_BY_METHOD: dict[str, Describer] = {}


def describes(modules=(), functions=(), methods=()):
    """Register a describer for module types, functions and Tensor method names that mean the same op.
    Functions may be given as names in `torch` ("torch.avg_pool2d") where a torch build may lack them."""

    def deco(fn: Describer) -> Describer:
        for m in modules:
            _BY_MODULE[m] = fn
        for f in functions:
            if isinstance(f, str):
                f = getattr(torch, f.split(".", 1)[1], None)
                if f is None:
                    continue
            _BY_FUNCTION[f] = fn
        for m in methods:
            _BY_METHOD[m] = fn
        return fn

    return deco


def describe(node: fx.Node, traced: Traced) -> Op | None:
    """The Op for `node`, or None when graphlrp has no describer for it."""
    if node.op == "call_module":
        module = traced.module(node)
        for cls in type(module).__mro__:
            if cls in _BY_MODULE:
                return _BY_MODULE[cls](node, traced)
        return None
    if node.op == "call_function":
        fn = _BY_FUNCTION.get(node.target)
        return fn(node, traced) if fn else None
    if node.op == "call_method":
        fn = _BY_METHOD.get(node.target)
        return fn(node, traced) if fn else None
    return None


# ---------------------------------------------------------------- argument helpers
def is_tensor(arg) -> bool:
    return isinstance(arg, fx.Node) and "shape" in arg.meta


def is_dynamic_tensor(arg) -> bool:
    return is_tensor(arg) and arg.meta.get("dynamic", False)


def value(arg, traced: Traced):
    """Concrete compile-time value of an argument: literals as they are, sizes/ints from value propagation,
    constant tensors (parameters, buffers, tensors computed from them) evaluated."""
    if isinstance(arg, fx.Node):
        if "value" in arg.meta:
            return arg.meta["value"]
        if arg.op == "get_attr":
            return traced.attr(arg)
        if is_tensor(arg) and not arg.meta.get("dynamic", True):
            return _evaluate_constant(arg, traced)
        raise UnsupportedOpError(f"{describe_node(arg)} must be a compile-time constant here")
    if isinstance(arg, (list, tuple)):
        return type(arg)(value(a, traced) for a in arg)
    if isinstance(arg, slice):
        return slice(value(arg.start, traced), value(arg.stop, traced), value(arg.step, traced))
    return arg


def _evaluate_constant(node: fx.Node, traced: Traced) -> torch.Tensor:
    """Evaluate a parameter-only subgraph (e.g. a standardised conv weight) once, at compile time."""
    cache = traced.__dict__.setdefault("_constants", {})
    if node in cache:
        return cache[node]
    args = fx.node.map_arg(node.args, lambda n: value(n, traced))
    kwargs = fx.node.map_arg(node.kwargs, lambda n: value(n, traced))
    with torch.no_grad():
        if node.op == "call_function":
            out = node.target(*args, **kwargs)
        elif node.op == "call_method":
            out = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            out = traced.module(node)(*args, **kwargs)
    cache[node] = out
    return out


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (list, tuple)) else (v, v)


# ---------------------------------------------------------------- parametric layers
def _conv_op(node, weight, bias, stride, padding, dilation, groups, padding_mode="zeros"):
    if weight.dim() != 4:
        raise UnsupportedOpError(f"{describe_node(node)}: only 2-d convolutions are supported")
    if padding_mode != "zeros":
        raise UnsupportedOpError(f"{describe_node(node)}: padding_mode={padding_mode!r} is not supported")
    k = weight.shape[-2:]
    dilation = _pair(dilation)
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same" and all(d * (kk - 1) % 2 == 0 for d, kk in zip(dilation, k)):
            padding = tuple(d * (kk - 1) // 2 for d, kk in zip(dilation, k))
        else:
            raise UnsupportedOpError(f"{describe_node(node)}: asymmetric padding={padding!r} is not supported")
    return dict(weight=weight.detach(), bias=None if bias is None else bias.detach(), stride=_pair(stride),
                padding=_pair(padding), dilation=dilation, groups=int(groups))


@describes(modules=[nn.Conv2d])
def _conv_module(node, traced):
    m = traced.module(node)
    return Op(CONV, node, (node.args[0],),
              _conv_op(node, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups, m.padding_mode))


@describes(functions=[F.conv2d, "torch.conv2d"])
def _conv_function(node, traced):
    v = lambda i, name, d=None: value(_arg(node, i, name, d), traced)  # noqa: E731
    return Op(CONV, node, (node.args[0],),
              _conv_op(node, v(1, "weight"), v(2, "bias"), v(3, "stride", 1), v(4, "padding", 0),
                       v(5, "dilation", 1), v(6, "groups", 1)))


@describes(modules=[nn.Linear])
def _linear_module(node, traced):
    m = traced.module(node)
    return Op(LINEAR, node, (node.args[0],),
              dict(weight=m.weight.detach(), bias=None if m.bias is None else m.bias.detach()))


@describes(functions=[F.linear])
def _linear_function(node, traced):
    bias = value(_arg(node, 2, "bias"), traced)
    return Op(LINEAR, node, (node.args[0],),
              dict(weight=value(node.args[1], traced).detach(), bias=None if bias is None else bias.detach()))


def _bn_params(node, mean, var, weight, bias, eps):
    if mean is None or var is None:
        raise UnsupportedOpError(f"{describe_node(node)}: batch norm without running statistics")
    scale = (weight if weight is not None else torch.ones_like(mean)) / torch.sqrt(var + eps)
    shift = (bias if bias is not None else torch.zeros_like(mean)) - mean * scale
    return dict(scale=scale.detach(), shift=shift.detach())


@describes(modules=[nn.BatchNorm2d, nn.BatchNorm1d])
def _bn_module(node, traced):
    m = traced.module(node)
    return Op(BATCHNORM, node, (node.args[0],),
              _bn_params(node, m.running_mean, m.running_var, m.weight, m.bias, m.eps))


@describes(functions=[F.batch_norm, "torch.batch_norm"])
def _bn_function(node, traced):
    v = lambda i, name, d=None: value(_arg(node, i, name, d), traced)  # noqa: E731
    if v(5, "training", False):
        raise UnsupportedOpError(f"{describe_node(node)}: batch norm in training mode; call model.eval()")
    return Op(BATCHNORM, node, (node.args[0],),
              _bn_params(node, v(1, "running_mean"), v(2, "running_var"), v(3, "weight"), v(4, "bias"),
                         v(7, "eps", 1e-5)))


# ---------------------------------------------------------------- elementwise
@describes(modules=[nn.ReLU, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.ELU, nn.ReLU6, nn.Hardswish, nn.Tanh, nn.Mish],
           functions=[F.relu, torch.relu, F.leaky_relu, F.silu, F.gelu, F.elu, F.relu6, F.hardswish, torch.tanh,
                      F.tanh, F.mish],
           methods=["relu", "tanh"])
def _activation(node, traced):
    return Op(ACTIVATION, node, (node.args[0],))


@describes(modules=[nn.Identity, nn.Dropout, nn.Dropout2d], functions=[F.dropout],
           methods=["contiguous", "clone", "float", "detach"])
def _identity(node, traced):
    return Op(IDENTITY, node, (node.args[0],))


@describes(functions=[operator.add, torch.add], methods=["add"])
def _add(node, traced):
    a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs["other"]
    alpha = value(node.kwargs.get("alpha", 1), traced)
    if is_dynamic_tensor(a) and is_dynamic_tensor(b):
        return Op(MERGE, node, (a, b), dict(alpha=alpha))
    tensor = a if is_dynamic_tensor(a) else b
    return Op(BIAS_ADD, node, (tensor,))


@describes(functions=[operator.mul, torch.mul], methods=["mul"])
def _mul(node, traced):
    a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs["other"]
    if not (is_dynamic_tensor(a) and is_dynamic_tensor(b)):
        return Op(SCALE, node, (a if is_dynamic_tensor(a) else b,))
    full = [t for t in (a, b) if t.meta["shape"] == node.meta["shape"]]
    if len(full) != 1:
        raise UnsupportedOpError(
            f"{describe_node(node)}: a product of two input-dependent tensors of the same shape has no LRP rule "
            "(only gates that broadcast over the other operand, as in squeeze-excitation, are supported)")
    main = full[0]
    return Op(GATE, node, (main,), dict(gate=b if main is a else a))


# ---------------------------------------------------------------- pooling
@describes(modules=[nn.MaxPool2d])
def _maxpool_module(node, traced):
    m = traced.module(node)
    return Op(MAXPOOL, node, (node.args[0],),
              dict(kernel=_pair(m.kernel_size), stride=_pair(m.stride or m.kernel_size), padding=_pair(m.padding),
                   dilation=_pair(m.dilation), ceil_mode=m.ceil_mode))


@describes(functions=[F.max_pool2d, "torch.max_pool2d"])
def _maxpool_function(node, traced):
    v = lambda i, name, d=None: value(_arg(node, i, name, d), traced)  # noqa: E731
    kernel = _pair(v(1, "kernel_size"))
    stride = v(2, "stride", None)
    return Op(MAXPOOL, node, (node.args[0],),
              dict(kernel=kernel, stride=_pair(stride) if stride else kernel, padding=_pair(v(3, "padding", 0)),
                   dilation=_pair(v(4, "dilation", 1)), ceil_mode=bool(v(5, "ceil_mode", False))))


def _avgpool(node, kernel, stride, padding=(0, 0), ceil_mode=False, count_include_pad=True, divisor_override=None):
    kernel, stride, padding = _pair(kernel), _pair(stride or kernel), _pair(padding)
    if divisor_override is not None:
        raise UnsupportedOpError(f"{describe_node(node)}: average pooling with divisor_override")
    return Op(AVGPOOL, node, (node.args[0],), dict(kernel=kernel, stride=stride, padding=padding,
                                                   ceil_mode=bool(ceil_mode),
                                                   count_include_pad=bool(count_include_pad)))


@describes(modules=[nn.AvgPool2d])
def _avgpool_module(node, traced):
    m = traced.module(node)
    return _avgpool(node, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad, m.divisor_override)


@describes(functions=[F.avg_pool2d, "torch.avg_pool2d"])
def _avgpool_function(node, traced):
    v = lambda i, name, d=None: value(_arg(node, i, name, d), traced)  # noqa: E731
    return _avgpool(node, v(1, "kernel_size"), v(2, "stride", None), v(3, "padding", 0), v(4, "ceil_mode", False),
                    v(5, "count_include_pad", True), v(6, "divisor_override", None))


def _adaptive(node, out_size):
    h, w = node.args[0].meta["shape"][-2:]
    out = tuple(s if o is None else o for o, s in zip(_pair(out_size), (h, w)))
    if h % out[0] or w % out[1]:
        raise UnsupportedOpError(f"{describe_node(node)}: adaptive pooling to {out} from {(h, w)} has unequal windows")
    kernel = (h // out[0], w // out[1])
    return kernel


@describes(modules=[nn.AdaptiveAvgPool2d])
def _adaptive_avg_module(node, traced):
    k = _adaptive(node, traced.module(node).output_size)
    return _avgpool(node, k, k)


@describes(functions=[F.adaptive_avg_pool2d, "torch.adaptive_avg_pool2d"])
def _adaptive_avg_function(node, traced):
    k = _adaptive(node, value(_arg(node, 1, "output_size"), traced))
    return _avgpool(node, k, k)


@describes(modules=[nn.AdaptiveMaxPool2d])
def _adaptive_max_module(node, traced):
    k = _adaptive(node, traced.module(node).output_size)
    return Op(MAXPOOL, node, (node.args[0],), dict(kernel=k, stride=k, padding=(0, 0), dilation=(1, 1),
                                                   ceil_mode=False))


@describes(functions=[torch.mean], methods=["mean"])
def _mean(node, traced):
    shape = node.args[0].meta["shape"]
    dims = value(_arg(node, 1, "dim"), traced)
    dims = tuple(d % len(shape) for d in ((dims,) if isinstance(dims, int) else dims))
    if len(shape) == 4 and sorted(dims) == [2, 3]:
        return _avgpool(node, shape[-2:], shape[-2:])
    if 0 in dims:
        raise UnsupportedOpError(f"{describe_node(node)}: mean over the batch dimension")
    keepdim = bool(value(_arg(node, 2, "keepdim", False), traced))
    kept = tuple(1 if d in dims else n for d, n in enumerate(shape))
    return Op(REDUCE, node, (node.args[0],), dict(dims=tuple(sorted(dims)), keepdim=keepdim, kept_shape=kept,
                                                  count=int(torch.tensor([shape[d] for d in dims]).prod())))


# ---------------------------------------------------------------- structure
@describes(modules=[nn.Flatten], functions=[torch.flatten, torch.reshape],
           methods=["flatten", "view", "reshape", "squeeze", "unsqueeze", "view_as", "reshape_as"])
def _reshape(node, traced):
    return Op(RESHAPE, node, (node.args[0],))


@describes(functions=[operator.getitem])
def _getitem(node, traced):
    if not is_tensor(node.args[0]):
        source = node.args[0]
        if isinstance(source, fx.Node) and source.meta.get("dynamic"):
            split = describe(source, traced)
            if split is not None and split.kind == SPLIT:
                index = value(node.args[1], traced)
                return Op(ITEM, node, (source,), dict(index=index, **split.params))
        return None
    index = value(node.args[1], traced)
    return Op(SLICE, node, (node.args[0],), dict(index=index if isinstance(index, tuple) else (index,)))


@describes(functions=[F.pad])
def _pad(node, traced):
    pad = tuple(value(_arg(node, 1, "pad"), traced))
    mode = value(_arg(node, 2, "mode", "constant"), traced)
    if mode != "constant" or any(p < 0 for p in pad):
        raise UnsupportedOpError(f"{describe_node(node)}: only non-negative constant padding is supported")
    return Op(PAD, node, (node.args[0],), dict(pad=pad))


@describes(functions=[torch.cat, torch.concat])
def _cat(node, traced):
    tensors = list(node.args[0])
    dim = value(_arg(node, 1, "dim", 0), traced)
    if not all(is_tensor(t) for t in tensors):
        raise UnsupportedOpError(f"{describe_node(node)}: concatenation of non-tensors")
    dynamic = tuple(is_dynamic_tensor(t) for t in tensors)
    kind = CAT if all(dynamic) else CONST_CAT  # a class token: a constant joins the input-dependent tokens
    return Op(kind, node, tuple(t for t in tensors), dict(dim=dim % len(node.meta["shape"]),
                                                         sizes=[t.meta["shape"][dim] for t in tensors],
                                                         dynamic=dynamic))


@describes(methods=["permute", "transpose", "swapaxes", "swapdims"], functions=[torch.permute, torch.transpose,
                                                                          torch.swapaxes, torch.swapdims])
def _permute(node, traced):
    rank = len(node.args[0].meta["shape"])
    if node.target in ("permute", torch.permute):
        dims = [value(a, traced) for a in node.args[1:]] or value(node.kwargs.get("dims"), traced)
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
        order = [d % rank for d in dims]
    else:
        d0, d1 = value(_arg(node, 1, "dim0"), traced), value(_arg(node, 2, "dim1"), traced)
        order = list(range(rank))
        order[d0 % rank], order[d1 % rank] = order[d1 % rank], order[d0 % rank]
    return Op(PERMUTE, node, (node.args[0],), dict(order=tuple(order)))


# ---------------------------------------------------------------- transformers
@describes(modules=[nn.LayerNorm])
def _layer_norm_module(node, traced):
    m = traced.module(node)
    return Op(NORM, node, (node.args[0],), dict(
        dims=len(m.normalized_shape), eps=float(m.eps),
        weight=None if m.weight is None else m.weight.detach(), bias=None if m.bias is None else m.bias.detach()))


@describes(functions=[F.layer_norm, "torch.layer_norm"])
def _layer_norm_function(node, traced):
    v = lambda i, name, d=None: value(_arg(node, i, name, d), traced)  # noqa: E731
    shape, weight, bias = v(1, "normalized_shape"), v(2, "weight"), v(3, "bias")
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return Op(NORM, node, (node.args[0],), dict(
        dims=len(shape), eps=float(v(4, "eps", 1e-5)),
        weight=None if weight is None else weight.detach(), bias=None if bias is None else bias.detach()))


@describes(modules=[nn.Softmax], functions=[F.softmax, torch.softmax], methods=["softmax"])
def _softmax(node, traced):
    rank = len(node.meta["shape"])
    if node.op == "call_module":
        dim = traced.module(node).dim
    else:
        dim = value(_arg(node, 1, "dim"), traced)
    if dim is None:
        raise UnsupportedOpError(f"{describe_node(node)}: softmax without an explicit dim")
    return Op(SOFTMAX, node, (node.args[0],), dict(dim=dim % rank, masked=_masked(node.args[0], traced)))


def _masked(scores, traced) -> bool:
    """Whether softmax scores come from an add of a constant holding -inf (a boolean or causal attention mask)."""
    if not (isinstance(scores, fx.Node) and scores.op == "call_function" and scores.target in (operator.add, torch.add)):
        return False
    for arg in scores.args[:2]:
        if is_tensor(arg) and not arg.meta.get("dynamic", False):
            if bool(torch.isinf(value(arg, traced)).any()):
                return True
    return False


def _attention_weights(arg, traced) -> bool:
    """Whether `arg` is a softmax output, possibly behind identity ops (eval-mode dropout): the attention weights
    that CP-LRP holds constant."""
    while isinstance(arg, fx.Node):
        op = describe(arg, traced) if arg.op != "placeholder" else None
        if op is None:
            return False
        if op.kind == SOFTMAX:
            return True
        if op.kind != IDENTITY:
            return False
        arg = op.inputs[0]
    return False


_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@describes(functions=[torch.matmul, operator.matmul, torch.bmm, torch.einsum], methods=["matmul", "bmm"])
def _matmul(node, traced):
    """A product of two input-dependent tensors (Q·Kᵀ, A·V) as an einsum equation; products with a constant
    operand are layers, not products of signals, and have no rule here."""
    if node.target is torch.einsum:
        equation, operands = value(node.args[0], traced), list(node.args[1:])
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = list(operands[0])
    else:
        operands = list(node.args[:2])
        equation = None
    if len(operands) != 2 or not all(is_dynamic_tensor(t) for t in operands):
        raise UnsupportedOpError(f"{describe_node(node)}: only products of two input-dependent tensors have a rule "
                                 "(a product with a constant is a layer; write it as nn.Linear or F.linear)")
    a, b = operands
    if equation is None:
        sa, sb = a.meta["shape"], b.meta["shape"]
        if len(sa) != len(sb) or len(sa) < 2 or sa[:-2] != sb[:-2]:
            raise UnsupportedOpError(f"{describe_node(node)}: matmul of shapes {sa} and {sb} (only equal batch "
                                     "dimensions, no broadcasting)")
        batch = _LETTERS[:len(sa) - 2]
        equation = f"{batch}xy,{batch}yz->{batch}xz"
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
        other = ins[1 - i]
        if any(c not in out and c not in other for c in term.replace("...", "")):
            raise UnsupportedOpError(f"{describe_node(node)}: einsum {equation!r} sums an index of one operand alone")
    weights = [_attention_weights(t, traced) for t in (a, b)]
    return Op(MATMUL, node, (a, b), dict(equation=equation, inputs=tuple(ins), output=out,
                                         attention_weights=weights.index(True) if any(weights) else None))


@describes(methods=["unbind", "split", "chunk"], functions=[torch.unbind, torch.split, torch.chunk])
def _split(node, traced):
    """unbind / split / chunk: a tuple of parts along one dim. Each part's relevance is put back in its place
    (zeros elsewhere) by the getitem that reads it (ITEM); the tuple passes the sum through (SPLIT)."""
    x = node.args[0]
    rank = len(x.meta["shape"])
    name = node.target if isinstance(node.target, str) else node.target.__name__
    parts = node.meta.get("value")
    if parts is None:
        raise UnsupportedOpError(f"{describe_node(node)}: {name} without a recorded result")
    if name == "unbind":
        dim = value(_arg(node, 1, "dim", 0), traced) % rank
        return Op(SPLIT, node, (x,), dict(dim=dim, sizes=None))
    dim = value(_arg(node, 2, "dim", 0), traced) % rank
    return Op(SPLIT, node, (x,), dict(dim=dim, sizes=[p.shape[dim] for p in parts]))


@describes(functions=[torch.roll], methods=["roll"])
def _roll(node, traced):
    shifts, dims = value(_arg(node, 1, "shifts"), traced), value(_arg(node, 2, "dims"), traced)
    if dims is None:
        raise UnsupportedOpError(f"{describe_node(node)}: roll of the flattened tensor (no dims)")
    shifts = tuple(shifts) if isinstance(shifts, (list, tuple)) else (shifts,)
    dims = tuple(dims) if isinstance(dims, (list, tuple)) else (dims,)
    if any(d % len(node.meta["shape"]) == 0 for d in dims):
        raise UnsupportedOpError(f"{describe_node(node)}: roll along the batch dimension")
    return Op(ROLL, node, (node.args[0],), dict(shifts=shifts, dims=dims))


def _stochastic_depth_functions():
    try:
        from torchvision.ops import stochastic_depth
        from torchvision.ops.stochastic_depth import StochasticDepth
    except ImportError:  # pragma: no cover
        return (), ()
    return (stochastic_depth,), (StochasticDepth,)


@describes(functions=_stochastic_depth_functions()[0], modules=_stochastic_depth_functions()[1])
def _stochastic_depth(node, traced):
    """Stochastic depth in eval mode is the identity."""
    if node.op == "call_function" and value(_arg(node, 3, "training", True), traced):
        raise UnsupportedOpError(f"{describe_node(node)}: stochastic depth in training mode; call model.eval()")
    return Op(IDENTITY, node, (node.args[0],))
