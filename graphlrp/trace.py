"""Stage 1 — trace: torch.fx symbolic trace, in-place spellings made functional, values propagated.

After `trace()`, every node of the returned GraphModule carries
  node.meta["shape"]    the output shape (tensors only),
  node.meta["value"]    the concrete compile-time value of non-tensor nodes (sizes, ints, tuples),
  node.meta["dynamic"]  True when the value depends on the input (False for parameters, constants, sizes of
                        fixed dims are still marked dynamic but resolved through "value").
"""
from __future__ import annotations

import copy
import inspect
import operator

import torch
import torch.fx as fx

from .errors import GraphLRPError, TraceError
from .graph import MetaResults, Traced, assign_slice, call_on_meta, describe_node, reads_size_only, source_line  # noqa: F401  (importable from here as before)

# in-place function spellings and their functional equivalents
_FUNCTIONAL = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
    torch.relu_: torch.relu,
}


_UNKNOWN = object()
_CONCRETE_ATTRS = ("dtype", "device", "is_cuda", "layout", "requires_grad", "is_quantized")


class _SizedProxy(fx.Proxy):
    """A proxy that knows its value: sizes of non-batch dims, `dim()`, `dtype` and `device` are plain Python values
    while tracing, so control flow over them (timm's "same" padding, `if x.shape[1] != c`) traces. The batch size
    stays a graph value (a `size` node): the explainer keeps a dynamic batch."""

    def _values(self):
        return self.tracer.values.get(self.node, (_UNKNOWN, _UNKNOWN))

    def _tensor(self):
        v1, v2 = self._values()
        return (v1, v2) if isinstance(v1, torch.Tensor) and isinstance(v2, torch.Tensor) else None

    def _batch_dim(self):
        v1, v2 = self._tensor()
        diff = [i for i, (a, b) in enumerate(zip(v1.shape, v2.shape)) if a != b]
        return diff[0] if diff else None

    def size(self, dim=None):
        if self._tensor() is None:
            return fx.Proxy.__getattr__(self, "size")(*(() if dim is None else (dim,)))
        shape, batch = tuple(self._tensor()[0].shape), self._batch_dim()

        def entry(i):
            return fx.Proxy.__getattr__(self, "size")(i) if i == batch else shape[i]

        if dim is None:
            return tuple(entry(i) for i in range(len(shape)))
        return entry(dim % max(len(shape), 1))

    def dim(self):
        return self._tensor()[0].dim() if self._tensor() is not None else fx.Proxy.__getattr__(self, "dim")()

    def __getattr__(self, k):
        if k.startswith("__") or k in ("tracer", "node"):
            return super().__getattr__(k)
        if self._tensor() is not None:
            if k == "shape":
                return self.size()
            if k == "ndim":
                return self.dim()
            if k in _CONCRETE_ATTRS:
                return getattr(self._tensor()[0], k)
        return super().__getattr__(k)

    def __setitem__(self, index, value):
        """`x[index] = v` (MViTv2's relative position term added into a slice of the attention scores): recorded out
        of place, `x2 = assign_slice(x, index, v)`, and this proxy then stands for x2, so later reads see it."""
        self.node = self.tracer.create_proxy("call_function", assign_slice, (self, index, value), {}).node

    def __len__(self):
        v1, v2 = self._values()
        if isinstance(v1, (list, tuple)):
            return len(v1)
        if self._tensor() is not None and self._batch_dim() != 0 and v1.dim() > 0:
            return v1.shape[0]
        return super().__len__()

    def __iter__(self):
        v1, _ = self._values()
        if isinstance(v1, (list, tuple)) or (self._tensor() is not None and self._batch_dim() != 0 and v1.dim() > 0):
            return iter([self[i] for i in range(len(self))])
        return super().__iter__()


# Tensor methods that take sizes: called on a concrete tensor (a buffer the model computed while tracing, ConViT's
# rel_indices) with a traced size (the batch size, a graph value), they are recorded as graph nodes instead of
# failing in PyTorch's argument parser
_SIZED_METHODS = ("expand", "repeat", "view", "reshape", "new_zeros", "new_ones", "new_empty", "new_full")
# factory functions likewise: `torch.ones(B, n, dtype=torch.bool)` (Gemma 4's ViT) with a traced B is a graph node
_SIZED_FACTORIES = ("ones", "zeros", "empty", "full")


