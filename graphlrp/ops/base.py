"""The op registry: what each traced node *is*, in LRP terms.

A describer turns an fx node (module call, function call or method call — all spellings of the same op) into an
`Op`: its kind, the tensor inputs that receive relevance, and normalised parameters with concrete values. Rules
(`graphlrp.rules`) work on `Op`s only, so adding a spelling means adding one describer in the family module
(`layers`, `elementwise`, `merges`, `pooling`, `norms`, `structure`).

Two generic fallbacks keep the registry small:
* an op with no describer whose output is a tensor is a `MOVE` candidate: if it only moves, copies or selects
  values (permute, roll, pixel_shuffle, nearest interpolation, …) its relevance goes back by the exact adjoint,
  derived at compile time (`graphlrp.rules.structure`); otherwise it is an `UnsupportedOpError` when relevance
  reaches it;
* a describer that fails (an op graphlrp cannot explain in that configuration) yields an `UNSUPPORTED` op that
  carries the error: it is raised only if relevance reaches the node, so ops off the relevance path (a channel
  mean inside a gate branch) never stop compilation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from ..errors import GraphLRPError, UnsupportedOpError
from ..graph import Traced, describe_node

# op kinds
CONV, LINEAR, BATCHNORM, ACTIVATION, IDENTITY = "conv", "linear", "batchnorm", "activation", "identity"
MERGE, BIAS_ADD, SCALE, GATE = "merge", "bias_add", "scale", "gate"
MAXPOOL, AVGPOOL, RESHAPE, SLICE, PAD, CAT = "maxpool", "avgpool", "reshape", "slice", "pad", "cat"
MOVE, NORM, REDUCE, UNSUPPORTED = "move", "norm", "reduce", "unsupported"
SOFTMAX, MATMUL, CONST_CAT = "softmax", "matmul", "constant_cat"
PRODUCT, MAX_REDUCE = "product", "max_reduce"  # a·b of two signals (not a gate); max/min over dims


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
    Functions may be given as dotted names ("torch.avg_pool2d", "F.mish") where a torch build may lack them."""
    import torch.nn.functional as F

    def register(table: dict, key, fn: Describer) -> None:
        if key in table and table[key] is not fn:  # one describer per spelling: a second would silently win
            raise ValueError(f"{key!r} is already described by {table[key].__name__}; not registering {fn.__name__}")
        table[key] = fn

    def deco(fn: Describer) -> Describer:
        for m in modules:
            register(_BY_MODULE, m, fn)
        for f in functions:
            if isinstance(f, str):
                owner, name = f.split(".", 1)
                f = getattr({"torch": torch, "F": F}[owner], name, None)
                if f is None:
                    continue
            register(_BY_FUNCTION, f, fn)
        for m in methods:
            register(_BY_METHOD, m, fn)
        return fn

    return deco


def describer_of(node: fx.Node, traced: Traced):
    """The describer registered for `node`'s module class, function or Tensor method (None if none is)."""
    if node.op == "call_module":
        module = traced.module(node)
        for cls in type(module).__mro__:
            if cls in _BY_MODULE:
                return _BY_MODULE[cls]
        return None
    if node.op == "call_function":
        return _BY_FUNCTION.get(node.target)
    if node.op == "call_method":
        return _BY_METHOD.get(node.target)
    return None


def describe(node: fx.Node, traced: Traced) -> Op | None:
    """The Op for `node`: from its describer, else a MOVE candidate (tensor ops with input-dependent tensor
    inputs), else None. A describer's failure becomes an UNSUPPORTED op carrying the error."""
    if node.op in ("placeholder", "output", "get_attr"):
        return None
    fn = describer_of(node, traced)
    try:
        if fn is not None:
            op = fn(node, traced)
            if op is not None:
                return op
        if is_tensor(node):
            return move_op(node, traced)
        return None
    except GraphLRPError as e:
        return Op(UNSUPPORTED, node, tuple(dynamic_tensor_inputs(node)), dict(error=e))
    except Exception as e:  # a describer tripping over an unusual spelling: still a clear, named error
        err = UnsupportedOpError(f"{describe_node(node)} cannot be described: {type(e).__name__}: {e}")
        return Op(UNSUPPORTED, node, tuple(dynamic_tensor_inputs(node)), dict(error=err))


