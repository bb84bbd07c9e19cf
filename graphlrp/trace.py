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
import os
from dataclasses import dataclass

import torch
import torch.fx as fx

from .errors import TraceError

# in-place function spellings and their functional equivalents
_FUNCTIONAL = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
    torch.relu_: torch.relu,
}


def source_line(node: fx.Node) -> str:
    """The user's source line fx recorded for `node` ("file, line N, in fn: code"), or "" when unknown.
    Frames inside torch itself are skipped: the last frame outside torch is the user's."""
    lines = [ln.strip() for ln in (node.stack_trace or "").strip().splitlines() if ln.strip()]
    frames = []
    for i, ln in enumerate(lines):
        if ln.startswith("File "):
            code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else ""
            frames.append((ln[len("File "):].replace('"', ""), code))
    torch_dir = os.path.dirname(torch.__file__)
    user = [f for f in frames if not f[0].startswith(torch_dir)]
    if not user:
        return ""
    where, code = user[-1]
    return f"{where}: {code}" if code else where


def describe_node(node: fx.Node) -> str:
    """`name (op target)` plus the source line where fx knows it; used in every user-facing error."""
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    text = f"node '{node.name}' ({node.op} {target})"
    where = source_line(node)
    return f"{text} at {where}" if where else text


class _Tracer(fx.Tracer):
    def __init__(self):
        super().__init__()
        self.record_stack_traces = True


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


def _holds_tensor(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (tuple, list)) and any(_holds_tensor(v) for v in value)


class ValueProp(fx.Interpreter):
    """Run the graph once on the example input and record shapes, compile-time values and input dependence."""

    def run_node(self, n: fx.Node):
        try:
            result = super().run_node(n)
        except Exception as e:
            raise TraceError(f"running {describe_node(n)} on the example input failed: {type(e).__name__}: {e}") from e
        if isinstance(result, torch.Tensor):
            n.meta["shape"] = tuple(result.shape)
            n.meta["dtype"] = result.dtype
        else:
            n.meta["value"] = result
        # input-dependent: a tensor computed from the input's values. Sizes are compile-time values (the explainer
        # is specialised to one input size), so a tensor built from sizes and parameters alone (a class token
        # expanded to the batch size) is a constant, not part of the relevance path.
        inputs = [a for a in n.all_input_nodes]
        n.meta["dynamic"] = n.op == "placeholder" or (
            _holds_tensor(result) and any(a.meta.get("dynamic", False) for a in inputs))
        return result


def _probe_batch_dims(gm: fx.GraphModule, example_input: torch.Tensor) -> None:
    """node.meta["batch_dims"]: the dims of each tensor whose size follows the batch size (found by a second run
    at batch 2), so rules can tell a batch dim from one that only happens to lead (Swin's q/k/v axis)."""
    shapes = {}

    class Probe(fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if isinstance(result, torch.Tensor):
                shapes[n] = tuple(result.shape)
            return result

    try:
        with torch.no_grad():
            Probe(gm).run(example_input[:1].expand(2, *example_input.shape[1:]).clone())
    except Exception:  # a model that only runs at batch 1: every leading dim is taken for the batch
        return
    for n, shape in shapes.items():
        if "shape" in n.meta and len(n.meta["shape"]) == len(shape):
            n.meta["batch_dims"] = tuple(i for i, (a, b) in enumerate(zip(n.meta["shape"], shape)) if a != b)


@dataclass
class Traced:
    """A functional, shape-annotated fx graph of the model plus the example input it was specialised on."""

    graph_module: fx.GraphModule
    example_input: torch.Tensor

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    def module(self, node: fx.Node) -> torch.nn.Module:
        return self.graph_module.get_submodule(node.target)

    def attr(self, node: fx.Node):
        """The tensor behind a get_attr node."""
        obj = self.graph_module
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return obj


def _optional_arguments(model: torch.nn.Module) -> dict:
    """The forward's arguments after the input that have defaults (`attn_mask=None`, `is_causal=False`): the
    explainer calls the model with the input alone, so these are traced as the constants they default to."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return {p.name: p.default for p in positional[1:] if p.default is not inspect.Parameter.empty}


_ASSERTS = (torch._assert, getattr(fx._symbolic_trace, "_assert_is_none", None))


def _specialise_arguments(gm: fx.GraphModule, concrete: dict) -> None:
    """Drop the placeholders of specialised arguments and the asserts that guard them (and the input-size
    asserts some models carry): the explainer is compiled for one input size and the arguments' defaults."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _ASSERTS and not node.users:
            gm.graph.erase_node(node)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node in placeholders[1:]:
        name = node.target.rstrip("_0123456789") if node.target not in concrete else node.target
        if name not in concrete and node.target not in concrete:
            continue
        value = concrete.get(node.target, concrete.get(name))
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, lambda a: value if a is node else a)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda a: value if a is node else a)
        gm.graph.erase_node(node)
    gm.recompile()


def trace(model: torch.nn.Module, example_input: torch.Tensor) -> Traced:
    """Symbolically trace a copy of `model` (eval mode), make it functional and propagate the example input."""
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
        raise TraceError("example_input must be a tensor with a batch dimension, e.g. torch.randn(1, 3, 224, 224)")
    model = copy.deepcopy(model).eval()
    tracer = _Tracer()
    concrete = _optional_arguments(model)
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as e:
        raise TraceError(
            f"torch.fx cannot trace {type(model).__name__}: {type(e).__name__}: {e}. "
            "graphlrp needs a model whose forward has no data-dependent Python control flow."
        ) from e
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    _specialise_arguments(gm, concrete)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise TraceError(f"the model's forward must take exactly one tensor input, found {len(placeholders)}")
    _functionalize(gm)
    with torch.no_grad():
        out = ValueProp(gm).run(example_input[:1])
    from .decompose import decompose_attention  # needs the shapes just recorded

    if decompose_attention(gm):
        with torch.no_grad():
            out = ValueProp(gm).run(example_input[:1])
    _probe_batch_dims(gm, example_input)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise TraceError("the model must return one logits tensor of shape [N, classes]")
    return Traced(gm, example_input[:1].detach().clone())
