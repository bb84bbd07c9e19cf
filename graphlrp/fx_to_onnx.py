"""torch.fx graph → ONNX, written directly: one small converter per op, registered by decorator.

The explainer's graph is graphlrp's own: the model's forward ops and the relevance pass's tensor ops (convolutions,
elementwise ops, pooling, scatter/gather, reshapes). `lower` runs the graph once on example inputs with an fx
Interpreter, so every converter sees the shapes and dtypes of its operands (and the run is the PyTorch side of the
export's parity check), and appends the ONNX nodes each fx node stands for. No torch.onnx exporter is involved.

Conventions:

* dim 0 of every input-dependent tensor is the batch. ONNX gets the symbolic size `batch` there, and reshapes copy
  it (Reshape target 0), so ONNX shape inference carries `batch` through the whole graph (onnxruntime keeps an
  elementwise op in its blocked NCHWc layout only where it can prove both operands have one shape).
* Values that do not depend on the inputs (parameters, buffers, what is computed from them alone) become
  initializers, each tensor once (equal tensors share one). A rule weight with a recipe (`graphlrp.derived`:
  W⁺ = max(W, 0), W⁻, flipped kernels, transposed matrices) becomes the recipe's ops on the stored tensor it
  derives from; onnxruntime folds those into constants when it creates a session.
* Adding an op: write `@converts(torch.fn, "method_name", nn.ModuleClass)` over a function
  `(g, *args, **kwargs) -> ONNX output name(s)` (module converters get the module first). Tensor operands arrive
  as `Value`s; `g.name(v)` gives the ONNX name of a Value or a Python number.
"""
from __future__ import annotations

import hashlib
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import derived
from .errors import ExportError
from .optimize import flipped_kernel
from .ops.layers import grouped_linear, grouped_linear_transposed
from .graph import MetaResults, assign_slice, describe_node

MIN_OPSET = 17  # ScatterElements(reduction="add") needs 16; converters emit the opset-17 forms or newer

_ONNX_TYPES = {torch.float32: 1, torch.uint8: 2, torch.int8: 3, torch.int32: 6, torch.int64: 7, torch.bool: 9,
               torch.float16: 10, torch.float64: 11}


def onnx_type(dtype: torch.dtype) -> int:
    if dtype not in _ONNX_TYPES:
        raise ExportError(f"no ONNX element type for {dtype}")
    return _ONNX_TYPES[dtype]


@dataclass
class Value:
    """A tensor of the graph being written: its ONNX name (None until a constant is first used), shape and dtype at
    the example inputs, whether dim 0 is the batch, and for constants the tensor (and its recipe)."""

    name: str | None
    shape: tuple
    dtype: torch.dtype
    batched: bool = False
    const: torch.Tensor | None = None
    recipe: derived.Recipe | None = None
    hint: str = "const"
    per_sample: bool = False  # const is one sample's value [1, ...]: the tensor is it expanded to the batch size

    @property
    def rank(self) -> int:
        return len(self.shape)


CONVERTERS: dict[Any, Callable] = {}


def converts(*targets):
    """Register a converter for functions, Tensor method names (strings) and nn.Module classes. A target may be
    registered once: a second converter for it raises (as onnx2torch's add_converter does) instead of silently
    replacing the first. Repeating a target within one call is fine (F.prelu is torch.prelu)."""

    def deco(fn):
        unique = []
        for t in targets:
            if t is not None and not any(t is u for u in unique):  # None: a torch function this build lacks
                unique.append(t)
        for t in unique:
            if t in CONVERTERS:
                raise ValueError(f"an ONNX converter for {_target_name(t)} is registered already "
                                 f"({CONVERTERS[t].__name__}); one converter per target")
        for t in unique:
            CONVERTERS[t] = fn
        return fn

    return deco


def _target_name(t) -> str:
    """A readable name: Tensor.<method>, torch.<fn>, F.<fn>, operator.<fn>, nn.<Module>, else module.qualname."""
    if isinstance(t, str):
        return f"Tensor.{t}"
    for prefix, namespace in (("nn", nn), ("F", F), ("torch", torch), ("operator", operator)):
        name = getattr(t, "__name__", None)
        if name and getattr(namespace, name, None) is t:
            return f"{prefix}.{name}"
        for alias in dir(namespace) if prefix in ("F", "nn") else ():  # F.max_pool2d is a boolean_dispatch fn
            if not alias.startswith("_") and getattr(namespace, alias, None) is t:
                return f"{prefix}.{alias}"
    return f"{getattr(t, '__module__', None) or ''}.{getattr(t, '__qualname__', None) or getattr(t, '__name__', t)}"


def _torch(name: str):
    """torch.<name>, or None where this torch build lacks it."""
    return getattr(torch, name, None)


def _linalg(name: str):
    """torch.linalg.<name>, or None where this torch build lacks it."""
    return getattr(torch.linalg, name, None)


def _converter(node: fx.Node, module):
    if node.op == "call_module":
        for cls in type(module).__mro__:
            if cls in CONVERTERS:
                return CONVERTERS[cls]
        return None
    return CONVERTERS.get(node.target)


class OnnxGraph:
    """The ONNX graph under construction: nodes, initializers (stored once each) and fresh names."""

    def __init__(self, opset: int, batch: int):
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.opset, self.batch = opset, batch
        self.nodes: list = []
        # (name, array) pairs, written into the ModelProto once at the end (`write_initializers`): a TensorProto
        # made here and added there would be copied by protobuf, and so would a GraphProto given to make_model
        self.initializers: list = []
        self._used_names: set = set()
        self._by_storage: dict = {}
        self._by_content: dict = {}
        self._scalars: dict = {}
        self._recipes: dict = {}  # id(recipe) -> ONNX name
        self.scope = "n"  # the fx node being converted: names its ONNX nodes
        self.out_shape: tuple = ()  # shape and dtype of its output in the example run
        self.out_dtype: torch.dtype = torch.float32
        self.out_batched = False  # whether its output's dim 0 holds the batch (B or k·B entries)
        self.out_probe_shape = None  # its output's shape at batch + 1 (which dims grow with the batch)
        self.batch_input: str | None = None  # the first input's name: where the run-time batch size is read
        self._batch_size: str | None = None

    # names -------------------------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        base = "".join(c if c.isalnum() or c in "._" else "_" for c in hint) or "v"
        name, i = base, 0
        while name in self._used_names:
            i += 1
            name = f"{base}_{i}"
        self._used_names.add(name)
        return name

    # nodes -------------------------------------------------------------------------------------------
    def op(self, op_type: str, inputs: list, outputs: int | None = None, **attrs):
        """Append one ONNX node; inputs are names, Values or numbers. Returns its output's name, or with `outputs`
        given the list of its `outputs` output names (a list even of one: a one-piece Split is still a sequence)."""
        names = [i if isinstance(i, str) else self.name(i) for i in inputs]
        outs = [self.fresh(f"{self.scope}_{op_type}") for _ in range(1 if outputs is None else outputs)]
        self.nodes.append(self.helper.make_node(op_type, names, outs, name=self.fresh(f"{self.scope}/{op_type}"),
                                                **{k: v for k, v in attrs.items() if v is not None}))
        return outs[0] if outputs is None else outs

    def name(self, v, dtype: torch.dtype = torch.float32) -> str:
        """ONNX name of a Value (materialising a constant on first use) or of a Python number as a scalar of
        `dtype`."""
        if isinstance(v, Value):
            if v.name is None:
                v.name = self._materialise(v)
            return v.name
        if isinstance(v, (bool, int, float)):
            return self.scalar(v, dtype)
        raise ExportError(f"cannot use {type(v).__name__} {v!r} as a tensor operand")

    def scalar(self, v, dtype: torch.dtype) -> str:
        key = (repr(v), dtype)
        if key not in self._scalars:
            self._scalars[key] = self.tensor(torch.tensor(v, dtype=dtype), "scalar")
        return self._scalars[key]

    def ints(self, values) -> str:
        return self.tensor(torch.tensor([int(v) for v in values], dtype=torch.int64), "ints")

    def tensor(self, t: torch.Tensor, hint: str) -> str:
        """An initializer holding `t`; a tensor equal to one stored before gets that one's name."""
        t = t.detach()
        storage = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype) if t.numel() else None
        if storage is not None and storage in self._by_storage:
            return self._by_storage[storage][0]
        array = t.cpu().contiguous().numpy()
        content = (array.dtype.str, array.shape, hashlib.blake2b(array.tobytes(), digest_size=20).digest())
        name = self._by_content.get(content)
        if name is None:
            name = self.fresh(hint)
            self.initializers.append((name, array))
            self._by_content[content] = name
        if storage is not None:
            self._by_storage[storage] = (name, t)  # holding t: its address is not reused while we key on it
        return name

    def _materialise(self, v: Value) -> str:
        if v.per_sample:
            scope, self.scope = self.scope, v.hint
            target = self.op("Concat", [self.batch_size(), self.ints(list(v.shape[1:]))], axis=0)
            name = self.op("Expand", [self.tensor(v.const, v.hint), target])
            self.scope = scope
            return name
        if v.recipe is None:
            return self.tensor(v.const, v.hint)
        key = id(v.recipe)
        if key not in self._recipes:
            r = v.recipe
            base = constant(r.base, "weight")
            args = [constant(a) if isinstance(a, torch.Tensor) else a for a in r.args]  # e.g. W + γ·W⁺
            scope, self.scope = self.scope, v.hint
            try:
                out = CONVERTERS[r.fn](self, base, *args, **(r.kwargs or {}))
            finally:
                self.scope = scope
            self._recipes[key] = out
        return self._recipes[key]

    # helpers shared by converters ----------------------------------------------------------------------
    def batch_size(self) -> str:
        """The batch size of the first input at run time, as a 1-element int64 tensor (computed once)."""
        if self._batch_size is None:
            scope, self.scope = self.scope, "batch_size"
            shape = self.op("Shape", [self.batch_input])
            self._batch_size = self.op("Slice", [shape, self.ints([0]), self.ints([1])])
            self.scope = scope
        return self._batch_size

    def cast(self, v, dtype: torch.dtype) -> str:
        if isinstance(v, Value) and v.dtype != dtype:
            return self.op("Cast", [v], to=onnx_type(dtype))
        return self.name(v, dtype)

    def reduce(self, op_type: str, x: Value, axes, keepdims: bool) -> str:
        axes = sorted(a % x.rank for a in axes)
        if op_type == "ReduceSum" or self.opset >= 18:
            return self.op(op_type, [x, self.ints(axes)], keepdims=int(keepdims))
        return self.op(op_type, [x], axes=axes, keepdims=int(keepdims))

    def shape_target(self, x: Value, shape) -> str:
        """A Reshape target for `shape` that copies the batch size from x (0) where x's dim 0 is the batch."""
        shape = list(shape)
        grows = ([i for i, (a, b) in enumerate(zip(shape, self.out_probe_shape)) if a != b]
                 if self.out_probe_shape is not None and len(self.out_probe_shape) == len(shape) else None)
        if x.batched and shape and shape[0] == x.shape[0]:
            shape[0] = 0
        elif x.batched and shape and self.out_batched and all(s > 0 for s in shape[1:]):
            shape[0] = -1  # B·k entries become B·k' (Swin's windows in and out of dim 0), batch-major
        elif grows is not None and len(grows) == 1:
            shape[grows[0]] = -1  # the batch in another dim (SAM's qkv: [3, B·heads, N, d]): that dim is inferred
        elif x.batched or grows:
            raise ExportError(f"a reshape of {tuple(x.shape)} to {tuple(shape)} fixes the batch size or spreads the "
                              "batch over several dims; the exported graph would only run at the batch size it was "
                              "written with")
        return self.ints(shape)