# ---------------------------------------------------------------- argument helpers
def is_tensor(arg) -> bool:
    return isinstance(arg, fx.Node) and "shape" in arg.meta


def is_dynamic_tensor(arg) -> bool:
    return is_tensor(arg) and arg.meta.get("dynamic", False)


def dynamic_tensor_inputs(node: fx.Node) -> list:
    return [a for a in node.all_input_nodes if is_dynamic_tensor(a)]


def value(arg, traced: Traced):
    """Concrete compile-time value of an argument: literals as they are, sizes/ints from value propagation,
    constant tensors (parameters, buffers, tensors computed from them) evaluated."""
    if isinstance(arg, fx.Node):
        if "value" in arg.meta:
            return arg.meta["value"]
        if arg.op == "get_attr":
            return traced.attr(arg)
        if not arg.meta.get("dynamic", True):
            return evaluate_constant(arg, traced)
        raise UnsupportedOpError(f"{describe_node(arg)} must be a compile-time constant here")
    if isinstance(arg, (list, tuple)):
        return type(arg)(value(a, traced) for a in arg)
    if isinstance(arg, dict):
        return {k: value(v, traced) for k, v in arg.items()}
    return arg


def evaluate_constant(node: fx.Node, traced: Traced):
    """Evaluate a parameter-only subgraph (a standardised or weight-normed conv weight, a reparameterised kernel)
    once, at compile time."""
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


def arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def pair(v) -> tuple:
    return tuple(v) if isinstance(v, (list, tuple)) else (v, v)


def target_name(node: fx.Node, traced: Traced) -> str:
    """A lower-case name for what the node computes: the module class, function or method name."""
    if node.op == "call_module":
        return type(traced.module(node)).__name__.lower()
    if node.op == "call_method":
        return str(node.target)
    return getattr(node.target, "__name__", str(node.target)).lower()


# ---------------------------------------------------------------- the generic MOVE fallback
def move_op(node: fx.Node, traced) -> Op | None:
    """A MOVE candidate: the node's computation as a function of its input-dependent tensors (tuples such as
    `chunk`'s result are inlined, so `getitem(chunk(x), i)` is one move of x). None when nothing input-dependent
    flows in."""
    leaves: list = []

    def build(a):
        if isinstance(a, fx.Node):
            if is_dynamic_tensor(a):
                if a not in leaves:
                    leaves.append(a)
                i = leaves.index(a)
                return lambda env: env[i]
            if a.meta.get("dynamic") and a.op in ("call_function", "call_method", "call_module"):
                return call(a)  # a tuple of tensors computed from the input
            v = value(a, traced)
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                return lambda env: v.to(env[0].dtype) if env else v
            return lambda env: v
        if isinstance(a, (list, tuple)):
            parts = [build(x) for x in a]
            return lambda env: type(a)(p(env) for p in parts)
        if isinstance(a, dict):
            parts = {k: build(x) for k, x in a.items()}
            return lambda env: {k: p(env) for k, p in parts.items()}
        return lambda env: a

    def call(n):
        if n.op == "call_module" and isinstance(traced.module(n), torch.nn.RNNBase):
            raise UnsupportedOpError(f"{describe_node(n)}: a recurrent layer ({type(traced.module(n)).__name__}) "
                                     "has no LRP rule in graphlrp")
        args, kwargs = build(tuple(n.args)), build(dict(n.kwargs))
        if n.op == "call_function":
            return lambda env: n.target(*args(env), **kwargs(env))
        if n.op == "call_method":
            return lambda env: (lambda a: getattr(a[0], n.target)(*a[1:], **kwargs(env)))(args(env))
        module = traced.module(n)
        return lambda env: module(*args(env), **kwargs(env))

    fn = call(node)
    if not leaves:
        return None
    return Op(MOVE, node, tuple(leaves), dict(fn=fn))