def _find_proxy(obj):
    if isinstance(obj, fx.Proxy):
        return obj
    if isinstance(obj, (list, tuple)):
        return next((p for p in map(_find_proxy, obj) if p is not None), None)
    if isinstance(obj, dict):
        return _find_proxy(list(obj.values()))
    return None


class _SizedMethods:
    """While tracing: `tensor.expand(B, -1, ...)` with a traced B becomes a call_method node on the constant, and
    `torch.ones(B, n)` a call_function node of torch.ones."""

    def __enter__(self):
        self.saved = {name: getattr(torch.Tensor, name) for name in _SIZED_METHODS}
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, self._wrap(name, original))
        self.factories = {name: getattr(torch, name) for name in _SIZED_FACTORIES}
        for name, original in self.factories.items():
            setattr(torch, name, self._wrap_factory(original))
        return self

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)
        for name, original in self.factories.items():
            setattr(torch, name, original)

    @staticmethod
    def _wrap_factory(original):
        def factory(*args, **kwargs):
            proxy = _find_proxy(args)
            if proxy is None:
                return original(*args, **kwargs)
            return proxy.tracer.create_proxy("call_function", original, args, kwargs)

        factory.__name__ = original.__name__
        return factory

    @staticmethod
    def _wrap(name, original):
        def method(self, *args, **kwargs):
            proxy = None if isinstance(self, fx.Proxy) else _find_proxy((args, kwargs))
            if proxy is None:
                return original(self, *args, **kwargs)
            return proxy.tracer.create_proxy("call_method", name, (self, *args), kwargs)

        method.__name__ = name
        return method


def _to_meta(obj):
    return obj.to("meta") if isinstance(obj, torch.Tensor) else obj


class _Tracer(fx.Tracer):
    """torch.fx tracing with known sizes: every node is also run on the example input (at batch 1 and 2; the batch
    dim is where the two differ), so proxies can answer size questions with plain numbers."""

    def __init__(self, examples=None):
        super().__init__()
        self.record_stack_traces = True
        self.examples = examples
        self.values: dict = {}

    def proxy(self, node):
        return _SizedProxy(node, self)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if self.examples is not None and kind != "output":
            self._computing = True  # modules called while computing values run for real (call_module, getattr)
            try:
                self.values[node] = tuple(self._value(node, i) for i in range(2))
            finally:
                self._computing = False
        return node

    # fx patches Module.__call__/__getattr__ while it traces, and its patches hand every module call and attribute
    # to these two hooks: while a node's values are computed they give the real call and attribute. (Lifting the
    # patches instead, by setting attributes of nn.Module, invalidates the type cache of each of its thousands of
    # subclasses with timm imported: 2 ms a node, a third of a large model's trace.)
    _computing = False

    def call_module(self, m, forward, args, kwargs):
        if self._computing:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._computing:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def _value(self, node, i):
        """Value i of `node`: 0 on the example input, 1 on a batch of 2 on the meta device (shapes only)."""
        unknown = False

        def val(n):
            nonlocal unknown
            v = self.values.get(n, (_UNKNOWN, _UNKNOWN))[i]
            unknown = unknown or v is _UNKNOWN
            return v

        try:
            if node.op == "placeholder":
                first = not any(n.op == "placeholder" for n in self.values)
                example = self.examples[i].to("meta") if i else self.examples[i]
                return example if first else (node.args[0] if node.args else None)
            if node.op == "get_attr":
                obj = self.root
                for part in node.target.split("."):
                    obj = getattr(obj, part)
                return _to_meta(obj) if i else obj
            args = fx.node.map_arg(node.args, val)
            kwargs = fx.node.map_arg(node.kwargs, val)
            if unknown:
                return _UNKNOWN
            if i:  # the batch-of-2 run is on the meta device: `x.to(device)`, `arange(..., device=d)` stay there
                args, kwargs = _on_meta(args), _on_meta(kwargs)
            with torch.no_grad():
                if node.op == "call_function":
                    return node.target(*args, **kwargs)
                if node.op == "call_method":
                    return getattr(args[0], node.target)(*args[1:], **kwargs)
                if node.op == "call_module":
                    module = self.root.get_submodule(node.target)
                    return call_on_meta(module, args, kwargs) if i else module(*args, **kwargs)
        except Exception:  # the value stays unknown; ValueProp reports a failure that matters
            return _UNKNOWN
        return _UNKNOWN


_META = torch.device("meta")