def constant(t: torch.Tensor, hint: str = "const") -> Value:
    return Value(None, tuple(t.shape), t.dtype, False, t, derived.recipe(t), hint)


# ------------------------------------------------------------------------------------------ lowering
_UNPROBED = object()


class _Lowering(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, g: OnnxGraph, input_names: list):
        super().__init__(gm)
        self.g, self.input_names = g, list(input_names)
        self.values: dict = {}
        self.dynamic: set = set()
        self.sizes: set = set()  # non-tensor values read from input-dependent tensors (sizes)
        self.per_sample: set = set()  # batch-shaped tensors made from sizes alone, equal for every sample
        self.probe: dict = {}  # node -> dim 0 at batch + 1 (`_probe_batch`)
        self.probe_shapes: dict = {}  # node -> its full shape at batch + 1
        self._placeholders = 0

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        try:
            self.values[n] = self._lower(n, result)
        except ExportError as e:
            raise ExportError(f"{describe_node(n)}: {e}") from e
        except Exception as e:  # a converter that does not fit this use of the op
            raise ExportError(f"{describe_node(n)}: cannot write it as ONNX: {type(e).__name__}: {e}") from e
        return result

    def _lower(self, n: fx.Node, result):
        g = self.g
        if n.op == "placeholder":
            name = self.input_names[self._placeholders]
            self._placeholders += 1
            g._used_names.add(name)
            g.batch_input = g.batch_input or name
            self.dynamic.add(n)
            return Value(name, tuple(result.shape), result.dtype, True)
        if n.op == "output":
            return fx.node.map_arg(n.args[0], lambda a: self.values[a])
        # a derived weight the explainer computes from its base (`rewrite.Emitter`): written as the same ops, so the
        # file stores the base alone, as it does for a derived weight held as a buffer with its recipe
        dynamic = any(a in self.dynamic for a in n.all_input_nodes) or bool(n.meta.get("derived_weight"))
        if not isinstance(result, torch.Tensor):
            if dynamic and isinstance(result, (tuple, list)) and any(isinstance(r, torch.Tensor) for r in result):
                pass  # a multi-output op (max-pool with indices, split): converted below
            else:
                if dynamic or any(a in self.sizes for a in n.all_input_nodes):
                    self.sizes.add(n)
                return result  # sizes, shapes, flags: compile-time values
        if not dynamic and isinstance(result, torch.Tensor) and result.dim() and result.shape[0] == g.batch \
                and any(a in self.sizes or a in self.per_sample for a in n.all_input_nodes):
            if g.batch > 1 and bool((result == result[:1]).all()):
                # made from the batch size alone, the same for every sample (EdgeNeXt's zeros((B, H, W)) and the
                # Fourier position code computed from it): one sample's value, expanded to the batch size where used
                self.per_sample.add(n)
                return Value(None, tuple(result.shape), result.dtype, True, result[:1].contiguous(), hint=n.name,
                             per_sample=True)
            dynamic = True  # a constant expanded to the input's batch size (a class token): written, not folded
        if not dynamic:
            if n.op == "get_attr":
                return Value(None, tuple(result.shape), result.dtype, False, result,
                             n.meta.get("recipe"), n.target)
            if isinstance(result, torch.Tensor):
                return constant(result, n.name)  # computed from constants alone: folded here
            return tuple(constant(r, f"{n.name}_{i}") if isinstance(r, torch.Tensor) else r
                         for i, r in enumerate(result))
        self.dynamic.add(n)
        module = self.fetch_attr(n.target) if n.op == "call_module" else None
        fn = _converter(n, module)
        if fn is None:
            what = type(module).__name__ if module is not None else \
                getattr(n.target, "__name__", str(n.target))
            raise ExportError(f"no ONNX converter for {n.op} {what}; add one with @converts in "
                              "graphlrp/fx_to_onnx.py")
        args = fx.node.map_arg(n.args, lambda a: self.values[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: self.values[a])
        g.scope = str(n.target) if n.op == "call_module" else n.name
        probe = self.probe.get(n, _UNPROBED)
        if isinstance(result, torch.Tensor):
            g.out_shape, g.out_dtype = tuple(result.shape), result.dtype
            g.out_batched = self._batched(result, probe)
            g.out_probe_shape = self.probe_shapes.get(n)
        out = fn(g, module, *args, **kwargs) if module is not None else fn(g, *args, **kwargs)
        return self._wrap(out, result, probe)

    def _batched(self, result: torch.Tensor, probe) -> bool:
        """Whether dim 0 of `result` holds the batch: B entries, or k·B (B-major) where the probe at batch B + 1
        has k·(B + 1)."""
        if result.dim() == 0:
            return False
        b, n = self.g.batch, result.shape[0]
        if not isinstance(probe, int):
            return n == b
        return n % b == 0 and probe == n // b * (b + 1)

    def _wrap(self, out, result, probe=None):
        if isinstance(out, Value):
            return out
        if isinstance(result, torch.Tensor):
            if not isinstance(out, str):
                raise ExportError(f"converter returned {type(out).__name__}, expected one ONNX name")
            return Value(out, tuple(result.shape), result.dtype, self._batched(result, probe))
        if not isinstance(out, (tuple, list)) or len(out) != len(result):
            got = f"{len(out)} outputs" if isinstance(out, (tuple, list)) else f"one {type(out).__name__}"
            raise ExportError(f"converter returned {got} for a result of {len(result)}")  # not zipped: a str's
            # characters would pass for names
        probes = probe if isinstance(probe, (tuple, list)) and len(probe) == len(result) else [_UNPROBED] * len(result)
        return tuple(self._wrap(o, r, p) for o, r, p in zip(out, result, probes))


class _BatchProbe(fx.Interpreter):
    """The graph run on the meta device (shapes only) at batch + 1: dim 0 of each tensor there tells whether the
    tensor's dim 0 holds the batch, k·B entries for a fixed k (Swin's B·windows), or no batch at all."""

    def __init__(self, gm):
        super().__init__(gm)
        self.dim0: dict = {}
        self.shapes: dict = {}  # node -> its tensor's full shape at batch + 1
        self.remembered = MetaResults()  # an unrolled LSTM's equal steps: shapes worked out once

    def run_node(self, n):
        try:
            result = super().run_node(n)
        except Exception:  # an op without a meta kernel: its tensors keep the plain rule (dim 0 == batch)
            return None
        self.dim0[n] = fx.node.map_aggregate(
            result, lambda r: (r.shape[0] if r.dim() else None) if isinstance(r, torch.Tensor) else None)
        if isinstance(result, torch.Tensor):
            self.shapes[n] = tuple(result.shape)
        return result

    def get_attr(self, target, args, kwargs):
        v = super().get_attr(target, args, kwargs)
        return v.to("meta") if isinstance(v, torch.Tensor) else v

    @staticmethod
    def _on_meta(args, kwargs):
        """A tensor the graph made on the CPU (torch.arange(H) from a traced size, EdgeNeXt's zeros((B, H, W))
        .to(device=x.device)) meets meta tensors here: it goes to the meta device too, and so does a device
        argument."""

        def move(v):
            if isinstance(v, torch.Tensor) and v.device.type != "meta":
                return v.to("meta")
            return torch.device("meta") if isinstance(v, torch.device) else v

        kwargs = dict(kwargs)
        if "device" in kwargs:
            kwargs["device"] = "meta"
        return fx.node.map_aggregate(args, move), fx.node.map_aggregate(kwargs, move)

    def call_function(self, target, args, kwargs):
        return self.remembered(target, *self._on_meta(args, kwargs), super().call_function)

    def call_method(self, target, args, kwargs):
        return self.remembered(target, *self._on_meta(args, kwargs), super().call_method)

    def call_module(self, target, args, kwargs):
        from .graph import call_on_meta

        return call_on_meta(self.fetch_attr(target), args, kwargs)


def _probe_batch(gm: fx.GraphModule, inputs: tuple) -> dict:
    probe = _BatchProbe(gm)
    try:
        with torch.no_grad():
            probe.run(*(torch.empty((x.shape[0] + 1, *x.shape[1:]), dtype=x.dtype, device="meta") for x in inputs))
    except Exception:
        pass
    return probe


def lower(gm: fx.GraphModule, inputs: tuple, input_names: list, output_names: list, opset: int = 17):
    """Write `gm` as an ONNX ModelProto with dim 0 of the inputs symbolic (`batch`). Returns (model, outputs):
    the outputs of the example run, flattened in the order of `output_names`."""
    from onnx import helper

    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is not supported; graphlrp writes opset {MIN_OPSET} or newer")
    batch = int(inputs[0].shape[0])
    g = OnnxGraph(opset, batch)
    lowering = _Lowering(gm, g, input_names)
    probe = _probe_batch(gm, inputs)
    lowering.probe, lowering.probe_shapes = probe.dim0, probe.shapes
    with torch.no_grad():
        results = lowering.run(*inputs)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    values = lowering.values[out_node]
    flat_values, flat_results = [], []
    fx.node.map_aggregate(values, lambda v: flat_values.append(v) if isinstance(v, Value) else None)
    fx.node.map_aggregate(results, lambda r: flat_results.append(r) if isinstance(r, torch.Tensor) else None)
    if len(flat_values) != len(output_names):
        raise ExportError(f"the graph has {len(flat_values)} tensor outputs, expected {len(output_names)}")

    def info(name, v: Value):
        dims = ["batch" if (i == 0 and v.batched and d == batch) else d for i, d in enumerate(v.shape)]
        return helper.make_tensor_value_info(name, onnx_type(v.dtype), dims)

    graph_inputs = [info(name, lowering.values[n]) for name, n in
                    zip(input_names, (n for n in gm.graph.nodes if n.op == "placeholder"))]
    renames = {}
    for v, name in zip(flat_values, output_names):
        src = g.name(v)
        produced = any(src in n.output for n in g.nodes)
        if produced and src not in renames and src not in input_names:
            renames[src] = name
        else:
            g.nodes.append(helper.make_node("Identity", [src], [name], name=f"{name}_identity"))
    for node in g.nodes:
        for i, x in enumerate(node.input):
            if x in renames:
                node.input[i] = renames[x]
        for i, x in enumerate(node.output):
            if x in renames:
                node.output[i] = renames[x]
    graph_outputs = [info(name, v) for v, name in zip(flat_values, output_names)]
    used = {i for n in g.nodes for i in n.input}
    graph = helper.make_graph(g.nodes, "graphlrp", graph_inputs, graph_outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="graphlrp")
    del graph
    model.ir_version = min(model.ir_version, _max_ir_version(opset))
    write_initializers(model.graph, [(name, array) for name, array in g.initializers if name in used])
    return model, [r.detach() for r in flat_results]


def write_initializers(graph, arrays) -> None:
    """Append each (name, numpy array) to `graph.initializer` as a TensorProto filled in place: the weights are
    held once, in the proto, instead of once per TensorProto made on the side and again per copy protobuf makes
    when one is added to a graph (three copies of every weight at the peak of a lowering before)."""
    from onnx import helper, numpy_helper

    for name, array in arrays:
        tensor = graph.initializer.add()
        if array.dtype.kind in "fiu" and array.dtype.byteorder in "=<|":
            tensor.name = name
            tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
            tensor.dims.extend(array.shape)
            tensor.raw_data = array.tobytes()
        else:  # bool and anything else: onnx's own conversion
            tensor.CopyFrom(numpy_helper.from_array(array, name))


def _max_ir_version(opset: int) -> int:
    """The IR version that goes with the opset (onnx.helper's table), so older onnxruntimes accept the file."""
    from onnx import helper

    table = getattr(helper, "VERSION_TABLE", [])
    ir = [row[1] for row in table if row[2] == opset]
    return min(ir) if ir else 8


# ------------------------------------------------------------------------------------------ converters
def _dummy(v) -> torch.Tensor:
    if isinstance(v, Value):
        return torch.empty(v.shape if v.rank == 0 else (1,) * v.rank, dtype=v.dtype)
    return v


def _compute_dtype(*operands) -> torch.dtype:
    """The dtype PyTorch computes an elementwise op in (its type promotion, Python numbers included)."""
    acc = _dummy(operands[0])
    for o in operands[1:]:
        o = _dummy(o)
        dtype = torch.result_type(acc, o)
        dims = any(isinstance(t, torch.Tensor) and t.dim() > 0 for t in (acc, o))
        acc = torch.empty((1,) if dims else (), dtype=dtype)
    return acc.dtype if isinstance(acc, torch.Tensor) else torch.tensor(acc).dtype


def _binary(op_type: str):
    def convert(g, a, b, *, alpha=1, out=None):
        dtype = _compute_dtype(a, b)
        if alpha != 1:
            b = g.op("Mul", [g.cast(b, dtype), g.scalar(alpha, dtype)])
            return g.op(op_type, [g.cast(a, dtype), b])
        return g.op(op_type, [g.cast(a, dtype), g.cast(b, dtype)])

    return convert


converts(torch.add, operator.add, "add")(_binary("Add"))
converts(torch.sub, operator.sub, "sub")(_binary("Sub"))
converts(torch.mul, operator.mul, "mul")(_binary("Mul"))
converts(torch.div, operator.truediv, "div")(_binary("Div"))
converts(torch.maximum)(_binary("Max"))
converts(torch.minimum)(_binary("Min"))


def _compare(op_type: str, negate: bool = False):
    def convert(g, a, b):
        dtype = _compute_dtype(a, b)
        out = g.op(op_type, [g.cast(a, dtype), g.cast(b, dtype)])
        return g.op("Not", [out]) if negate else out

    return convert


converts(torch.lt, operator.lt, "lt")(_compare("Less"))
converts(torch.le, operator.le, "le")(_compare("LessOrEqual"))
converts(torch.gt, operator.gt, "gt")(_compare("Greater"))
converts(torch.ge, operator.ge, "ge")(_compare("GreaterOrEqual"))
converts(torch.eq, operator.eq, "eq")(_compare("Equal"))
converts(torch.ne, operator.ne, "ne")(_compare("Equal", negate=True))


@converts(torch.where)
def _where(g, cond, a, b):
    dtype = _compute_dtype(a, b)
    return g.op("Where", [g.cast(cond, torch.bool), g.cast(a, dtype), g.cast(b, dtype)])


@converts(torch.masked_fill, "masked_fill")
def _masked_fill(g, x, mask, value):
    """x with `value` where mask is true (an attention mask filled with -inf)."""
    fill = g.cast(value, x.dtype) if isinstance(value, Value) else g.scalar(float(value), x.dtype)
    return g.op("Where", [g.cast(mask, torch.bool), fill, x])


def _unary(op_type: str, **attrs):
    def convert(g, x, *args, **kwargs):
        return g.op(op_type, [x], **attrs)

    return convert


converts(torch.abs, "abs")(_unary("Abs"))
converts(torch.exp, "exp")(_unary("Exp"))
converts(torch.neg, operator.neg, "neg")(_unary("Neg"))
converts(torch.sqrt, "sqrt")(_unary("Sqrt"))
converts(torch.tanh, "tanh", nn.Tanh)(lambda g, *a, **k: g.op("Tanh", [_input_of(a)]))
converts(torch.sigmoid, "sigmoid", nn.Sigmoid)(lambda g, *a, **k: g.op("Sigmoid", [_input_of(a)]))
converts(torch.relu, F.relu, "relu", nn.ReLU)(lambda g, *a, **k: g.op("Relu", [_input_of(a)]))


def _input_of(args) -> Value:
    """The tensor operand of an activation called as a function, method or module (module first)."""
    return args[1] if isinstance(args[0], nn.Module) else args[0]


@converts(torch.clamp, "clamp", _torch("clip"), "clip")
def _clamp(g, x, min=None, max=None):
    if isinstance(min, Value) or isinstance(max, Value):
        out = x
        if min is not None:
            out = g.op("Max", [out, g.cast(min, x.dtype)])
        if max is not None:
            out = g.op("Min", [out, g.cast(max, x.dtype)])
        return out
    if min == 0 and max is None:
        return g.op("Relu", [x])
    return g.op("Clip", [x, "" if min is None else g.scalar(min, x.dtype),
                         "" if max is None else g.scalar(max, x.dtype)])


@converts(nn.LeakyReLU, F.leaky_relu)
def _leaky_relu(g, *args, **kwargs):
    if isinstance(args[0], nn.Module):
        return g.op("LeakyRelu", [args[1]], alpha=float(args[0].negative_slope))
    return g.op("LeakyRelu", [args[0]], alpha=float(args[1] if len(args) > 1 else kwargs.get("negative_slope", 0.01)))


@converts(nn.ELU, F.elu)
def _elu(g, *args, **kwargs):
    if isinstance(args[0], nn.Module):
        return g.op("Elu", [args[1]], alpha=float(args[0].alpha))
    return g.op("Elu", [args[0]], alpha=float(args[1] if len(args) > 1 else kwargs.get("alpha", 1.0)))


@converts(nn.ReLU6, F.relu6)
def _relu6(g, *args, **kwargs):
    x = _input_of(args)
    return g.op("Clip", [x, g.scalar(0.0, x.dtype), g.scalar(6.0, x.dtype)])


@converts(nn.Hardswish, F.hardswish)
def _hardswish(g, *args, **kwargs):
    return g.op("HardSwish", [_input_of(args)])


@converts(nn.SiLU, F.silu)
def _silu(g, *args, **kwargs):
    x = _input_of(args)
    return g.op("Mul", [x, g.op("Sigmoid", [x])])


@converts(nn.GELU, F.gelu)
def _gelu(g, *args, approximate="none", **kwargs):
    if isinstance(args[0], nn.Module):
        approximate = args[0].approximate
    x = _input_of(args)
    if approximate == "tanh":  # 0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))
        inner = g.op("Mul", [g.op("Add", [x, g.op("Mul", [g.op("Mul", [g.op("Mul", [x, x]), x]),
                                                          g.scalar(0.044715, x.dtype)])]),
                             g.scalar(math.sqrt(2 / math.pi), x.dtype)])
        return g.op("Mul", [g.op("Mul", [x, g.scalar(0.5, x.dtype)]),
                            g.op("Add", [g.op("Tanh", [inner]), g.scalar(1.0, x.dtype)])])
    erf = g.op("Erf", [g.op("Mul", [x, g.scalar(1 / math.sqrt(2), x.dtype)])])
    return g.op("Mul", [g.op("Mul", [x, g.scalar(0.5, x.dtype)]), g.op("Add", [erf, g.scalar(1.0, x.dtype)])])


@converts(torch.softmax, F.softmax, "softmax")
def _softmax(g, x, dim=None, *args, **kwargs):
    return g.op("Softmax", [x], axis=int(dim))


@converts(torch.log_softmax, F.log_softmax, "log_softmax")
def _log_softmax(g, x, dim=None, *args, **kwargs):
    return g.op("LogSoftmax", [x], axis=int(dim))


@converts(torch.argmax, "argmax")
def _argmax(g, x, dim=None, keepdim=False):
    if dim is None:
        raise ExportError("argmax over all elements")
    return g.op("ArgMax", [x], axis=int(dim) % x.rank, keepdims=int(keepdim))


def _identity(g, x, *args, **kwargs):
    return _input_of((x, *args)) if isinstance(x, nn.Module) else x


converts(nn.Identity, nn.Dropout, nn.Dropout2d, F.dropout, "contiguous", "clone", "detach", torch.clone)(_identity)


@converts(torch.Tensor.to, "to", "float", "type_as", "long", "int", "bool")
def _to(g, x, *args, **kwargs):
    return g.cast(x, g.out_dtype) if g.out_dtype != x.dtype else x


# ------------------------------------------------------------------------------------------ shapes
def _reshape_to(g, x: Value, shape):
    return g.op("Reshape", [x, g.shape_target(x, shape)])


def _reshape(g, x, *args, **kwargs):
    """Every reshape spelling (view, flatten, reshape, ...): to the output shape of the example run."""
    return _reshape_to(g, x, g.out_shape)


converts(torch.reshape, torch.flatten, "view", "reshape", "flatten", "view_as", "reshape_as",
         nn.Flatten, nn.Unflatten)(lambda g, *a, **k: _reshape(g, _input_of(a)))


@converts(torch.unsqueeze, "unsqueeze")
def _unsqueeze(g, x, dim):
    return g.op("Unsqueeze", [x, g.ints([dim % (x.rank + 1)])])


@converts(torch.squeeze, "squeeze")
def _squeeze(g, x, dim=None):
    if dim is None:
        dims = [i for i, s in enumerate(x.shape) if s == 1 and not (i == 0 and x.batched)]
    else:
        dims = [d % x.rank for d in (dim if isinstance(dim, (tuple, list)) else (dim,)) if x.shape[d] == 1]
    return g.op("Squeeze", [x, g.ints(dims)]) if dims else x


@converts(torch.permute, "permute")
def _permute(g, x, *dims):
    dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
    return g.op("Transpose", [x], perm=[d % x.rank for d in dims])


@converts(torch.transpose, "transpose", torch.swapaxes, "swapaxes", torch.swapdims, "swapdims")
def _transpose(g, x, dim0, dim1):
    perm = list(range(x.rank))
    perm[dim0 % x.rank], perm[dim1 % x.rank] = perm[dim1 % x.rank], perm[dim0 % x.rank]
    return g.op("Transpose", [x], perm=perm)


@converts(torch.t, "t")
def _t(g, x):
    return g.op("Transpose", [x], perm=[1, 0]) if x.rank == 2 else x


@converts(torch.flip, "flip")
def _flip(g, x, dims):
    dims = [d % x.rank for d in (dims if isinstance(dims, (tuple, list)) else (dims,))]
    big = np.iinfo(np.int64).max
    return g.op("Slice", [x, g.ints([-1] * len(dims)), g.ints([-big] * len(dims)), g.ints(dims),
                          g.ints([-1] * len(dims))])


@converts(flipped_kernel)
def _flipped_kernel(g, w: Value, groups: int):
    """The conv weight of a stride-1 transposed convolution: channels swapped per group, spatially flipped."""
    cout, cin_g, kh, kw = w.shape
    if groups == 1:
        swapped = g.op("Transpose", [w], perm=[1, 0, 2, 3])
    else:
        five = g.op("Reshape", [w, g.ints([groups, cout // groups, cin_g, kh, kw])])
        five = g.op("Transpose", [five], perm=[0, 2, 1, 3, 4])
        swapped = g.op("Reshape", [five, g.ints([groups * cin_g, cout // groups, kh, kw])])
    big = np.iinfo(np.int64).max
    return g.op("Slice", [swapped, g.ints([-1, -1]), g.ints([-big, -big]), g.ints([2, 3]), g.ints([-1, -1])])


@converts(torch.Tensor.expand, "expand")
def _expand(g, x, *sizes):
    sizes = sizes[0] if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)) else sizes
    target = [1 if (i == 0 and x.batched) or s == -1 else s for i, s in enumerate(sizes)]
    if not x.batched and g.batch != 1 and sizes and sizes[0] == g.batch and len(sizes) == x.rank \
            and x.shape[0] == 1:  # a constant (class token) expanded to the batch size: the input's, at run time
        return g.op("Expand", [x, g.op("Concat", [g.batch_size(), g.ints(target[1:])], axis=0)])
    return g.op("Expand", [x, g.ints(target)])


@converts(torch.sum, "sum")
def _sum(g, x, dim=None, keepdim=False, dtype=None):
    dims = range(x.rank) if dim is None else (dim if isinstance(dim, (tuple, list)) else (dim,))
    return g.reduce("ReduceSum", x, dims, keepdim)


@converts(torch.mean, "mean")
def _mean(g, x, dim=None, keepdim=False, dtype=None):
    dims = range(x.rank) if dim is None else (dim if isinstance(dim, (tuple, list)) else (dim,))
    return g.reduce("ReduceMean", x, dims, keepdim)


@converts(_torch("amax"), "amax")
def _amax(g, x, dim=(), keepdim=False):
    dims = range(x.rank) if dim in ((), None) else (dim if isinstance(dim, (tuple, list)) else (dim,))
    return g.reduce("ReduceMax", x, dims, keepdim)


@converts(torch.cat, _torch("concat"), "cat")
def _cat(g, tensors, dim=0):
    dtype = _compute_dtype(*tensors)
    return g.op("Concat", [g.cast(t, dtype) for t in tensors], axis=int(dim) % tensors[0].rank)


@converts(torch.stack)
def _stack(g, tensors, dim=0):
    axis = int(dim) % (tensors[0].rank + 1)
    return g.op("Concat", [g.op("Unsqueeze", [t, g.ints([axis])]) for t in tensors], axis=axis)


@converts(torch.split, "split")
def _split(g, x, split_size_or_sections, dim=0):
    dim = dim % x.rank
    size = x.shape[dim]
    if isinstance(split_size_or_sections, int):
        sizes = [split_size_or_sections] * (size // split_size_or_sections)
        if size % split_size_or_sections:
            sizes.append(size % split_size_or_sections)
    else:
        sizes = list(split_size_or_sections)
    return g.op("Split", [x, g.ints(sizes)], outputs=len(sizes), axis=dim)


@converts(torch.narrow, "narrow")
def _narrow(g, x, dim, start, length):
    dim = dim % x.rank
    start = start % x.shape[dim]
    return g.op("Slice", [x, g.ints([start]), g.ints([start + length]), g.ints([dim])])


@converts(operator.getitem)
def _getitem(g, x, index):
    if isinstance(x, (tuple, list)):
        return x[index]
    index = list(index) if isinstance(index, tuple) else [index]
    if Ellipsis in index:
        i = index.index(Ellipsis)
        rest = sum(e is not None for e in index) - 1
        index[i:i + 1] = [slice(None)] * (x.rank - rest)
    arrays = [i for i, e in enumerate(index) if isinstance(e, (Value, list, torch.Tensor))]
    if arrays:  # one constant 1-d integer index among full slices (CSATv2's x[:, :, self.permutation]): a Gather
        full = all(isinstance(e, slice) and e == slice(None) for i, e in enumerate(index) if i not in arrays)
        e = index[arrays[0]] if len(arrays) == 1 else None
        t = e.const if isinstance(e, Value) else (torch.as_tensor(e) if e is not None else None)
        if not full or t is None or t.dim() != 1 or t.dtype in (torch.bool, torch.uint8) or t.is_floating_point():
            raise ExportError("advanced indexing other than one constant 1-d integer index among full slices")
        d = arrays[0]
        if d == 0 and x.batched:
            raise ExportError("indexing the batch dimension")
        return g.op("Gather", [x, g.tensor(t.long() % x.shape[d], "index")], axis=d)
    starts, ends, axes, steps, squeeze, unsqueeze = [], [], [], [], [], []
    d = 0  # input dim
    out_d = 0  # output dim (after ints drop out and Nones add)
    for e in index:
        if e is None:
            unsqueeze.append(out_d)
            out_d += 1
            continue
        size = x.shape[d]
        if isinstance(e, bool) or not isinstance(e, (int, slice)):
            raise ExportError(f"indexing with {e!r}")
        if isinstance(e, int):
            i = e % size
            starts.append(i), ends.append(i + 1), axes.append(d), steps.append(1)
            squeeze.append(d)
        else:
            start, stop, step = e.indices(size)
            if (start, stop, step) != (0, size, 1):
                if d == 0 and x.batched:
                    raise ExportError("slicing the batch dimension")
                starts.append(start), ends.append(stop), axes.append(d), steps.append(step)
            out_d += 1
        d += 1
    out = x
    if axes:
        out = g.op("Slice", [out, g.ints(starts), g.ints(ends), g.ints(axes), g.ints(steps)])
    if squeeze:
        out = g.op("Squeeze", [out, g.ints(squeeze)])
    if unsqueeze:
        out = g.op("Unsqueeze", [out, g.ints(unsqueeze)])
    return out


@converts(assign_slice)
def _assign_slice(g, x, index, value):
    """x[index] = value out of place, for basic slices of step 1 (the batch dim whole): value padded into x's shape,
    then Where(region, padded, x) with the region a constant mask broadcast over the batch."""
    index = list(index) if isinstance(index, tuple) else [index]
    if Ellipsis in index:
        i = index.index(Ellipsis)
        index[i:i + 1] = [slice(None)] * (x.rank - len(index) + 1)
    index += [slice(None)] * (x.rank - len(index))
    bounds = []
    for d, (e, size) in enumerate(zip(index, x.shape)):
        if not isinstance(e, slice) or e.indices(size)[2] != 1:
            raise ExportError(f"item assignment with index {e!r}")
        start, stop, _ = e.indices(size)
        if d == 0 and x.batched and (start, stop) != (0, size):
            raise ExportError("item assignment into part of the batch")
        bounds.append((start, stop))
    region = [b - a for a, b in bounds]
    if not isinstance(value, Value) or list(value.shape) != region:
        raise ExportError(f"item assignment of a value that is not of the slice's shape {tuple(region)}")
    mask = torch.zeros((1, *x.shape[1:]) if x.batched else tuple(x.shape), dtype=torch.bool)
    mask[tuple(slice(a, b) for a, b in bounds)] = True
    padded = g.op("Pad", [value, g.ints([a for a, _ in bounds] + [size - b for (_, b), size in zip(bounds, x.shape)]),
                          g.scalar(0.0, x.dtype)], mode="constant")
    return g.op("Where", [g.tensor(mask, "region"), padded, x])


@converts(torch.zeros_like)
def _zeros_like(g, x, *args, **kwargs):
    """Zeros of x's shape: Where(true, 0, x). Unlike x·0 it is 0 where x is inf or NaN, and unlike
    ConstantOfShape(Shape(x)) ONNX shape inference keeps x's symbolic batch size."""
    dtype = kwargs.get("dtype") or x.dtype
    return g.op("Where", [g.scalar(True, torch.bool), g.scalar(0, dtype), g.cast(x, dtype)])


@converts(torch.ones_like)
def _ones_like(g, x, *args, **kwargs):
    dtype = kwargs.get("dtype") or x.dtype
    return g.op("Where", [g.scalar(True, torch.bool), g.scalar(1, dtype), g.cast(x, dtype)])


def _new_tensor(g, x, sizes, fill, dtype=None):
    """x.new_ones(sizes) and kin: a tensor of the given sizes filled with `fill`; a first size equal to the batch
    of a batched x is the input's batch size at run time."""
    sizes = list(sizes[0] if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)) else sizes)
    dtype = dtype or x.dtype
    value = g.helper.make_tensor("value", onnx_type(dtype), [1], [fill])
    if x.batched and sizes and sizes[0] == g.batch:
        shape = g.op("Concat", [g.batch_size(), g.ints(sizes[1:])], axis=0)
    else:
        shape = g.ints(sizes)
    return g.op("ConstantOfShape", [shape], value=value)


@converts("new_ones")
def _new_ones(g, x, *sizes, dtype=None, device=None, requires_grad=False, **_):
    return _new_tensor(g, x, sizes, 1, dtype)


@converts("new_zeros")
def _new_zeros(g, x, *sizes, dtype=None, device=None, requires_grad=False, **_):
    return _new_tensor(g, x, sizes, 0, dtype)


@converts("new_empty")
def _new_empty(g, x, *sizes, dtype=None, device=None, requires_grad=False, **_):
    return _new_tensor(g, x, sizes, 0, dtype)


@converts("new_full")
def _new_full(g, x, size, fill_value, dtype=None, device=None, requires_grad=False, **_):
    return _new_tensor(g, x, (size,), fill_value, dtype)


@converts(torch.scatter_add, "scatter_add")
def _scatter_add(g, x, dim, index, src):
    if x.dtype == torch.float16:  # onnxruntime's CPU provider has no float16 ScatterElements(add): sum in float32
        out = g.op("ScatterElements", [g.cast(x, torch.float32), index, g.cast(src, torch.float32)],
                   axis=int(dim) % x.rank, reduction="add")
        return g.op("Cast", [out], to=onnx_type(torch.float16))
    return g.op("ScatterElements", [x, index, src], axis=int(dim) % x.rank, reduction="add")


@converts(torch.gather, "gather")
def _gather(g, x, dim, index, *, sparse_grad=False):
    return g.op("GatherElements", [x, index], axis=int(dim) % x.rank)


@converts(torch.index_select, "index_select")
def _index_select(g, x, dim, index):
    return g.op("Gather", [x, index], axis=int(dim) % x.rank)


@converts(torch.matmul, operator.matmul, "matmul", torch.bmm, "bmm")
def _matmul(g, a, b):
    return g.op("MatMul", [a, b])


# ------------------------------------------------------------------------------------------ layers
def _pair(v) -> list:
    return [int(e) for e in v] if isinstance(v, (tuple, list)) else [int(v), int(v)]


def _conv(g, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    x = input
    stride, dilation = _pair(stride), _pair(dilation)
    kernel = list(weight.shape[-2:])
    if isinstance(padding, str):
        if padding == "valid":
            padding = [0, 0]
        elif all(d * (k - 1) % 2 == 0 for d, k in zip(dilation, kernel)):  # "same", symmetric
            padding = [d * (k - 1) // 2 for d, k in zip(dilation, kernel)]
        else:
            raise ExportError(f"asymmetric padding={padding!r}")
    padding = _pair(padding)
    if weight.rank != 4:
        raise ExportError("only 2-d convolutions")
    inputs = [x, weight] + ([bias] if bias is not None else [])
    return g.op("Conv", inputs, kernel_shape=kernel, strides=stride, pads=padding + padding, dilations=dilation,
                group=int(groups))


converts(_torch("conv2d"), F.conv2d)(_conv)


@converts(nn.Conv2d)
def _conv_module(g, m: nn.Conv2d, x):
    if m.padding_mode != "zeros":
        raise ExportError(f"padding_mode={m.padding_mode!r}")
    bias = None if m.bias is None else constant(m.bias, f"{g.scope}.bias")
    return _conv(g, x, constant(m.weight, f"{g.scope}.weight"), bias, m.stride, m.padding, m.dilation, m.groups)


@converts(_torch("conv_transpose2d"), F.conv_transpose2d)
def _conv_transpose(g, x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    stride, padding, dilation, output_padding = _pair(stride), _pair(padding), _pair(dilation), _pair(output_padding)
    inputs = [x, weight] + ([bias] if bias is not None else [])
    return g.op("ConvTranspose", inputs, kernel_shape=list(weight.shape[-2:]), strides=stride,
                pads=padding + padding, dilations=dilation, group=int(groups),
                output_padding=output_padding if any(output_padding) else None)


@converts(nn.ConvTranspose2d)
def _conv_transpose_module(g, m: nn.ConvTranspose2d, x):
    bias = None if m.bias is None else constant(m.bias, f"{g.scope}.bias")
    return _conv_transpose(g, x, constant(m.weight, f"{g.scope}.weight"), bias, m.stride, m.padding,
                           m.output_padding, m.groups, m.dilation)


@converts(F.linear)
def _linear(g, input, weight, bias=None):  # F.linear's own parameter names: every spelling binds
    x = input
    if x.rank == 2:
        return g.op("Gemm", [x, weight] + ([bias] if bias is not None else []), transB=1)
    out = g.op("MatMul", [x, g.op("Transpose", [weight], perm=[1, 0])])
    return g.op("Add", [out, bias]) if bias is not None else out


@converts(grouped_linear)
def _grouped_linear(g, input, weight, bias=None):
    out = g.op("Einsum", [input, weight], equation="...gi,goi->...go")
    return g.op("Add", [out, bias]) if bias is not None else out


@converts(grouped_linear_transposed)
def _grouped_linear_transposed(g, s, weight):
    return g.op("Einsum", [s, weight], equation="...go,goi->...gi")


@converts(nn.Linear)
def _linear_module(g, m: nn.Linear, x):
    bias = None if m.bias is None else constant(m.bias, f"{g.scope}.bias")
    return _linear(g, x, constant(m.weight, f"{g.scope}.weight"), bias)


def _batch_norm(g, x, mean, var, weight, bias, eps):
    channels = x.shape[1]
    weight = weight if weight is not None else constant(torch.ones(channels, dtype=x.dtype))
    bias = bias if bias is not None else constant(torch.zeros(channels, dtype=x.dtype))
    if mean is None or var is None:
        raise ExportError("batch norm without running statistics")
    return g.op("BatchNormalization", [x, weight, bias, mean, var], epsilon=float(eps))


@converts(F.batch_norm, _torch("batch_norm"))
def _batch_norm_function(g, x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                         eps=1e-5, *args):
    if training:
        raise ExportError("batch norm in training mode")
    return _batch_norm(g, x, running_mean, running_var, weight, bias, eps)


@converts(nn.BatchNorm2d, nn.BatchNorm1d)
def _batch_norm_module(g, m, x):
    c = lambda t, part: None if t is None else constant(t, f"{g.scope}.{part}")  # noqa: E731
    return _batch_norm(g, x, c(m.running_mean, "running_mean"), c(m.running_var, "running_var"),
                       c(m.weight, "weight"), c(m.bias, "bias"), m.eps)


def _ceil_crop(g, x: Value, kernel, stride, padding, dilation, ceil_mode):
    """With ceil_mode, PyTorch drops a last window that would start in the end padding; ONNX's shape rule keeps
    it. The first windows agree (same starts, same divisors): returns a function that slices ONNX's output to
    PyTorch's size, or None where the sizes agree."""
    if not ceil_mode:
        return None
    ends = []
    for size, k, s, p, d in zip(x.shape[-2:], kernel, stride, padding, dilation):
        onnx_out = -(-(size + 2 * p - d * (k - 1) - 1) // s) + 1
        ends.append(onnx_out - 1 if (onnx_out - 1) * s >= size + p else onnx_out)
    if all(-(-(size + 2 * p - d * (k - 1) - 1) // s) + 1 == e
           for size, k, s, p, d, e in zip(x.shape[-2:], kernel, stride, padding, dilation, ends)):
        return None
    axes = [x.rank - 2, x.rank - 1]
    return lambda out: g.op("Slice", [out, g.ints([0, 0]), g.ints(ends), g.ints(axes)])


def _max_pool(g, x, kernel, stride, padding, dilation, ceil_mode, return_indices):
    kernel = _pair(kernel)
    stride = _pair(stride) if stride not in (None, (), []) else kernel
    padding = _pair(padding)
    attrs = dict(kernel_shape=kernel, strides=stride, pads=padding + padding, dilations=_pair(dilation),
                 ceil_mode=int(bool(ceil_mode)))
    crop = _ceil_crop(g, x, kernel, stride, padding, _pair(dilation), ceil_mode) or (lambda out: out)
    if not return_indices:
        return crop(g.op("MaxPool", [x], **attrs))
    out, flat = g.op("MaxPool", [x], outputs=2, **attrs)
    # ONNX numbers positions across the whole tensor, PyTorch within each (sample, channel) plane
    plane = int(np.prod(x.shape[2:]))
    return crop(out), crop(g.op("Mod", [flat, g.scalar(plane, torch.int64)]))


@converts(F.max_pool2d, _torch("max_pool2d"), F.max_pool2d_with_indices)
def _max_pool_function(g, x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                       return_indices=False):
    return _max_pool(g, x, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


@converts(nn.MaxPool2d)
def _max_pool_module(g, m, x):
    return _max_pool(g, x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, m.return_indices)


def _adaptive_kernel(x: Value, output_size) -> list:
    out = [s if o is None else o for o, s in zip(_pair_none(output_size), x.shape[-2:])]
    h, w = x.shape[-2:]
    if h % out[0] or w % out[1]:
        raise ExportError(f"adaptive pooling to {out} from {(h, w)} has unequal windows")
    return [h // out[0], w // out[1]]


def _pair_none(v):
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


@converts(nn.AdaptiveMaxPool2d)
def _adaptive_max_module(g, m, x):
    k = _adaptive_kernel(x, m.output_size)
    return _max_pool(g, x, k, k, 0, 1, False, m.return_indices)


@converts(F.adaptive_max_pool2d, _torch("adaptive_max_pool2d"))
def _adaptive_max_function(g, x, output_size, return_indices=False):
    k = _adaptive_kernel(x, output_size)
    return _max_pool(g, x, k, k, 0, 1, False, return_indices)


def _avg_pool(g, x, kernel, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None):
    if divisor_override is not None:
        raise ExportError(f"average pooling with divisor_override={divisor_override!r} (ONNX AveragePool divides "
                          "by the window size)")
    kernel = _pair(kernel)
    stride = _pair(stride) if stride not in (None, (), []) else kernel
    padding = _pair(padding)
    if kernel == list(x.shape[-2:]) and padding == [0, 0]:
        return g.op("GlobalAveragePool", [x])
    crop = _ceil_crop(g, x, kernel, stride, padding, [1, 1], ceil_mode) or (lambda out: out)
    return crop(g.op("AveragePool", [x], kernel_shape=kernel, strides=stride, pads=padding + padding,
                     ceil_mode=int(bool(ceil_mode)), count_include_pad=int(bool(count_include_pad))))


@converts(F.avg_pool2d, _torch("avg_pool2d"))
def _avg_pool_function(g, input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                       divisor_override=None):
    """F.avg_pool2d under its own parameter names, so that every spelling (positional or keyword) binds."""
    return _avg_pool(g, input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


@converts(nn.AvgPool2d)
def _avg_pool_module(g, m, x):
    return _avg_pool(g, x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad, m.divisor_override)


def _one(v):
    return int(v[0]) if isinstance(v, (tuple, list)) else int(v)


@converts(F.avg_pool1d, _torch("avg_pool1d"))
def _avg_pool1d(g, input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
    """A 1-d average pool over the last dim of [N, C, L] (NextViT's sequence reduction). (In an explainer the
    forward is already the op's exact matrix, a matmul.)"""
    k = _one(kernel_size)
    st = _one(stride) if stride not in (None, (), []) else k
    p = _one(padding)
    if ceil_mode and ((input.shape[-1] + 2 * p - k) % st):
        raise ExportError("1-d average pooling with ceil_mode windows")
    return g.op("AveragePool", [input], kernel_shape=[k], strides=[st], pads=[p, p],
                count_include_pad=int(bool(count_include_pad)))


@converts(nn.AvgPool1d)
def _avg_pool1d_module(g, m, x):
    return _avg_pool1d(g, x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad)


@converts(F.adaptive_avg_pool2d, _torch("adaptive_avg_pool2d"))
def _adaptive_avg(g, x, output_size):
    k = _adaptive_kernel(x, output_size)
    return _avg_pool(g, x, k, k)


@converts(nn.AdaptiveAvgPool2d)
def _adaptive_avg_module(g, m, x):
    return _adaptive_avg(g, x, m.output_size)


@converts(F.layer_norm, _torch("layer_norm"))
def _layer_norm(g, x, normalized_shape, weight=None, bias=None, eps=1e-5, *args):
    n = len(normalized_shape) if isinstance(normalized_shape, (tuple, list)) else 1
    weight = weight if weight is not None else constant(torch.ones(x.shape[-n:], dtype=x.dtype))
    return g.op("LayerNormalization", [x, weight] + ([bias] if bias is not None else []), axis=-n,
                epsilon=float(eps))


@converts(nn.LayerNorm)
def _layer_norm_module(g, m: nn.LayerNorm, x):
    c = lambda t, part: None if t is None else constant(t, f"{g.scope}.{part}")  # noqa: E731
    return _layer_norm(g, x, m.normalized_shape, c(m.weight, "weight"), c(m.bias, "bias"), m.eps)


# ------------------------------------------------------------------------------------------ CNN zoo and transformers
# Forward ops of the wider model zoo (timm/torchvision CNNs, vision transformers) and the structural ops their
# relevance passes use. Each converter is checked against PyTorch in tests/test_fx_to_onnx.py.
@converts(torch.chunk, "chunk")
def _chunk(g, x, chunks, dim=0):
    dim = dim % x.rank
    size = x.shape[dim]
    step = -(-size // chunks)  # torch.chunk: equal pieces of ceil(size / chunks), the last one smaller
    sizes = [min(step, size - s) for s in range(0, size, step)]
    return g.op("Split", [x, g.ints(sizes)], outputs=len(sizes), axis=dim) if len(sizes) > 1 else (x,)


@converts(torch.unbind, "unbind")
def _unbind(g, x, dim=0):
    dim = dim % x.rank
    parts = g.op("Split", [x, g.ints([1] * x.shape[dim])], outputs=x.shape[dim], axis=dim)
    return tuple(g.op("Squeeze", [p, g.ints([dim])]) for p in parts)


@converts(_torch("tensor_split"), "tensor_split")
def _tensor_split(g, x, indices_or_sections, dim=0):
    dim = dim % x.rank
    size = x.shape[dim]
    if isinstance(indices_or_sections, int):
        n = indices_or_sections
        sizes = [size // n + (1 if i < size % n else 0) for i in range(n)]
    else:
        bounds = [0] + [min(max(int(i), 0), size) for i in indices_or_sections] + [size]
        sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    if any(s == 0 for s in sizes):
        raise ExportError("tensor_split with an empty piece")
    return g.op("Split", [x, g.ints(sizes)], outputs=len(sizes), axis=dim) if len(sizes) > 1 else (x,)


@converts(torch.movedim, "movedim", _torch("moveaxis"), "moveaxis")
def _movedim(g, x, source, destination):
    src = [s % x.rank for s in (source if isinstance(source, (tuple, list)) else (source,))]
    dst = [d % x.rank for d in (destination if isinstance(destination, (tuple, list)) else (destination,))]
    rest = [d for d in range(x.rank) if d not in src]
    perm = [None] * x.rank
    for s, d in zip(src, dst):
        perm[d] = s
    it = iter(rest)
    perm = [p if p is not None else next(it) for p in perm]
    return g.op("Transpose", [x], perm=perm)


@converts("expand_as", torch.Tensor.expand_as)
def _expand_as(g, x, other):
    return _expand(g, x, *(list(other.shape) if isinstance(other, Value) else list(other.shape)))


@converts("repeat")
def _repeat(g, x, *repeats):
    repeats = repeats[0] if len(repeats) == 1 and isinstance(repeats[0], (tuple, list)) else repeats
    repeats = [int(r) for r in repeats]
    if len(repeats) > x.rank:
        x = g.op("Reshape", [x, g.ints([1] * (len(repeats) - x.rank) + list(x.shape))])
    return g.op("Tile", [x, g.ints(repeats)])


@converts(_torch("unflatten"), "unflatten")
def _unflatten(g, x, dim, sizes):
    return _reshape_to(g, x, g.out_shape)


def _patch_kernel(x: Value, c: int, kernel) -> Value:
    """One-hot kernels [C·kh·kw, 1, kh, kw]: a grouped conv with them copies each patch entry to its own channel in
    F.unfold's order (c·kh·kw + i·kw + j); the transposed conv sums them back (F.fold)."""
    kh, kw = kernel
    eye = torch.eye(kh * kw, dtype=x.dtype).reshape(kh * kw, 1, kh, kw)
    return constant(eye.repeat(c, 1, 1, 1), "patches")


@converts(F.unfold, nn.Unfold)
def _unfold(g, *args, **kwargs):
    if isinstance(args[0], nn.Module):
        m, x = args[0], args[1]
        kernel, dilation, padding, stride = m.kernel_size, m.dilation, m.padding, m.stride
    else:
        names = ("input", "kernel_size", "dilation", "padding", "stride")
        bound = {**dict(zip(names, args)), **kwargs}
        x, kernel = bound["input"], bound["kernel_size"]
        dilation, padding, stride = bound.get("dilation", 1), bound.get("padding", 0), bound.get("stride", 1)
    kernel, dilation, padding, stride = map(_pair, (kernel, dilation, padding, stride))
    c = x.shape[1]
    patches = g.op("Conv", [x, _patch_kernel(x, c, kernel)], kernel_shape=kernel, strides=stride,
                   pads=padding + padding, dilations=dilation, group=c)
    return g.op("Reshape", [patches, g.shape_target(x, g.out_shape)])


@converts(F.fold, nn.Fold)
def _fold(g, *args, **kwargs):
    if isinstance(args[0], nn.Module):
        m, x = args[0], args[1]
        size, kernel, dilation, padding, stride = m.output_size, m.kernel_size, m.dilation, m.padding, m.stride
    else:
        names = ("input", "output_size", "kernel_size", "dilation", "padding", "stride")
        bound = {**dict(zip(names, args)), **kwargs}
        x, size, kernel = bound["input"], bound["output_size"], bound["kernel_size"]
        dilation, padding, stride = bound.get("dilation", 1), bound.get("padding", 0), bound.get("stride", 1)
    size, kernel, dilation, padding, stride = map(_pair, (size, kernel, dilation, padding, stride))
    c = g.out_shape[1]
    blocks = [(s + 2 * p - d * (k - 1) - 1) // st + 1 for s, p, d, k, st in zip(size, padding, dilation, kernel, stride)]
    grid = g.op("Reshape", [x, g.shape_target(x, [x.shape[0], x.shape[1], *blocks])])
    full = [(b - 1) * st - 2 * p + d * (k - 1) + 1 for b, st, p, d, k in zip(blocks, stride, padding, dilation, kernel)]
    return g.op("ConvTranspose", [grid, _patch_kernel(x, c, kernel)], kernel_shape=kernel, strides=stride,
                pads=padding + padding, dilations=dilation, group=c,
                output_padding=[s - f for s, f in zip(size, full)])


@converts(torch.repeat_interleave, "repeat_interleave")
def _repeat_interleave(g, x, repeats, dim=None, *, output_size=None):
    """Each slice along `dim` repeated `repeats` times in place (GCViT's q_global.repeat_interleave(B // b, 0))."""
    if not isinstance(repeats, int) or dim is None:
        raise ExportError("repeat_interleave with per-element repeats or over the flattened tensor")
    if repeats == 1:
        return g.op("Identity", [x])
    d = dim % x.rank
    tiles = [1] * (x.rank + 1)
    tiles[d + 1] = repeats
    tiled = g.op("Tile", [g.op("Unsqueeze", [x, g.ints([d + 1])]), g.ints(tiles)])
    shape = list(x.shape)
    shape[d] *= repeats
    return g.op("Reshape", [tiled, g.shape_target(x, shape)])


@converts(torch.roll, "roll")
def _roll(g, x, shifts, dims=None):
    if dims is None:
        raise ExportError("roll over the flattened tensor")
    shifts = shifts if isinstance(shifts, (tuple, list)) else (shifts,)
    dims = dims if isinstance(dims, (tuple, list)) else (dims,)
    out = x
    for s, d in zip(shifts, dims):
        d = d % x.rank
        size = x.shape[d]
        s = int(s) % size
        if s == 0:
            continue
        tail = g.op("Slice", [out, g.ints([size - s]), g.ints([size]), g.ints([d])])
        head = g.op("Slice", [out, g.ints([0]), g.ints([size - s]), g.ints([d])])
        out = g.op("Concat", [tail, head], axis=d)
    return out


@converts(torch.select, "select")
def _select(g, x, dim, index):
    dim = dim % x.rank
    i = int(index) % x.shape[dim]
    return g.op("Squeeze", [g.op("Slice", [x, g.ints([i]), g.ints([i + 1]), g.ints([dim])]), g.ints([dim])])


@converts(F.pixel_shuffle, nn.PixelShuffle)
def _pixel_shuffle(g, *args):
    x = _input_of(args)
    r = args[0].upscale_factor if isinstance(args[0], nn.Module) else args[1]
    return g.op("DepthToSpace", [x], blocksize=int(r), mode="CRD")


@converts(F.pixel_unshuffle, nn.PixelUnshuffle)
def _pixel_unshuffle(g, *args):
    x = _input_of(args)
    r = int(args[0].downscale_factor if isinstance(args[0], nn.Module) else args[1])
    n, c, h, w = x.shape  # PyTorch orders channels (c, row offset, column offset); ONNX SpaceToDepth does not
    six = g.op("Reshape", [x, g.shape_target(x, [n, c, h // r, r, w // r, r])])
    six = g.op("Transpose", [six], perm=[0, 1, 3, 5, 2, 4])
    return g.op("Reshape", [six, g.shape_target(x, [n, c * r * r, h // r, w // r])])


@converts(F.interpolate, nn.Upsample)
def _interpolate(g, *args, **kwargs):
    """Nearest and (bi)linear resizing to the output size of the example run."""
    module = args[0] if isinstance(args[0], nn.Module) else None
    x = _input_of(args)
    mode = module.mode if module is not None else kwargs.get("mode", args[4] if len(args) > 4 else "nearest")
    align = module.align_corners if module is not None else kwargs.get("align_corners")
    if mode not in ("nearest", "bilinear", "linear"):
        raise ExportError(f"interpolation mode {mode!r}")
    if kwargs.get("antialias"):
        raise ExportError("antialiased interpolation")
    # the output size itself, not scales: ONNX makes floor(in · scale) of a float32 scale, and 3 · (7 / 3) is 6.9999
    # there (GhostNetV2 resizes its 3×3 gate to 7×7); batch and channels read from x at run time
    size = g.op("Concat", [g.op("Slice", [g.op("Shape", [x]), g.ints([0]), g.ints([2])]),
                           g.ints(list(g.out_shape[2:]))], axis=0)
    if mode == "nearest":
        # PyTorch's nearest: src = floor(dst * in / out) -> ONNX asymmetric + floor
        attrs = dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    else:
        attrs = dict(mode="linear", coordinate_transformation_mode="align_corners" if align else "half_pixel")
    return g.op("Resize", [x, "", "", size], **attrs)


@converts(torch.nn.modules.padding.ConstantPad2d, nn.ZeroPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d)
def _pad_module(g, m, x):
    mode = {nn.ReflectionPad2d: "reflect", nn.ReplicationPad2d: "replicate"}.get(type(m), "constant")
    return _pad_any(g, x, m.padding, mode, getattr(m, "value", 0.0))


def _pad_any(g, x, pad, mode="constant", value=None):
    pad = list(pad) if isinstance(pad, (tuple, list)) else [pad] * 4
    begins, ends = [0] * x.rank, [0] * x.rank
    for i in range(len(pad) // 2):
        d = x.rank - 1 - i
        begins[d], ends[d] = pad[2 * i], pad[2 * i + 1]
    onnx_mode = {"constant": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}.get(mode)
    if onnx_mode is None or (onnx_mode == "wrap" and g.opset < 19):
        raise ExportError(f"padding mode {mode!r}")
    source = x
    if any(p < 0 for p in begins + ends):  # negative padding crops (PNASNet's ZeroPad2d((-1, 1, -1, 1)) shift)
        axes = [d for d in range(x.rank) if min(begins[d], ends[d]) < 0]  # only those: the batch stays symbolic
        source = g.op("Slice", [x, g.ints([-min(begins[d], 0) for d in axes]),
                                g.ints([x.shape[d] + min(ends[d], 0) for d in axes]), g.ints(axes)])
        begins, ends = [max(b, 0) for b in begins], [max(e, 0) for e in ends]
        if not any(begins + ends):
            return source
    inputs = [source, g.ints(begins + ends)]
    if onnx_mode == "constant":
        inputs.append(g.scalar(float(value or 0), x.dtype))
    return g.op("Pad", inputs, mode=onnx_mode)


converts(F.pad)(_pad_any)


def _hardsigmoid(g, *args, **kwargs):
    return g.op("HardSigmoid", [_input_of(args)], alpha=1 / 6, beta=0.5)


converts(F.hardsigmoid, nn.Hardsigmoid)(_hardsigmoid)


def _stochastic_depth(g, x, *args, **kwargs):
    """torchvision's stochastic depth in eval mode: the identity (the explainer always runs in eval mode)."""
    training = kwargs.get("training", args[2] if len(args) > 2 else False)
    if training:
        raise ExportError("stochastic depth in training mode")
    return x


try:
    from torchvision.ops import StochasticDepth, stochastic_depth

    converts(stochastic_depth)(_stochastic_depth)
    converts(StochasticDepth)(lambda g, m, x: x)
except ImportError:  # torchvision is optional for the lowering
    pass


def _group_norm(g, x, num_groups, weight=None, bias=None, eps=1e-5):
    """(x - mean) / sqrt(var + eps) per sample and group, then the per-channel affine part."""
    n, c = x.shape[0], x.shape[1]
    grouped = g.op("Reshape", [x, g.ints([0, int(num_groups), -1])])
    mean = g.reduce("ReduceMean", Value(grouped, (n, num_groups, -1), x.dtype, x.batched), [2], True)
    centred = g.op("Sub", [grouped, mean])
    var = g.reduce("ReduceMean", Value(g.op("Mul", [centred, centred]), (n, num_groups, -1), x.dtype, x.batched),
                   [2], True)
    normed = g.op("Div", [centred, g.op("Sqrt", [g.op("Add", [var, g.scalar(float(eps), x.dtype)])])])
    out = g.op("Reshape", [normed, g.shape_target(x, x.shape)])
    shape = [c] + [1] * (x.rank - 2)
    if weight is not None:
        out = g.op("Mul", [out, g.op("Reshape", [weight, g.ints(shape)])])
    if bias is not None:
        out = g.op("Add", [out, g.op("Reshape", [bias, g.ints(shape)])])
    return out


converts(F.group_norm, _torch("group_norm"))(_group_norm)


@converts(nn.GroupNorm)
def _group_norm_module(g, m, x):
    c = lambda t, part: None if t is None else constant(t, f"{g.scope}.{part}")  # noqa: E731
    return _group_norm(g, x, m.num_groups, c(m.weight, "weight"), c(m.bias, "bias"), m.eps)


def _conv1d(g, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    one = lambda v: [int(v[0] if isinstance(v, (tuple, list)) else v)]  # noqa: E731
    if isinstance(padding, str):
        k = weight.shape[-1]
        d = one(dilation)[0]
        if padding == "valid":
            padding = 0
        elif d * (k - 1) % 2 == 0:
            padding = d * (k - 1) // 2
        else:
            raise ExportError(f"asymmetric padding={padding!r}")
    inputs = [x, weight] + ([bias] if bias is not None else [])
    p = one(padding)
    return g.op("Conv", inputs, kernel_shape=[int(weight.shape[-1])], strides=one(stride), pads=p + p,
                dilations=one(dilation), group=int(groups))


converts(F.conv1d, _torch("conv1d"))(_conv1d)


@converts(nn.Conv1d)
def _conv1d_module(g, m, x):
    if m.padding_mode != "zeros":
        raise ExportError(f"padding_mode={m.padding_mode!r}")
    bias = None if m.bias is None else constant(m.bias, f"{g.scope}.bias")
    return _conv1d(g, x, constant(m.weight, f"{g.scope}.weight"), bias, m.stride, m.padding, m.dilation, m.groups)


@converts(torch.einsum)
def _einsum(g, equation, *operands):
    operands = operands[0] if len(operands) == 1 and isinstance(operands[0], (tuple, list)) else operands
    return g.op("Einsum", list(operands), equation=equation.replace(" ", ""))


# the catch-all converters below follow their operand's dtype (a float64 lowering writes a float64 graph)
converts(torch.baddbmm)(lambda g, inp, a, b, beta=1, alpha=1: g.op(
    "Add", [g.op("Mul", [inp, g.scalar(float(beta), inp.dtype)]) if beta != 1 else inp,
            g.op("Mul", [g.op("MatMul", [a, b]), g.scalar(float(alpha), a.dtype)]) if alpha != 1
            else g.op("MatMul", [a, b])]))
converts(torch.rsqrt, "rsqrt")(lambda g, x: g.op("Reciprocal", [g.op("Sqrt", [x])]))
converts(torch.log, "log")(_unary("Log"))
converts(torch.reciprocal, "reciprocal")(_unary("Reciprocal"))
converts(torch.sign, "sign")(_unary("Sign"))
converts(torch.erf, "erf")(_unary("Erf"))
converts(torch.pow, operator.pow, "pow")(_binary("Pow"))
converts(torch.floor_divide, operator.floordiv)(lambda g, a, b: g.op("Floor", [_binary("Div")(g, a, b)]))
converts(nn.Softplus, F.softplus)(lambda g, *a, **k: g.op("Softplus", [_input_of(a)]))
converts(nn.Mish, F.mish)(lambda g, *a, **k: g.op("Mul", [_input_of(a), g.op("Tanh", [g.op("Softplus",
                                                                                         [_input_of(a)])])]))
converts(nn.Softmax)(lambda g, m, x: g.op("Softmax", [x], axis=int(m.dim) % x.rank))
def _hardtanh(g, *args, **kwargs):
    x = _input_of(args)
    if isinstance(args[0], nn.Module):
        lo, hi = args[0].min_val, args[0].max_val
    else:  # F.hardtanh(input, min_val=-1.0, max_val=1.0, inplace=False)
        lo = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
        hi = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
    return g.op("Clip", [x, g.scalar(float(lo), x.dtype), g.scalar(float(hi), x.dtype)])


converts(nn.Hardtanh, F.hardtanh)(_hardtanh)


# ------------------------------------------------------------------------------------------ every describer's op
# The ops graphlrp's describers (graphlrp/ops) accept and the converters above lacked: the remaining nn
# activations, dropouts in eval mode, norms and the odd spellings. `missing_converters()` (below) checks that every
# describer target has a converter; tests/test_registry.py runs it.
def _number(v, default):
    return float(default if v is None else v)


def _p_norm(g, x: Value, p, dims, keepdim: bool) -> str:
    """‖x‖_p over `dims` for every p (2, 1, ±inf, 0 and general): F.normalize's and Tensor.norm's reduction."""
    p = float(p)
    if p == 2:
        return g.reduce("ReduceL2", x, dims, keepdim)
    if p == 1:
        return g.reduce("ReduceL1", x, dims, keepdim)
    if math.isinf(p):
        absx = Value(g.op("Abs", [x]), x.shape, x.dtype, x.batched)
        return g.reduce("ReduceMax" if p > 0 else "ReduceMin", absx, dims, keepdim)
    if p == 0:  # the number of nonzero entries
        nonzero = g.op("Cast", [g.op("Not", [g.op("Equal", [x, g.scalar(0, x.dtype)])])], to=onnx_type(x.dtype))
        return g.reduce("ReduceSum", Value(nonzero, x.shape, x.dtype, x.batched), dims, keepdim)
    powered = g.op("Pow", [g.op("Abs", [x]), g.scalar(p, x.dtype)])
    return g.op("Pow", [g.reduce("ReduceSum", Value(powered, x.shape, x.dtype, x.batched), dims, keepdim),
                        g.scalar(1 / p, x.dtype)])


def _reduced_dims(x: Value, dim) -> list:
    return list(range(x.rank)) if dim is None or dim == () else ([dim] if isinstance(dim, int) else list(dim))


@converts(F.normalize)
def _normalize(g, input, p=2.0, dim=1, eps=1e-12, out=None):
    """x / max(‖x‖_p, eps) along `dim` (Swin-V2's cosine attention), for every p (2, 1, ±inf, 0 and general)."""
    if out is not None:
        raise ExportError("F.normalize with out=")
    norm = _p_norm(g, input, p, [dim] if isinstance(dim, int) else list(dim), True)
    return g.op("Div", [input, g.op("Max", [norm, g.scalar(float(eps), input.dtype)])])


@converts(torch.norm, "norm")
def _norm(g, input, p="fro", dim=None, keepdim=False, out=None, dtype=None):
    """Tensor.norm / torch.norm (GRN's ‖x‖ over the spatial dims): a vector p-norm; 'fro' is p = 2."""
    if out is not None or dtype is not None or p == "nuc":
        raise ExportError(f"torch.norm with {'a nuclear norm' if p == 'nuc' else 'out= or dtype='}")
    return _p_norm(g, input, 2.0 if p in ("fro", None) else p, _reduced_dims(input, dim), bool(keepdim))


@converts(_linalg("vector_norm"))
def _vector_norm(g, x, ord=2, dim=None, keepdim=False, dtype=None):
    if dtype is not None:
        raise ExportError("torch.linalg.vector_norm with dtype=")
    return _p_norm(g, x, ord, _reduced_dims(x, dim), bool(keepdim))


def _variance(g, x: Value, dims, correction, keepdim: bool) -> str:
    """mean((x − mean x)²) · n / (n − correction) over `dims`, n the number of reduced entries (fixed shapes)."""
    if x.batched and 0 in [d % x.rank for d in dims]:
        raise ExportError("a variance over the batch dimension")
    n = 1
    for d in dims:
        n *= x.shape[d]
    centred = g.op("Sub", [x, g.reduce("ReduceMean", x, dims, True)])
    square = Value(g.op("Mul", [centred, centred]), x.shape, x.dtype, x.batched)
    mean = g.reduce("ReduceMean", square, dims, keepdim)
    scale = n / max(n - correction, 0) if n - correction > 0 else float("inf")
    return mean if scale == 1 else g.op("Mul", [mean, g.scalar(scale, x.dtype)])


def _variance_args(x: Value, args, kwargs):
    """torch.var/std's overloads: (dim, unbiased, keepdim) or (dim, *, correction, keepdim)."""
    args = list(args)
    dim = args.pop(0) if args and not isinstance(args[0], bool) else kwargs.get("dim")
    if args and isinstance(args[0], bool) and "unbiased" not in kwargs:
        kwargs = dict(kwargs, unbiased=args.pop(0))
    keepdim = args.pop(0) if args else kwargs.get("keepdim", False)
    if "correction" in kwargs and kwargs["correction"] is not None:
        correction = float(kwargs["correction"])
    else:
        correction = 1.0 if kwargs.get("unbiased", True) else 0.0
    return _reduced_dims(x, dim), correction, bool(keepdim)


@converts(torch.var, "var")
def _var(g, x, *args, **kwargs):
    return _variance(g, x, *_variance_args(x, args, kwargs))


@converts(torch.std, "std")
def _std(g, x, *args, **kwargs):
    return g.op("Sqrt", [_variance(g, x, *_variance_args(x, args, kwargs))])


def _prelu(g, x, weight):
    """PRelu with the slope (one per channel, dim 1, or one for all) shaped to broadcast over x."""
    if weight.rank == 1 and weight.shape[0] > 1 and x.rank > 2:
        weight = g.op("Reshape", [weight, g.ints([weight.shape[0]] + [1] * (x.rank - 2))])
    return g.op("PRelu", [x, weight])


converts(F.prelu, _torch("prelu"))(lambda g, input, weight: _prelu(g, input, weight))
converts(nn.PReLU)(lambda g, m, x: _prelu(g, x, constant(m.weight, f"{g.scope}.weight")))


def _selu(g, *args, **kwargs):
    return g.op("Selu", [_input_of(args)], alpha=1.6732632423543772848170429916717,
                gamma=1.0507009873554804934193349852946)


converts(nn.SELU, F.selu, _torch("selu"))(_selu)


def _celu(g, x, alpha):
    """CELU(x, α) = α·ELU(x/α, 1) (ONNX's Celu takes float32 only)."""
    alpha = float(alpha)
    if alpha == 1:
        return g.op("Elu", [x], alpha=1.0)
    scaled = g.op("Div", [x, g.scalar(alpha, x.dtype)])
    return g.op("Mul", [g.op("Elu", [scaled], alpha=1.0), g.scalar(alpha, x.dtype)])


converts(nn.CELU)(lambda g, m, x: _celu(g, x, m.alpha))
converts(F.celu, _torch("celu"))(lambda g, input, alpha=1.0, inplace=False: _celu(g, input, alpha))
converts(nn.Softsign, F.softsign)(lambda g, *a, **k: g.op("Softsign", [_input_of(a)]))
converts(nn.Tanhshrink, F.tanhshrink)(lambda g, *a, **k: g.op("Sub", [_input_of(a), g.op("Tanh", [_input_of(a)])]))
converts(F.sigmoid)(lambda g, input: g.op("Sigmoid", [input]))
converts(F.tanh)(lambda g, input: g.op("Tanh", [input]))


def _log_sigmoid(g, *args, **kwargs):
    """log σ(x) = min(x, 0) - log(1 + exp(-|x|)): exact in both tails."""
    x = _input_of(args)
    tail = g.op("Log", [g.op("Add", [g.op("Exp", [g.op("Neg", [g.op("Abs", [x])])]), g.scalar(1.0, x.dtype)])])
    return g.op("Sub", [g.op("Min", [x, g.scalar(0.0, x.dtype)]), tail])


converts(nn.LogSigmoid, F.logsigmoid)(_log_sigmoid)


def _shrink(g, x, lambd, soft: bool):
    lambd = float(lambd)
    return g.op("Shrink", [x], lambd=lambd, bias=lambd if soft else 0.0)


converts(nn.Softshrink)(lambda g, m, x: _shrink(g, x, m.lambd, True))
converts(F.softshrink)(lambda g, input, lambd=0.5: _shrink(g, input, lambd, True))
converts(nn.Hardshrink)(lambda g, m, x: _shrink(g, x, m.lambd, False))
converts(F.hardshrink, _torch("hardshrink"))(lambda g, input, lambd=0.5: _shrink(g, input, lambd, False))


def _threshold_op(g, x, threshold, value):
    """x where x > threshold, else value."""
    return g.op("Where", [g.op("Greater", [x, g.scalar(float(threshold), x.dtype)]), x,
                          g.scalar(float(value), x.dtype)])


converts(nn.Threshold)(lambda g, m, x: _threshold_op(g, x, m.threshold, m.value))
converts(F.threshold, _torch("threshold"))(
    lambda g, input, threshold, value, inplace=False: _threshold_op(g, input, threshold, value))


def _rrelu(g, x, lower, upper, training):
    """RReLU in eval mode: a leaky ReLU of slope (lower + upper) / 2."""
    if training:
        raise ExportError("RReLU in training mode (a random slope)")
    return g.op("LeakyRelu", [x], alpha=(float(lower) + float(upper)) / 2)


converts(nn.RReLU)(lambda g, m, x: _rrelu(g, x, m.lower, m.upper, m.training))
converts(F.rrelu, _torch("rrelu"))(lambda g, input, lower=1 / 8, upper=1 / 3, training=False, *a, **k: _rrelu(
    g, input, lower, upper, training))


def _dropout(g, *args, **kwargs):
    """Every dropout (alpha, feature-alpha, 1-d/2-d/3-d) in eval mode: the identity. (input, p, training, ...);
    torch.dropout(input, p, train)."""
    if isinstance(args[0], nn.Module):
        return args[1]
    training = kwargs.get("training", kwargs.get("train", args[2] if len(args) > 2 else False))
    if training:
        raise ExportError("dropout in training mode")
    return args[0]


converts(nn.Dropout1d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, F.dropout1d, F.dropout2d,
         F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, _torch("dropout"))(_dropout)


def _clamp_bound(op_type):
    def convert(g, x, bound):
        dtype = _compute_dtype(x, bound)
        return g.op(op_type, [g.cast(x, dtype), g.cast(bound, dtype)])

    return convert


# ------------------------------------------------------------------------------------------ functions of one signal
# (graphlrp.ops.elementwise: square and abs are activations; forward ops of models such as MetaFormer's StarReLU)
converts(torch.square, "square")(lambda g, x: g.op("Mul", [x, x]))
converts(operator.abs)(_unary("Abs"))


# ------------------------------------------------------------------------------------------ max/min over dims
# (graphlrp.ops.pooling's MAX_REDUCE: Hiera's amax max-pool, x.max(dim).values, and its winner-take-all rule)
@converts(_torch("amin"), "amin")
def _amin(g, x, dim=(), keepdim=False):
    dims = range(x.rank) if dim in ((), None) else (dim if isinstance(dim, (tuple, list)) else (dim,))
    return g.reduce("ReduceMin", x, dims, keepdim)


def _max_or_min(reduce: str, arg: str, binary: str):
    def convert(g, x, dim=None, keepdim=False, *, other=None):
        if isinstance(dim, Value) or other is not None:  # max(a, b): elementwise
            return _binary(binary)(g, x, dim if other is None else other)
        if dim is None:
            return g.reduce(reduce, x, range(x.rank), False)
        d = dim % x.rank
        return [g.reduce(reduce, x, (d,), keepdim), g.op(arg, [x], axis=d, keepdims=int(keepdim))]  # (values, indices)

    return convert


converts(_torch("clamp_min"), "clamp_min")(_clamp_bound("Max"))
converts(_torch("clamp_max"), "clamp_max")(_clamp_bound("Min"))
# fmax/fmin differ from maximum/minimum only where an operand is NaN (they return the other one); the explainer's
# operands are finite
converts(_torch("fmax"), "maximum", "fmax")(_binary("Max"))
converts(_torch("fmin"), "minimum", "fmin")(_binary("Min"))
converts(_torch("true_divide"), "true_divide")(_binary("Div"))


@converts(torch.addcmul, "addcmul")
def _addcmul(g, input, tensor1, tensor2, *, value=1):
    dtype = _compute_dtype(input, tensor1, tensor2)
    prod = g.op("Mul", [g.cast(tensor1, dtype), g.cast(tensor2, dtype)])
    if value != 1:
        prod = g.op("Mul", [prod, g.scalar(value, dtype)])
    return g.op("Add", [g.cast(input, dtype), prod])


@converts(nn.modules.batchnorm._BatchNorm)
def _batch_norm_any(g, m, x):
    """BatchNorm3d, SyncBatchNorm and the other _BatchNorm subclasses (eval mode: the running statistics)."""
    if m.training and m.track_running_stats:
        raise ExportError("batch norm in training mode")
    return _batch_norm_module(g, m, x)


def _instance_norm(g, x, weight, bias, eps):
    c = x.shape[1]
    weight = weight if weight is not None else constant(torch.ones(c, dtype=x.dtype))
    bias = bias if bias is not None else constant(torch.zeros(c, dtype=x.dtype))
    return g.op("InstanceNormalization", [x, weight, bias], epsilon=float(eps))


@converts(nn.modules.instancenorm._InstanceNorm)
def _instance_norm_module(g, m, x):
    c = lambda t, part: None if t is None else constant(t, f"{g.scope}.{part}")  # noqa: E731
    if x.rank == m._get_no_batch_dim():
        raise ExportError("instance norm of an unbatched input")
    if m.track_running_stats and not m.training:  # eval with running statistics: a batch norm
        return _batch_norm(g, x, c(m.running_mean, "running_mean"), c(m.running_var, "running_var"),
                           c(m.weight, "weight"), c(m.bias, "bias"), m.eps)
    return _instance_norm(g, x, c(m.weight, "weight"), c(m.bias, "bias"), m.eps)


@converts(F.instance_norm)
def _instance_norm_function(g, input, running_mean=None, running_var=None, weight=None, bias=None,
                            use_input_stats=True, momentum=0.1, eps=1e-5):
    if not use_input_stats:
        return _batch_norm(g, input, running_mean, running_var, weight, bias, eps)
    return _instance_norm(g, input, weight, bias, eps)


@converts(_torch("instance_norm"))
def _torch_instance_norm(g, input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps,
                         cudnn_enabled=False):
    return _instance_norm_function(g, input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)


def _local_response_norm(g, x, size, alpha=1e-4, beta=0.75, k=1.0):
    """ONNX LRN sums the channels [c - ⌊(n-1)/2⌋, c + ⌈(n-1)/2⌉], PyTorch [c - ⌊n/2⌋, c + ⌊(n-1)/2⌋]: equal for odd n."""
    size = int(size)
    if size % 2 == 0:
        raise ExportError(f"local response norm of even size {size} (ONNX LRN centres the window differently)")
    if x.rank < 3:
        raise ExportError("local response norm of a rank-2 input")
    return g.op("LRN", [x], size=size, alpha=float(alpha), beta=float(beta), bias=float(k))


converts(nn.LocalResponseNorm)(lambda g, m, x: _local_response_norm(g, x, m.size, m.alpha, m.beta, m.k))
converts(F.local_response_norm)(
    lambda g, input, size, alpha=1e-4, beta=0.75, k=1.0: _local_response_norm(g, input, size, alpha, beta, k))


def _rms_norm(g, x, normalized_shape, weight=None, eps=None):
    """x / sqrt(mean(x², trailing dims) + eps) · weight; eps None: the dtype's machine epsilon (PyTorch's default)."""
    n = len(normalized_shape) if isinstance(normalized_shape, (tuple, list)) else 1
    eps = torch.finfo(x.dtype).eps if eps is None else float(eps)
    square = Value(g.op("Mul", [x, x]), x.shape, x.dtype, x.batched)
    mean = g.reduce("ReduceMean", square, list(range(x.rank - n, x.rank)), True)
    out = g.op("Div", [x, g.op("Sqrt", [g.op("Add", [mean, g.scalar(eps, x.dtype)])])])
    return g.op("Mul", [out, weight]) if weight is not None else out


converts(getattr(F, "rms_norm", None), _torch("rms_norm"))(_rms_norm)
if hasattr(nn, "RMSNorm"):
    converts(nn.RMSNorm)(lambda g, m, x: _rms_norm(
        g, x, m.normalized_shape, None if m.weight is None else constant(m.weight, f"{g.scope}.weight"), m.eps))


# ------------------------------------------------------------------------------------------ registry check
# Describer targets that need no converter of their own because the compiler rewrites them into ops that have one
# before the lowering sees them: target -> what it becomes. (Empty today: every describer target has a converter.)
CANONICAL_REWRITES: dict[Any, str] = {}


def describer_targets() -> list:
    """Every target graphlrp's describers register (graphlrp.ops: modules, functions, Tensor method names), as
    (kind, target, name) with kind "module", "function" or "method", sorted by name."""
    from .ops import base

    rows = [("module", m, _target_name(m)) for m in base._BY_MODULE]
    rows += [("function", f, _target_name(f)) for f in base._BY_FUNCTION]
    rows += [("method", m, _target_name(m)) for m in base._BY_METHOD]
    return sorted(rows, key=lambda r: (r[0], r[2]))


def has_converter(kind: str, target) -> bool:
    """Whether the lowering can write `target` (a module class by its MRO, as `_converter` looks it up), directly
    or through a documented canonical rewrite (CANONICAL_REWRITES)."""
    if target in CANONICAL_REWRITES:
        return True
    if kind == "module":
        return any(cls in CONVERTERS for cls in target.__mro__)
    return target in CONVERTERS


def missing_converters() -> list[str]:
    """Names of the describer targets (ops graphlrp compiles) that the ONNX lowering has no converter for: each is
    an op a model can contain that compiles but does not export. [] when the registries agree."""
    return [name for kind, target, name in describer_targets() if not has_converter(kind, target)]


converts(torch.max, "max")(_max_or_min("ReduceMax", "ArgMax", "Max"))
converts(torch.min, "min")(_max_or_min("ReduceMin", "ArgMin", "Min"))
converts(getattr)(lambda g, x, name: x[{"values": 0, "indices": 1}[name]] if isinstance(x, (tuple, list))
                  else getattr(x, name))
