"""Stage 3 — rewrite: emit the explainer as a new torch.fx GraphModule.

The new graph holds the model's forward ops (made functional), then the relevance pass: the traced nodes in
reverse topological order, each op's rule appending explicit tensor ops (conv / conv_transpose with precomputed
rule weights, elementwise ops, scatter for max-pool winners). Relevance arriving from several consumers is summed.
No autograd, no hooks, nothing stored between calls: every rule weight is a constant buffer of the graph (or, for a
model over `DERIVED_WEIGHTS_HELD_UP_TO` bytes of weights, an op computing W⁺, W⁻, |W| from one).

Graph signature: (input [N, C, H, W], target int64 [N], -1 = top-1) -> (logits, relevance[, taps]).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

from . import derived, ops, rules
from .analyze import Merge
from .errors import UnsupportedOpError
from .optimize import conv_transpose, optimize_in_place, recompute_large_values
from .graph import Traced, describe_node


@dataclass
class Assignment:
    """The rule chosen for one op and its parameters."""

    rule: str
    params: dict = field(default_factory=dict)


@dataclass
class Plan:
    """Everything the rewrite needs besides the traced graph: a rule per node and the global choices."""

    rules: dict  # node name -> Assignment
    split: str
    include_identity: bool
    output: str  # "probability" | "logit"
    box_low: torch.Tensor | None = None
    box_high: torch.Tensor | None = None
    derived_weights: str = "auto"  # one of DERIVED_WEIGHTS (`compute_derived_weights`)


# model weights (bytes) up to which the explainer holds derived weights (W⁺ and W⁻ of a z⁺ rule, |W| of the
# ε rule's cancellation guard) as buffers of their own; a larger model computes them from W in every call. Held,
# they triple a z⁺ explainer's weights: 14 GB beside the 4.6 GB of a 1.2 B-parameter ViT. Computed, they cost a
# pass over the weights per call, small next to the forward of such a model at its own input size.
DERIVED_WEIGHTS_HELD_UP_TO = 1 << 30
# how an explainer gets its derived weights: "held" as buffers (fastest per call), "computed" from W in every call
# (the least memory: what an explainer built only to be exported needs), "auto" held up to the limit above
DERIVED_WEIGHTS = ("auto", "held", "computed")


def compute_derived_weights(choice: str, module: torch.nn.Module) -> bool:
    """Whether the explainer of `module` computes its derived weights in every call instead of holding them, for a
    `Plan.derived_weights` choice."""
    if choice not in DERIVED_WEIGHTS:
        raise ValueError(f"derived_weights must be one of {', '.join(DERIVED_WEIGHTS)}, got {choice!r}")
    if choice != "auto":
        return choice == "computed"
    weights = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    return weights > DERIVED_WEIGHTS_HELD_UP_TO


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.device == b.device


class Emitter:
    """Appends nodes to the explainer graph and registers constants (rule weights) as buffers of its root."""

    def __init__(self, graph: fx.Graph, root: torch.nn.Module, dtype: torch.dtype = torch.float32,
                 pool: dict | None = None, compute_derived: bool = False):
        self.graph, self.root, self._count = graph, root, 0
        # derived weights (W⁺, W⁻, |W|; `graphlrp.derived`) as ops on their base weight, computed in every call,
        # instead of buffers of their own (`compute_derived_weights`)
        self.compute_derived = compute_derived
        self._derived: dict = {}  # (fn, lifted base and args, kwargs) -> the node computing it
        self.dtype = dtype  # floating constants are stored in the model's dtype (float32, or float64 for checks)
        self._consts: dict = {}  # fingerprint -> [(tensor, get_attr node)]: equal constants are stored once
        # id -> (tensor, node) of tensors lifted before whose buffer is that very storage: a weight used at every
        # step of an unrolled LSTM is fingerprinted once, not at every step (kept alive, its id is not reused;
        # holding it costs nothing, its buffer holds the same memory)
        self._lifted: dict = {}
        # fingerprint -> [tensor]: constants of other graphs built from the same trace (the self-check's conservation
        # trace, the taps module); an equal constant is registered as that very tensor, so it is held once in memory
        self.pool = pool if pool is not None else {}

    def call(self, fn, *args, **kwargs) -> fx.Node:
        args = tuple(self.lift(a) for a in args)
        return self.graph.call_function(fn, args, kwargs)

    def lift(self, arg):
        """Tensors become constant buffers of the graph; everything else is passed as it is."""
        if isinstance(arg, torch.Tensor):
            return self.const(arg)
        return arg

    def const(self, tensor: torch.Tensor, hint: str = "c") -> fx.Node:
        """A get_attr node for `tensor`. A derived weight (`graphlrp.derived`) keeps its recipe in the node's meta:
        the ONNX export computes it from the stored base tensor instead of storing it a second time."""
        seen = self._lifted.get(id(tensor))
        if seen is not None and seen[0] is tensor:
            return seen[1]
        node = self._const(tensor, hint)
        if node.op == "get_attr" and _same_storage(getattr(self.root, node.target), tensor):
            self._lifted[id(tensor)] = (tensor, node)
        return node

    def _const(self, tensor: torch.Tensor, hint: str) -> fx.Node:
        recipe = derived.recipe(tensor)
        if recipe is not None and self.compute_derived:
            return self._derived_node(recipe)
        value = tensor.detach()
        value = (value.to(self.dtype) if value.is_floating_point() else value).contiguous()
        if value._base is not None:  # a view would keep (and save) its whole base tensor
            value = value.clone()
        flat = value.reshape(-1)
        key = (tuple(value.shape), value.dtype, float(flat.sum()), float(flat[0]) if flat.numel() else 0.0)
        for other, node in self._consts.get(key, ()):  # then torch.equal
            if torch.equal(other, value):
                if recipe is not None:
                    node.meta.setdefault("recipe", recipe)
                return node
        shared = next((t for t in self.pool.get(key, ()) if torch.equal(t, value)), None)
        if shared is None:
            self.pool.setdefault(key, []).append(value)
        else:
            value = shared
        name = f"_lrp_{hint}{self._count}"
        self._count += 1
        self.root.register_buffer(name, value, persistent=True)
        node = self.graph.get_attr(name)
        if recipe is not None:
            node.meta["recipe"] = recipe
        self._consts.setdefault(key, []).append((getattr(self.root, name), node))
        return node

    def _derived_node(self, recipe: "derived.Recipe") -> fx.Node:
        """The node computing a derived weight from its base (itself a buffer, or derived in turn), one per
        distinct recipe. Marked `derived_weight`: the ONNX lowering writes it as the recipe's ops on the stored
        base instead of folding it into a constant of its own."""
        base = self.lift(recipe.base)
        args = tuple(self.lift(a) for a in recipe.args)
        kwargs = recipe.kwargs or {}
        key = (recipe.fn, base, args, tuple(sorted(kwargs.items())))
        if key not in self._derived:
            node = self.graph.call_function(recipe.fn, (base, *args), dict(kwargs))
            node.meta["derived_weight"] = True
            self._derived[key] = node
        return self._derived[key]


class RuleContext:
    """What a rule sees: its op, the relevance R at the op's output, forward values, and emit helpers."""

    def __init__(self, rw: "Rewriter", op: ops.Op, R: fx.Node):
        self.rw, self.op, self.R = rw, op, R
        self.merge: Merge | None = rw.merges.get(op.node.name)
        self.split, self.include_identity = rw.plan.split, rw.plan.include_identity

    # values -------------------------------------------------------------------------------------
    def call(self, fn, *args, **kwargs) -> fx.Node:
        return self.rw.em.call(fn, *args, **kwargs)

    def call_multi(self, fn, n: int, *args, **kwargs) -> list:
        node = self.call(fn, *args, **kwargs)
        return [self.rw.em.graph.call_function(operator.getitem, (node, i)) for i in range(n)]

    def fwd(self, node: fx.Node) -> fx.Node:
        return self.rw.env[node]

    @property
    def a(self) -> fx.Node:
        return self.fwd(self.op.inputs[0])

    @property
    def forward_output(self) -> fx.Node:
        return self.fwd(self.op.node)

    @property
    def weight(self) -> torch.Tensor:
        return self.op.params["weight"]

    @property
    def bias(self):
        return self.op.params.get("bias")

    @property
    def nonnegative(self) -> bool:
        return self.rw.nonnegative.get(self.op.inputs[0].name, False)

    def tap(self, name: str, node) -> None:
        if self.rw.taps is not None and node is not None:
            self.rw.taps[name] = node

    # layers ---------------------------------------------------------------------------------------
    def _in_shape1(self) -> tuple:
        return (1, *self.op.in_shape[1:])

    def affine(self, x, weight: torch.Tensor, bias):
        """layer(x; weight, bias) for this op's conv/linear geometry. `x` may be a node, "ones" or a constant
        tensor; the latter two are evaluated now, at compile time, and enter the graph as constants."""
        if isinstance(x, fx.Node):
            return self.call(*self._affine_call(x, weight, bias))
        return self.rw.em.const(rules.broadcast_compact(self.affine_value(x, weight, bias)), "z")

    def affine_value(self, x, weight: torch.Tensor, bias) -> torch.Tensor:
        """layer(x) computed now for a constant x ("ones" or a tensor broadcast to the input shape), batch 1."""
        x = (torch.ones(self._in_shape1(), dtype=weight.dtype) if isinstance(x, str)
             else x.to(weight.dtype).expand(self._in_shape1()))
        fn, *args = self._affine_call(x, weight, bias)
        with torch.no_grad():
            return fn(*args)

    def _affine_call(self, x, weight, bias):
        if self.op.kind == ops.LINEAR:
            return (F.linear if weight.dim() == 2 else ops.grouped_linear, x, weight, bias)
        p = self.op.params
        return (F.conv2d, x, weight, bias, p["stride"], p["padding"], p["dilation"], p["groups"])

    def affine_transpose(self, s: fx.Node, weight: torch.Tensor) -> fx.Node:
        """layerᵀ(s; weight): the input-side map of this op's linear part, shaped like the op's input."""
        if self.op.kind == ops.LINEAR:  # s @ W: no transposed copy of the weight is kept beside W
            if weight.dim() == 3:  # side-by-side layers (ops.grouped_linear): s_g @ W_g per group
                return self.call(ops.grouped_linear_transposed, s, weight)
            return self.call(torch.matmul, s, weight)
        return self.rw.em_conv_transpose(s, weight, self.op)

    def avgpool_transpose(self, s: fx.Node, kernel, stride, padding, ceil_mode: bool = False,
                          count_include_pad: bool = True) -> fx.Node:
        """poolᵀ(s): each input position receives Σ over the windows holding it of s_w / d_w, d_w being the divisor
        PyTorch used for window w (k_h·k_w, or fewer for windows cut off by ceil_mode or count_include_pad=False)."""
        in_shape = self.op.in_shape
        c, h, w = in_shape[1:]
        kh, kw = kernel
        if len(self.op.out_shape) != 4:  # a spatial mean without keepdim: [N, C] -> [N, C, 1, 1]
            s = self.call(torch.reshape, s, (-1, c, 1, 1))
        if (kh, kw) == (h, w) and tuple(padding) == (0, 0):  # global pooling: spread evenly
            # a broadcast multiply, not expand(): ONNX shape inference then keeps the symbolic batch size
            return self.call(torch.mul, s, torch.full((1, 1, h, w), 1.0 / (kh * kw)))
        out_hw = tuple(self.op.out_shape[-2:])
        args = (tuple(kernel), tuple(stride), tuple(padding), ceil_mode, count_include_pad)
        ones = torch.ones(1, 1, h, w)
        inv_divisor = F.avg_pool2d(ones, *args) / F.avg_pool2d(ones, *args, divisor_override=1)
        if torch.allclose(inv_divisor, torch.full_like(inv_divisor, 1.0 / (kh * kw)), rtol=0, atol=1e-12):
            kernel_t = torch.full((c, 1, kh, kw), 1.0 / (kh * kw))
        else:
            s = self.call(torch.mul, s, inv_divisor)
            kernel_t = torch.ones(c, 1, kh, kw)
        full = [(o - 1) * st - 2 * p + k for o, st, p, k in zip(out_hw, stride, padding, (kh, kw))]
        out_pad = tuple(max(0, n - f) for n, f in zip((h, w), full))
        back = self.call(F.conv_transpose2d, s, kernel_t, None, tuple(stride), tuple(padding), out_pad, c)
        if full[0] > h:  # ceil_mode windows reaching past the input: drop what falls outside
            back = self.call(torch.narrow, back, 2, 0, h)
        if full[1] > w:
            back = self.call(torch.narrow, back, 3, 0, w)
        return back

    def pool_transpose(self, s: fx.Node) -> fx.Node:
        """poolᵀ(s) for this op's average pool: its window geometry, or its exact pooling matrix (adaptive pooling
        with unequal windows)."""
        p = self.op.params
        if "axes" in p:  # a separable linear map (resampling, 1-d pooling): Aᵀ along each of its axes
            return self.axes_transpose(s, p["axes"])
        if "fold" in p:  # F.fold sums patches: its transpose cuts them out again
            g = p["fold"]
            return self.call(F.unfold, s, g["kernel_size"], g["dilation"], g["padding"], g["stride"])
        if "matrix" not in p:
            return self.avgpool_transpose(s, p["kernel"], p["stride"], p["padding"], p["ceil_mode"],
                                          p["count_include_pad"])
        c, h, w = self.op.in_shape[1:]
        cells = p["matrix"].shape[0]
        s = self.call(torch.reshape, s, (-1, c, cells))
        back = self.call(torch.matmul, s, p["matrix"])
        return self.call(torch.reshape, back, (-1, c, h, w))

    def axes_transpose(self, s: fx.Node, axes) -> fx.Node:
        """Σ_out A[out, in] · s[out] along each (dim, A) of a separable linear map: matmuls with constant matrices
        on the last two dims (s @ A along the last, Aᵀ @ s along the one before)."""
        rank = len(self.op.out_shape)
        for d, a in axes:
            if d % rank == rank - 1:
                s = self.call(torch.matmul, s, a)
            elif d % rank == rank - 2:
                s = self.call(torch.matmul, a.t().contiguous(), s)
            else:
                raise UnsupportedOpError(f"{describe_node(self.op.node)}: a linear map along dim {d}")
        return s

    def to_input_shape(self, r, i: int):
        """Relevance at the op's output shape summed back to input i's shape where that input broadcasts."""
        if r is None:
            return None
        shape, out = tuple(self.op.inputs[i].meta["shape"]), tuple(self.op.out_shape)
        if shape == out:
            return r
        lead = len(out) - len(shape)
        dims = tuple(range(lead)) + tuple(lead + d for d, n in enumerate(shape) if n == 1 and out[lead + d] != 1)
        if dims:
            r = self.call(torch.sum, r, dims, True)
        if lead:
            r = self.call(torch.reshape, r, (-1, *shape[1:]) if len(shape) else ())
        return r

    def input_support(self):
        """1 where this op's input carries a value from the layers before it, 0 where it is a structural constant
        (explicit zero padding such as timm's "same" padding, an upsampled copy's gaps): followed back through the
        structural ops just before the op. None when every position carries a value."""
        from .rules.structure import move_map

        def per_sample(node) -> bool:  # batch in dim 0, one row per sample (not a k·B window layout)
            return node.meta.get("batch_dim", 0) == 0 and tuple(node.meta["shape"][:1]) == (1,)

        def support(node):
            op = ops.describe(node, self.rw.traced) if node.op != "placeholder" else None
            shape = tuple(node.meta["shape"])  # at the compile's batch of 1
            if op is None or not per_sample(node) or not all(per_sample(i) for i in op.inputs
                                                             if isinstance(i, fx.Node)):
                return torch.ones(shape)
            if op.kind == ops.PAD:
                return F.pad(support(op.inputs[0]), op.params["pad"])
            if op.kind == ops.RESHAPE:
                return support(op.inputs[0]).reshape(shape)
            if op.kind == ops.SLICE:  # basic indexing of a batch-1 tensor: the same index on its support
                return support(op.inputs[0])[op.params["index"]].reshape(shape)
            if op.kind == ops.MOVE:
                out = torch.zeros(int(torch.Size(shape).numel()))
                for x, (source, target) in zip(op.inputs, move_map(op)):
                    out[target] = support(x).reshape(-1)[source]
                return out.reshape(shape)
            return torch.ones(shape)

        if not per_sample(self.op.inputs[0]):
            return None
        mask = support(self.op.inputs[0])
        return None if bool((mask != 0).all()) else (mask != 0).float()

    def const_input(self, t: torch.Tensor) -> torch.Tensor:
        return t.expand(self._in_shape1())

    def box_bound(self, v, which: str) -> torch.Tensor:
        if v is None:
            v = self.rw.plan.box_low if which == "low" else self.rw.plan.box_high
        if v is None:
            raise UnsupportedOpError(f"{describe_node(self.op.node)}: zbox needs {which} bounds")
        t = torch.as_tensor(v, dtype=torch.float32)
        if t.dim() == 1:
            t = t.view(1, -1, 1, 1) if len(self.op.in_shape) == 4 else t.view(1, -1)
        return t

    # structure --------------------------------------------------------------------------------------
    def unpad(self, R: fx.Node, pad: tuple) -> fx.Node:
        shape = self.op.out_shape
        index = [slice(None)] * len(shape)
        for i in range(len(pad) // 2):
            d = len(shape) - 1 - i
            index[d] = slice(pad[2 * i], shape[d] - pad[2 * i + 1])
        return self.call(operator.getitem, R, tuple(index))

    def unslice(self, R: fx.Node, index: tuple) -> fx.Node:
        in_shape = self.op.in_shape
        node = self.op.node
        index = list(index)
        if Ellipsis in index:
            i = index.index(Ellipsis)
            index[i:i + 1] = [slice(None)] * (len(in_shape) - (len(index) - 1))
        index += [slice(None)] * (len(in_shape) - len(index))
        if any(e is None or not isinstance(e, (int, slice)) for e in index) or len(index) != len(in_shape):
            raise UnsupportedOpError(f"{describe_node(node)}: indexing {tuple(index)} has no relevance rule")
        if index[0] != slice(None):
            raise UnsupportedOpError(f"{describe_node(node)}: indexing the batch dimension")
        out = R
        for d in range(len(in_shape) - 1, 0, -1):
            e, size = index[d], in_shape[d]
            pos = sum(isinstance(x, slice) for x in index[:d])
            if isinstance(e, int):
                i = e % size
                out = self.call(torch.unsqueeze, out, pos)
                start, step, count = i, 1, 1
            else:
                start, stop, step = e.indices(size)
                count = len(range(start, stop, step))
                if step < 1:
                    raise UnsupportedOpError(f"{describe_node(node)}: negative slice steps")
                if (start, step, count) == (0, 1, size):
                    continue
            if step > 1:  # put step-1 zeros after every element
                zeros = self.call(torch.zeros_like, out)
                out = self.call(torch.stack, [out] + [zeros] * (step - 1), pos + 1)
                out = self.call(torch.flatten, out, pos, pos + 1)
                length = count * step
            else:
                length = count
            right = size - start - length
            if right < 0:
                out = self.call(torch.narrow, out, pos, 0, length + right)
                right = 0
            pad = [0, 0] * (self.rank_of(out, in_shape, index, d) - 1 - pos) + [start, right]
            out = self.call(F.pad, out, tuple(pad))
        return out

    @staticmethod
    def rank_of(_out, in_shape, index, d) -> int:
        """Rank of the partially restored tensor: dims before d still lack their int-indexed axes."""
        return len(in_shape) - sum(isinstance(x, int) for x in index[:d])


def _padded_slice(part, rank: int):
    """(dim, start, right, source) of a relevance `F.pad(source, pad)` that pads one dimension only with zeros,
    else None."""
    if not (isinstance(part, fx.Node) and part.op == "call_function" and part.target is F.pad
            and len(part.args) == 2 and not part.kwargs):
        return None
    source, pad = part.args
    padded = [i for i in range(0, len(pad), 2) if pad[i] or pad[i + 1]]
    if len(padded) != 1 or len(pad) > 2 * rank:
        return None
    i = padded[0]
    return rank - 1 - i // 2, pad[i], pad[i + 1], source


def gather_padded_slices(em: "Emitter", parts: list, shape) -> list:
    """The relevance parts of a value, with the zero-padded pieces that come back from disjoint slices of one
    dimension (x[:, t] for every step t of an unrolled LSTM, x[:, :k] and x[:, k:]) joined by one concatenation
    instead of a padded full-size tensor per piece summed one by one: the same values (each element is one piece's
    value plus zeros), a node and a pass over the whole tensor less per piece. Overlapping slices (both directions
    of a bidirectional LSTM) make one concatenation per run of disjoint ones."""
    if shape is None or len(parts) < 2:
        return parts
    rank = len(shape)
    groups: dict[int, list] = {}
    for part in parts:
        found = _padded_slice(part, rank)
        if found is not None:
            groups.setdefault(found[0], []).append((found[1], shape[found[0]] - found[2], part, found[3]))
    chains = []  # each a run of disjoint pieces of one dimension, in order (a bidirectional LSTM makes two)
    for dim, pieces in groups.items():
        runs: list[list] = []
        for piece in sorted(pieces, key=lambda piece: piece[0]):
            run = next((r for r in runs if r[-1][1] <= piece[0]), None)
            if run is None:
                runs.append([piece])
            else:
                run.append(piece)
        chains += [(dim, run) for run in runs if len(run) > 1]
    out = list(parts)
    for dim, pieces in chains:

        def padded(source, left, right):
            if not (left or right):
                return source
            return em.call(F.pad, source, (0, 0) * (rank - 1 - dim) + (left, right))

        joined = [padded(source, 0, (following[0] if following else end) - end)
                  for (start, end, _, source), following in zip(pieces, pieces[1:] + [None])]
        whole = em.call(torch.cat, joined, dim)
        whole = padded(whole, pieces[0][0], shape[dim] - pieces[-1][1])
        for _, _, part, _ in pieces:
            out.remove(part)
            if not part.users:
                em.graph.erase_node(part)
        out.append(whole)
    return out


class Rewriter:
    """Builds the explainer GraphModule from a traced model, its merges and a rule plan."""

    def __init__(self, traced: Traced, merges: list[Merge], plan: Plan, taps: bool = False,
                 trace_nodes: bool = False, constant_pool: dict | None = None):
        self.traced, self.plan = traced, plan
        self.constant_pool = {} if constant_pool is None else constant_pool  # shared with later builds (Emitter)
        self.merges = {m.node: m for m in merges}
        self.block_inputs = [m.fork for m in merges]
        self.taps: dict | None = {} if (taps or trace_nodes) else None
        # the conservation trace (`graphlrp.verify`): for every node of the relevance pass, in relevance order, the
        # batch total of the relevance arriving at it ("node:NAME") and of each share it hands on ("node:NAME>i");
        # summed where they are made, so no relevance tensor outlives its use
        self.node_sums: dict | None = {} if trace_nodes else None
        self.env: dict[fx.Node, fx.Node] = {}
        self.nonnegative: dict[str, bool] = {}

    # forward ------------------------------------------------------------------------------------------
    def _copy_forward(self, graph: fx.Graph):
        x = graph.placeholder("input")
        target = graph.placeholder("target")
        logits = None
        for node in self.traced.graph.nodes:
            if node.op == "placeholder":
                self.env[node] = x
            elif node.op == "output":
                logits = self.env[node.args[0]]
            elif (op := self._separable_op(node)) is not None:
                # a separable linear map (bilinear/bicubic resampling, 1-d pooling) as its exact per-axis matrices:
                # plain matmuls every exporter handles, the same weights the relevance pass uses
                y = self.env[op.inputs[0]]
                rank = len(op.in_shape)
                for d, a in op.params["axes"]:
                    if d % rank == rank - 1:
                        y = graph.call_function(torch.matmul, (y, self.em.const(a.t().contiguous(), "resample")))
                    else:
                        y = graph.call_function(torch.matmul, (self.em.const(a, "resample"), y))
                self.env[node] = y
            elif (op := self._pooling_matrix_op(node)) is not None:
                # adaptive pooling with unequal windows as its exact matrix: exporters need no input sizes
                c, h, w = op.in_shape[1:]
                flat = graph.call_function(torch.reshape, (self.env[op.inputs[0]], (-1, c, h * w)))
                pooled = graph.call_function(torch.matmul, (flat, self.em.const(op.params["matrix"].t().contiguous(), "pool")))
                self.env[node] = graph.call_function(torch.reshape, (pooled, (-1, c, *op.params["out_hw"])))
            else:
                self.env[node] = graph.node_copy(node, lambda n: self.env[n])
            self.nonnegative[node.name] = self._is_nonnegative(node)
        return x, target, logits

    def _separable_op(self, node: fx.Node):
        if node.op not in ("call_module", "call_function") or "shape" not in node.meta:
            return None
        op = ops.describe(node, self.traced)
        return op if op is not None and op.kind == ops.AVGPOOL and "axes" in op.params else None

    def _pooling_matrix_op(self, node: fx.Node):
        if node.op not in ("call_module", "call_function") or "shape" not in node.meta:
            return None
        op = ops.describe(node, self.traced)
        return op if op is not None and op.kind == ops.AVGPOOL and "matrix" in op.params else None

    def _is_nonnegative(self, node: fx.Node) -> bool:
        """Sign analysis: which forward values are known ≥ 0 (lets z⁺-type rules skip the negative-input terms)."""
        if node.op in ("placeholder", "output", "get_attr") or "shape" not in node.meta or not node.meta.get("dynamic"):
            return False
        op = ops.describe(node, self.traced)
        if op is None:
            return False
        nonneg = [self.nonnegative.get(i.name, False) if isinstance(i, fx.Node) else
                  (isinstance(i, (int, float)) and i >= 0) for i in op.inputs]
        if op.kind == ops.ACTIVATION:
            name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
            if node.op == "call_module":
                name = type(self.traced.module(node)).__name__.lower()
            return name.rstrip("_") in ("relu", "relu6")
        if op.kind in (ops.MAXPOOL, ops.AVGPOOL, ops.RESHAPE, ops.SLICE, ops.PAD, ops.IDENTITY, ops.CAT, ops.MERGE):
            coefficients = op.params.get("coefficients") or (op.params.get("alpha", 1),)
            weights_ok = op.params.get("nonnegative_weights", True)  # bicubic weights can be negative
            return all(nonneg) and all(c >= 0 for c in coefficients) and weights_ok
        return False

    # relevance ------------------------------------------------------------------------------------------
    def build(self) -> fx.GraphModule:
        """The explainer (with taps or the conservation trace as a third output where asked for)."""
        graph = fx.Graph()
        root = torch.nn.Module()
        dtype = next(n for n in self.traced.graph.nodes if n.op == "placeholder").meta.get("dtype")
        self.em = Emitter(graph, root, torch.float64 if dtype == torch.float64 else torch.float32, self.constant_pool,
                          compute_derived=compute_derived_weights(self.plan.derived_weights,
                                                                 self.traced.graph_module))
        x, target, logits = self._copy_forward(graph)
        em = self.em
        k = next(n for n in self.traced.graph.nodes if n.op == "output").args[0].meta["shape"][-1]
        chosen = em.call(torch.where, em.call(torch.lt, target, 0), em.call(torch.argmax, logits, -1), target)
        one_hot = em.call(torch.eq, em.call(torch.unsqueeze, chosen, 1), torch.arange(k).view(1, k).float())
        one_hot = em.call(torch.Tensor.to, one_hot, torch.float32)
        if self.plan.output == "probability":
            start = em.call(torch.softmax, logits, -1)
        else:
            start = logits
        R_out = em.call(torch.mul, one_hot, start)
        if self.taps is not None:
            self.taps["output"] = R_out

        incoming: dict[fx.Node, list] = {}
        output_src = next(n for n in self.traced.graph.nodes if n.op == "output").args[0]
        incoming[output_src] = [R_out]
        relevance = None
        for node in reversed(list(self.traced.graph.nodes)):
            parts = incoming.pop(node, None)
            if not parts:
                continue
            parts = gather_padded_slices(em, parts, node.meta.get("shape"))
            R = parts[0]
            for p in parts[1:]:
                R = em.call(torch.add, R, p)
            if self.node_sums is not None:  # accumulated in float64: relevance can cancel over many elements
                self.node_sums[f"node:{node.name}"] = em.call(torch.sum, R, dtype=torch.float64)
                # Σ|R|: the scale of a merge's rounding, and where relevance of both signs starts to cancel
                self.node_sums[f"mass:{node.name}"] = em.call(torch.sum, em.call(torch.abs, R), dtype=torch.float64)
            if node.op == "placeholder":
                relevance = R
                continue
            if self.taps is not None and node.name in self.block_inputs:
                self.taps[f"block_input:{self.block_inputs.index(node.name)}"] = R
            for i, (src, r) in enumerate(self._apply_rule(node, R)):
                if r is not None:
                    incoming.setdefault(src, []).append(r)
                    if self.node_sums is not None:
                        self.node_sums[f"node:{node.name}>{i}"] = em.call(torch.sum, r, dtype=torch.float64)
        if relevance is None:  # the output does not depend on the input
            relevance = em.call(torch.zeros_like, x)
        if self.taps is not None:
            self.taps["input"] = relevance
            wide = {"dtype": torch.float64} if self.node_sums is not None else {}
            sums = {name: em.call(torch.sum, em.call(torch.flatten, r, 1), 1, **wide) for name, r in self.taps.items()}
            sums.update(self.node_sums or {})
            graph.output((logits, relevance, sums))
        else:
            graph.output((logits, relevance))
        for name, mod in self.traced.graph_module.named_children():
            root.add_module(name, mod)
        for node in self.traced.graph.nodes:
            if node.op == "get_attr":
                _copy_attr(self.traced.graph_module, root, node.target)
        graph.owning_module = root  # the passes look up modules and attributes there
        seeds = [self.env[n] for n in self.traced.graph.nodes if self.nonnegative.get(n.name) and n in self.env]
        # exact peepholes (sign facts, ε folded into conv biases), dead nodes (forward values no rule needed) dropped
        optimize_in_place(graph, root, seeds)
        recompute_large_values(graph, self._numel_per_sample())  # attention weights at long sequences: not held
        return fx.GraphModule(root, graph, "Explainer").eval()  # its code generated once

    def _numel_per_sample(self) -> dict:
        """Explainer node -> elements per sample of the forward value it holds (from the trace's shapes)."""
        batch = max(int(self.traced.example_input.shape[0]), 1)
        numel = {}
        for n in self.traced.graph.nodes:
            shape, node = n.meta.get("shape"), self.env.get(n)
            if shape is not None and isinstance(node, fx.Node):
                numel[node] = math.prod(shape) // batch
        return numel

    def _apply_rule(self, node: fx.Node, R: fx.Node):
        op = ops.describe(node, self.traced)
        if op is None:
            raise UnsupportedOpError(f"no LRP rule for {describe_node(node)}; it lies on the relevance path "
                                     "between the input and the logits")
        if op.kind == ops.UNSUPPORTED:
            raise op.params["error"]
        ctx = RuleContext(self, op, R)
        if op.kind in rules.STRUCTURAL:
            out = rules.structural_relevance(ctx)
        else:
            assignment = self.plan.rules.get(node.name)
            if assignment is None:
                raise UnsupportedOpError(f"the preset assigns no rule to {describe_node(node)} (op kind {op.kind})")
            spec = rules.RULES[assignment.rule]
            if op.kind not in spec.kinds:  # a category spans kinds; its rule may not take every one of them
                raise UnsupportedOpError(f"rule {assignment.rule!r} does not apply to {describe_node(node)} (op kind "
                                         f"{op.kind}; it takes {', '.join(spec.kinds)})")
            out = spec.fn(ctx, **assignment.params)
        # constants (a class token, a position embedding) keep what a rule gives them: it leaves the explanation
        return [(src, r) for src, r in zip(op.inputs, out) if isinstance(src, fx.Node) and src.meta.get("dynamic")]

    def em_conv_transpose(self, s: fx.Node, weight: torch.Tensor, op: ops.Op) -> fx.Node:
        """conv's transposed map, shaped like the conv's input, as stride-1 convolutions (see `optimize`)."""
        p = op.params
        return conv_transpose(self.em, s, weight, p["stride"], p["padding"], p["dilation"], p["groups"],
                              op.in_shape[-2:], op.out_shape[-2:])


def _copy_attr(src: torch.nn.Module, dst: torch.nn.Module, target: str) -> None:
    *path, leaf = target.split(".")
    s, d = src, dst
    for part in path:
        s = getattr(s, part)
        if not hasattr(d, part):
            d.add_module(part, torch.nn.Module())
        d = getattr(d, part)
    value = getattr(s, leaf)
    if isinstance(value, torch.nn.Parameter):
        d.register_parameter(leaf, value)
    elif isinstance(value, torch.Tensor):
        d.register_buffer(leaf, value)
    else:
        setattr(d, leaf, value)