def _on_meta(obj):
    """`obj` with every torch.device in it (the example's, read off a tensor while tracing) the meta device."""
    if isinstance(obj, torch.device):
        return _META
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a named tuple
        return type(obj)._make(_on_meta(o) for o in obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on_meta(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _on_meta(v) for k, v in obj.items()}
    return obj


def _functionalize(gm: fx.GraphModule) -> None:
    """Rewrite in-place ops out of place: the explainer reuses forward values (e.g. h_m before `out += identity`),
    which an in-place add or ReLU would overwrite. Later readers of the mutated tensor read the new value instead
    (`z.add_(y); relu(z)` becomes `z2 = z + y; relu(z2)`)."""
    inplace_modules = set()
    for name, module in gm.named_modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
            inplace_modules.add(name)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        mutated = False
        if node.op == "call_function":
            if node.target in _FUNCTIONAL:
                node.target, mutated = _FUNCTIONAL[node.target], True
            if node.kwargs.get("inplace") is True:
                node.kwargs, mutated = {**node.kwargs, "inplace": False}, True
        elif node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_"):
            if hasattr(torch.Tensor, node.target[:-1]):
                node.target, mutated = node.target[:-1], True
        elif node.op == "call_module" and node.target in inplace_modules:
            mutated = True
        if mutated and node.args and isinstance(node.args[0], fx.Node):
            source = node.args[0]
            for user in list(source.users):
                if user is not node and order[user] > order[node]:
                    user.replace_input_with(source, node)
    gm.recompile()


# functions of other libraries that compute what a torch function computes, with its signature: traced as leaves
# (timm wraps its norm helpers for torch.fx), they become the torch function, whose describer and converter apply
_SAME_AS_TORCH = {
    ("timm.layers.fast_norm", "rms_norm"): "rms_norm",
    ("timm.layers.fast_norm", "fast_rms_norm"): "rms_norm",
    ("timm.layers.fast_norm", "fast_layer_norm"): "layer_norm",
    ("timm.layers.fast_norm", "fast_group_norm"): "group_norm",
}


def _torch_spellings(gm: fx.GraphModule) -> None:
    """Replace the targets listed in _SAME_AS_TORCH by their torch.nn.functional function."""
    import torch.nn.functional as F

    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        key = (getattr(node.target, "__module__", None), getattr(node.target, "__qualname__", None))
        same = getattr(F, _SAME_AS_TORCH.get(key, ""), None)
        if same is not None:
            node.target, changed = same, True
    if changed:
        gm.recompile()


def _conv1d_as_conv2d(gm: fx.GraphModule) -> None:
    """A 1-d convolution (EfficientViM's ConvLayer1D: nn.Conv1d, F.conv1d) written as the 2-d convolution it is on
    [N, C, 1, L]: x.unsqueeze(2) -> conv2d(weight.unsqueeze(2)) -> squeeze(2), so every conv rule and converter
    applies to it unchanged."""
    import torch.nn.functional as F

    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and type(gm.get_submodule(node.target)) is torch.nn.Conv1d:
            m = gm.get_submodule(node.target)
            if m.padding_mode != "zeros" or len(node.args) != 1 or node.kwargs:
                continue
            geometry = ((1, m.stride[0]), m.padding if isinstance(m.padding, str) else (0, m.padding[0]),
                        (1, m.dilation[0]), m.groups)
            with graph.inserting_before(node):
                weight = graph.get_attr(f"{node.target}.weight")
                bias = graph.get_attr(f"{node.target}.bias") if m.bias is not None else None
                x = node.args[0]
        elif node.op == "call_function" and node.target in (F.conv1d, torch.conv1d) and not node.kwargs:
            args = list(node.args) + [None, 1, 0, 1, 1][len(node.args) - 2:]
            x, weight, bias, stride, padding, dilation, groups = args[:7]
            if any(isinstance(a, fx.Node) for a in (stride, padding, dilation, groups)):
                continue
            one = lambda v: v[0] if isinstance(v, (tuple, list)) else v  # noqa: E731
            geometry = ((1, one(stride)), padding if isinstance(padding, str) else (0, one(padding)),
                        (1, one(dilation)), groups)
        else:
            continue
        with graph.inserting_before(node):
            x4 = graph.call_method("unsqueeze", (x, 2))
            w4 = graph.call_method("unsqueeze", (weight, 2))
            conv = graph.call_function(F.conv2d, (x4, w4, bias, *geometry))
            out = graph.call_method("squeeze", (conv, 2))
        for new in (x4, w4, conv, out):
            new.meta["stack_trace"] = node.meta.get("stack_trace")
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()


def _conv_transpose_as_conv(gm: fx.GraphModule) -> None:
    """nn.ConvTranspose2d (LowFormer's upsampling) written as what it computes: the input with stride − 1 zeros
    inserted between its entries (reshape, pad, reshape, slice: moves), padded by d·(k − 1) − p (+ output_padding
    at the end), then an ordinary conv2d with the kernel flipped and its in/out channels swapped per group. Every
    conv rule and converter then applies; the zeros carry no relevance."""
    import torch.nn.functional as F

    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_module" or type(gm.get_submodule(node.target)) is not torch.nn.ConvTranspose2d:
            continue
        m = gm.get_submodule(node.target)
        if m.padding_mode != "zeros" or len(node.args) != 1 or node.kwargs:
            continue
        g, (kh, kw) = m.groups, m.kernel_size
        cin, cout_g = m.weight.shape[:2]
        w = m.weight.detach().reshape(g, cin // g, cout_g, kh, kw).transpose(1, 2).reshape(g * cout_g, cin // g, kh, kw)
        name = f"_lrp_conv_equivalent_{node.name}"
        gm.register_buffer(name, w.flip(-1, -2).contiguous())
        (sh, sw), (dh, dw), (ph, pw), (oh, ow) = m.stride, m.dilation, m.padding, m.output_padding
        with graph.inserting_before(node):
            y = node.args[0]
            if (sh, sw) != (1, 1):  # x[..., i, j] lands on [..., i·s, j·s]; zeros between
                y = graph.call_method("unsqueeze", (graph.call_method("unsqueeze", (y, 3)), 5))
                y = graph.call_function(F.pad, (y, (0, sw - 1, 0, 0, 0, sh - 1)))
                y = graph.call_method("flatten", (graph.call_method("flatten", (y, 4, 5)), 2, 3))
                y = graph.call_function(operator.getitem, (y, (slice(None), slice(None), slice(0, -(sh - 1) or None),
                                                               slice(0, -(sw - 1) or None))))
            top, left = dh * (kh - 1) - ph, dw * (kw - 1) - pw
            y = graph.call_function(F.pad, (y, (left, left + ow, top, top + oh)))
            weight = graph.get_attr(name)
            bias = graph.get_attr(f"{node.target}.bias") if m.bias is not None else None
            out = graph.call_function(F.conv2d, (y, weight, bias, 1, 0, (dh, dw), g))
        out.meta["stack_trace"] = node.meta.get("stack_trace")
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()


def _holds_tensor(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (list, tuple)) and any(_holds_tensor(v) for v in value)


class ValueProp(fx.Interpreter):
    """Run the graph once on the example input and record shapes, compile-time values and input dependence.
    A node is dynamic when it is a tensor (or a tuple of tensors, as `chunk` returns) computed from the input;
    sizes are compile-time values, not dynamic."""

    def run_node(self, n: fx.Node):
        try:
            result = super().run_node(n)
        except Exception as e:
            raise TraceError(f"running {describe_node(n)} on the example input failed: {type(e).__name__}: {e}") from e
        n.meta.pop("value", None)
        if isinstance(result, torch.Tensor):
            n.meta["shape"] = tuple(result.shape)
            n.meta["dtype"] = result.dtype
        elif not _holds_tensor(result):
            n.meta["value"] = result
        inputs = [a for a in n.all_input_nodes]
        if reads_size_only(n) and n.args and isinstance(n.args[0], fx.Node):  # `y.new_ones(...)`: not y's values
            inputs = []
            fx.node.map_arg((n.args[1:], n.kwargs), inputs.append)
        n.meta["dynamic"] = n.op == "placeholder" or (
            _holds_tensor(result) and any(a.meta.get("dynamic", False) for a in inputs))
        return result


class BatchDims(fx.Interpreter):
    """Run the graph on a batch of 2 on the meta device (shapes only, no arithmetic) and record, per tensor, which
    dim holds the batch (meta["batch_dim"], None for tensors that do not depend on the batch). Structural rules use
    it where a reshape moves the batch (ViT's qkv)."""

    def run_node(self, n: fx.Node):
        try:
            result = super().run_node(n)
        except Exception:  # an op with no meta kernel: its batch dim stays the default, 0
            n.meta.pop("batch_dim", None)
            return None
        if isinstance(result, torch.Tensor) and "shape" in n.meta:
            diff = [i for i, (a, b) in enumerate(zip(n.meta["shape"], result.shape)) if a != b]
            n.meta["batch_dim"] = diff[0] if diff else None
        return result

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.remembered = MetaResults()

    def get_attr(self, target, args, kwargs):
        return _to_meta(super().get_attr(target, args, kwargs))

    def call_module(self, target, args, kwargs):
        return call_on_meta(self.fetch_attr(target), args, kwargs)

    def call_function(self, target, args, kwargs):
        return self.remembered(target, args, kwargs, super().call_function)

    def call_method(self, target, args, kwargs):
        return self.remembered(target, args, kwargs, super().call_method)


def copy_model(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of `model` to trace (the user's model stays as it is). Tensors an autograd forward left in the
    model's attributes (timm's eval-mode attention-bias caches) are not graph leaves and refuse deepcopy: the copy
    holds detached clones of them instead, so compiling after `model(x)` gives the same explainer as before."""
    memo: dict = {}

    def visit(value, depth=0):
        if isinstance(value, torch.Tensor):
            if value.grad_fn is not None and id(value) not in memo:
                memo[id(value)] = value.detach().clone()
        elif depth < 4 and isinstance(value, dict):
            for v in value.values():
                visit(v, depth + 1)
        elif depth < 4 and isinstance(value, (list, tuple)):
            for v in value:
                visit(v, depth + 1)

    for module in model.modules():
        for name, value in vars(module).items():
            if name not in ("_parameters", "_buffers", "_modules"):
                visit(value)
    return copy.deepcopy(model, memo)


def trace(model: torch.nn.Module, example_input: torch.Tensor) -> Traced:
    """Symbolically trace a copy of `model` (eval mode), make it functional and propagate the example input."""
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
        raise TraceError("example_input must be a tensor with a batch dimension, e.g. torch.randn(1, 3, 224, 224)")
    model = copy_model(model).eval()
    x1 = example_input[:1].detach().clone()
    x2 = torch.cat([x1, torch.flip(x1, dims=(-1,))])  # two different samples of the same size
    tracer = _Tracer((x1, x2))
    try:
        with _SizedMethods():
            graph = tracer.trace(model, concrete_args=_default_args(model))
    except GraphLRPError:
        raise
    except Exception as e:
        raise TraceError(
            f"torch.fx cannot trace {type(model).__name__}: {type(e).__name__}: {e}. "
            "graphlrp needs a model whose forward has no data-dependent Python control flow."
        ) from e
    tracer.values.clear()
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    _drop_specialised_args(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise TraceError(f"the model's forward must take exactly one tensor input, found {len(placeholders)}")
    _functionalize(gm)
    _torch_spellings(gm)
    _conv1d_as_conv2d(gm)
    _conv_transpose_as_conv(gm)
    with torch.no_grad():
        try:
            out = ValueProp(gm).run(x1)
        except TraceError as e:
            if example_input.dim() == 3:  # its first dim was taken for the batch: say so beside the failing node
                raise TraceError(f"is the example one image [C, H, W] = {list(example_input.shape)}? compile takes "
                                 f"a batch, example[None]: {e}") from e
            raise
    from .decompose import decompose_attention  # needs the shapes just recorded

    if decompose_attention(gm):
        with torch.no_grad():
            out = ValueProp(gm).run(x1)
    with torch.no_grad():
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise TraceError("the model must return one logits tensor of shape [N, classes]")
        BatchDims(gm).run(x2.to("meta"))
    return Traced(gm, x1)


def _default_args(model: torch.nn.Module) -> dict | None:
    """Forward arguments after the first that have defaults are fixed to them (e.g. `mask=None`): the explainer
    takes one tensor."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    fixed = {p.name: p.default for p in params[1:]
             if p.default is not inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return fixed or None


def _drop_specialised_args(gm: fx.GraphModule) -> None:
    """fx guards fixed arguments with placeholder + assert nodes; they check what is fixed by construction."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for ph in placeholders[1:]:
        guard, frontier = {ph}, [ph]
        while frontier:
            for user in frontier.pop().users:
                if user not in guard:
                    guard.add(user)
                    frontier.append(user)
        if any(n.op == "output" for n in guard):  # the argument is really used: keep it (and fail below)
            continue
        for n in sorted(guard, key=order.get, reverse=True):
            gm.graph.erase_node(n)
    gm.recompile()
