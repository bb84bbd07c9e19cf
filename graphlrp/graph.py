"""The traced graph and what every stage says about its nodes: `Traced` (an fx graph specialised on an example
input), `describe_node`/`source_line` for user-facing errors, and `call_on_meta` (a module run on the meta device,
shapes only). Tracing (`graphlrp.trace`), attention decomposition, the op registry (`graphlrp.ops`), the rules and
the ONNX lowering all build on this module; it imports none of them.
"""
from __future__ import annotations

import operator
import os
from dataclasses import dataclass, field

import torch
import torch.fx as fx

# frames of graphlrp's tracer (its sized proxies create nodes too) are not the user's source line
_TRACE_FILE = os.path.join(os.path.dirname(__file__), "trace.py")


# calls whose result depends on their first operand's size only (fixed at compile time), not on its values: the
# result of one on an input-dependent tensor is a constant
SIZE_ONLY = frozenset({"new_zeros", "new_ones", "new_full", "new_empty", "zeros_like", "ones_like", "full_like",
                       "empty_like", "size", "dim", "numel"})


def reads_size_only(node: fx.Node) -> bool:
    """Whether `node` (a call) reads its first operand's size only (`y.new_ones(...)`, `torch.zeros_like(y)`)."""
    return node.op in ("call_method", "call_function") and getattr(node.target, "__name__", node.target) in SIZE_ONLY


def source_line(node: fx.Node) -> str:
    """The user's source line fx recorded for `node` ("file, line N, in fn: code"), or "" when unknown.
    Frames inside torch itself (and graphlrp's tracer) are skipped: the last frame outside torch is the user's."""
    lines = [ln.strip() for ln in (node.stack_trace or "").strip().splitlines() if ln.strip()]
    frames = []
    for i, ln in enumerate(lines):
        if ln.startswith("File "):
            code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else ""
            frames.append((ln[len("File "):].replace('"', ""), code))
    torch_dir = os.path.dirname(torch.__file__)
    user = [f for f in frames if not f[0].startswith(torch_dir) and not f[0].startswith(_TRACE_FILE)]
    if not user:
        return ""
    where, code = user[-1]
    return f"{where}: {code}" if code else where


def drop_dead_nodes(graph: fx.Graph) -> int:
    """fx's `Graph.eliminate_dead_code`, the same nodes removed, at a fraction of its cost on a large graph: it
    lints the whole graph first and asks every node whether it is impure (a schema lookup), where only a node that
    nobody reads can go (Sequencer2D-L's unrolled explainer: rewriting took 42 s instead of 50 s, one run each of
    tools/memory_stages.py). Returns how many went."""
    dropped = 0
    for node in reversed(graph.nodes):
        if node.op not in ("placeholder", "output") and not node.users and not node.is_impure():
            graph.erase_node(node)
            dropped += 1
    return dropped


def describe_node(node: fx.Node) -> str:
    """`name (op target)` plus the source line where fx knows it; used in every user-facing error."""
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    if node.op == "call_module":  # the module's class says what it is where its attribute name does not
        try:
            target = f"{target}: {type(node.graph.owning_module.get_submodule(node.target)).__name__}"
        except AttributeError:  # a graph without its module (owning_module None) or a stale target
            pass
    text = f"node '{node.name}' ({node.op} {target})"
    where = source_line(node)
    return f"{text} at {where}" if where else text


def call_on_meta(module, args, kwargs):
    """module(*args) with its parameters and buffers on the meta device: shapes without arithmetic."""
    if isinstance(module, torch.nn.RNNBase):
        shapes = _rnn_shapes(module, *args, **kwargs)
        if shapes is not None:
            return shapes
    state = {k: v.to("meta") for k, v in list(module.named_parameters()) + list(module.named_buffers())}
    return torch.func.functional_call(module, state, tuple(args), kwargs)


def _rnn_shapes(module: torch.nn.RNNBase, input=None, hx=None):
    """(output, h_n) or (output, (h_n, c_n)) of an RNN on a batched meta input, as empty meta tensors: PyTorch runs
    an LSTM on the meta device through its step-by-step decomposition (seconds per layer of an unrolled Sequencer);
    the shapes follow from the module's sizes alone. None where the input is not a plain batched tensor."""
    if not isinstance(input, torch.Tensor) or input.dim() != 3:
        return None
    batch = input.shape[0 if module.batch_first else 1]
    steps = input.shape[1 if module.batch_first else 0]
    directions = 2 if module.bidirectional else 1
    out_size = getattr(module, "proj_size", 0) or module.hidden_size
    like = dict(device="meta", dtype=input.dtype)
    output = torch.empty((batch, steps, directions * out_size) if module.batch_first
                         else (steps, batch, directions * out_size), **like)
    h_n = torch.empty(directions * module.num_layers, batch, out_size, **like)
    if isinstance(module, torch.nn.LSTM):
        return output, (h_n, torch.empty(directions * module.num_layers, batch, module.hidden_size, **like))
    return output, h_n


class MetaResults:
    """Results of ops on the meta device remembered by their inputs' metadata: there an op's output depends on
    nothing else, and PyTorch works many meta outputs out in Python (a linear on a 3-d input: 0.5 ms), so an
    unrolled LSTM's thousands of equal steps are worked out once. Each call returns fresh tensors."""

    def __init__(self):
        self.results: dict = {}

    def __call__(self, target, args, kwargs, run):
        """run(target, args, kwargs), or the remembered result of an earlier call with equal metadata."""
        name = target if isinstance(target, str) else getattr(target, "__name__", "")
        if name.endswith("_") or target is operator.setitem:  # in place: it changes its input's metadata
            return run(target, args, kwargs)
        try:
            key = (target, metadata_key(args), metadata_key(kwargs))
            hash(key)
        except TypeError:  # an argument that is not plain metadata
            return run(target, args, kwargs)
        if key not in self.results:
            self.results[key] = run(target, args, kwargs)
        return torch.utils._pytree.tree_map(_fresh_meta, self.results[key])


def metadata_key(value):
    """A hashable description of an op's argument on the meta device: all its output can depend on. TypeError
    where the argument is something else (a tensor off the meta device, an arbitrary object)."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "meta":
            raise TypeError("a tensor off the meta device")
        return ("tensor", tuple(value.shape), tuple(value.stride()), value.dtype)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(metadata_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, metadata_key(v)) for k, v in value.items()))
    if isinstance(value, slice):
        return ("slice", metadata_key(value.start), metadata_key(value.stop), metadata_key(value.step))
    if value is None or value is Ellipsis or isinstance(value, (bool, int, float, str, torch.dtype, torch.device,
                                                                torch.memory_format, torch.layout)):
        return (type(value).__name__, value)  # 2 and 2.0 give outputs of different dtypes
    raise TypeError(f"not metadata: {type(value).__name__}")


def _fresh_meta(value):
    return (torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
            if isinstance(value, torch.Tensor) else value)


@dataclass
class Traced:
    """A functional, shape-annotated fx graph of the model plus the example input it was specialised on."""

    graph_module: fx.GraphModule
    example_input: torch.Tensor
    # call_module targets resolved so far: the analysis asks for the same modules many times (the search behind
    # attention weights alone made 120k lookups on iFormer-H); passes add submodules under new names, never
    # replace one under its name
    _modules: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    def module(self, node: fx.Node) -> torch.nn.Module:
        found = self._modules.get(node.target)
        if found is None:
            found = self._modules[node.target] = self.graph_module.get_submodule(node.target)
        return found

    def attr(self, node: fx.Node):
        """The tensor behind a get_attr node."""
        obj = self.graph_module
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return obj


def assign_slice(x: torch.Tensor, index, value) -> torch.Tensor:
    """x with x[index] = value, out of place: what `x[index] = value` computes, as a node of the traced graph
    (`graphlrp.trace` records item assignment so). Its relevance is a MOVE's (each output cell comes from x or from
    value); its ONNX converter writes a Where."""
    out = x.clone()
    out[index] = value
    return out
