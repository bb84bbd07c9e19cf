"""Pooling and reductions: max pools, average pools (also adaptive ones with unequal windows, as exact per-cell
matrices), and sum/mean over any dims.

A sum or mean is, by its reduced dims:
* a spatial mean of an NCHW tensor (`x.mean((2, 3))`): an AVGPOOL over the whole map (category `avgpool`);
* over a *branch dim* — the dim `torch.stack` added (seen through gates and scales, as in SK's stack -> x·attn ->
  sum), or a single dim of a tensor of rank >= 5 that is neither the batch dim nor one of the last three (C, H, W),
  such as ResNeSt's radix dim — an n-ary MERGE of the slices (category `merge`, the preset's split);
* otherwise a REDUCE (category `reduction`, the z-rule: relevance in proportion to each term's contribution).

Linear resampling (bilinear / bicubic / linear / area `interpolate`, `nn.Upsample`) and 1-d average pools are
AVGPOOL ops too (category `avgpool`): a fixed linear map applied separably along the trailing spatial axes, its
per-axis matrices derived at compile time from PyTorch's own op (`separable_linear_op`) and checked on a random
input, so the z-rule runs through the op's exact weights.

A max or min over dims (`amax`, `amin`, `max(dim).values`, `min(dim)[0]`; Hiera's mask-unit max-pool) is a
MAX_REDUCE (category `maxpool`): winner-take-all, each output's relevance to its arg-max, split evenly on ties.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UnsupportedOpError
from ..graph import describe_node
from .elementwise import threshold
from .base import move_op
from .base import AVGPOOL, MAX_REDUCE, MAXPOOL, MERGE, REDUCE, Op, arg, describes, is_dynamic_tensor, is_tensor, pair, value


@describes(modules=[nn.MaxPool2d])
def _maxpool_module(node, traced):
    m = traced.module(node)
    return Op(MAXPOOL, node, (node.args[0],),
              dict(kernel=pair(m.kernel_size), stride=pair(m.stride or m.kernel_size), padding=pair(m.padding),
                   dilation=pair(m.dilation), ceil_mode=m.ceil_mode))


@describes(functions=[F.max_pool2d, "torch.max_pool2d"])
def _maxpool_function(node, traced):
    v = lambda i, name, d=None: value(arg(node, i, name, d), traced)  # noqa: E731
    kernel = pair(v(1, "kernel_size"))
    stride = v(2, "stride", None)
    return Op(MAXPOOL, node, (node.args[0],),
              dict(kernel=kernel, stride=pair(stride) if stride else kernel, padding=pair(v(3, "padding", 0)),
                   dilation=pair(v(4, "dilation", 1)), ceil_mode=bool(v(5, "ceil_mode", False))))


def avgpool_op(node, kernel, stride, padding=(0, 0), ceil_mode=False, count_include_pad=True, divisor_override=None):
    kernel, stride, padding = pair(kernel), pair(stride or kernel), pair(padding)
    if divisor_override is not None:
        raise UnsupportedOpError(f"{describe_node(node)}: average pooling with divisor_override")
    return Op(AVGPOOL, node, (node.args[0],), dict(kernel=kernel, stride=stride, padding=padding,
                                                   ceil_mode=bool(ceil_mode),
                                                   count_include_pad=bool(count_include_pad)))


@describes(modules=[nn.AvgPool2d])
def _avgpool_module(node, traced):
    m = traced.module(node)
    return avgpool_op(node, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad, m.divisor_override)


@describes(functions=[F.avg_pool2d, "torch.avg_pool2d"])
def _avgpool_function(node, traced):
    v = lambda i, name, d=None: value(arg(node, i, name, d), traced)  # noqa: E731
    return avgpool_op(node, v(1, "kernel_size"), v(2, "stride", None), v(3, "padding", 0), v(4, "ceil_mode", False),
                      v(5, "count_include_pad", True), v(6, "divisor_override", None))


def _adaptive_out(node, out_size):
    h, w = node.args[0].meta["shape"][-2:]
    return (h, w), tuple(s if o is None else o for o, s in zip(pair(out_size), (h, w)))


def _adaptive_avg(node, out_size):
    """Equal windows: an ordinary average pool. Unequal windows (including upsampling, output > input): the exact
    pooling matrix P [out_h·out_w, h·w], one row per output cell, evaluated once from PyTorch's own op."""
    (h, w), out = _adaptive_out(node, out_size)
    if len(node.args[0].meta["shape"]) != 4:
        raise UnsupportedOpError(f"{describe_node(node)}: adaptive pooling of a non-NCHW tensor")
    if h % out[0] == 0 and w % out[1] == 0:
        k = (h // out[0], w // out[1])
        return avgpool_op(node, k, k)
    basis = torch.eye(h * w, dtype=torch.float64).reshape(h * w, 1, h, w)
    matrix = F.adaptive_avg_pool2d(basis, out).reshape(h * w, out[0] * out[1]).t().contiguous()
    return Op(AVGPOOL, node, (node.args[0],), dict(matrix=matrix.float(), out_hw=out))


@describes(modules=[nn.AdaptiveAvgPool2d])
def _adaptive_avg_module(node, traced):
    return _adaptive_avg(node, traced.module(node).output_size)


@describes(functions=[F.adaptive_avg_pool2d, "torch.adaptive_avg_pool2d"])
def _adaptive_avg_function(node, traced):
    return _adaptive_avg(node, value(arg(node, 1, "output_size"), traced))


@describes(modules=[nn.AdaptiveMaxPool2d], functions=[F.adaptive_max_pool2d, "torch.adaptive_max_pool2d"])
def _adaptive_max(node, traced):
    if node.op == "call_module":
        size = traced.module(node).output_size
    else:
        size = value(arg(node, 1, "output_size"), traced)
        if value(arg(node, 2, "return_indices", False), traced):
            return None  # a (values, indices) pair
    (h, w), out = _adaptive_out(node, size)
    if h % out[0] or w % out[1]:
        raise UnsupportedOpError(f"{describe_node(node)}: adaptive max pooling to {out} from {(h, w)} has unequal "
                                 "windows")
    k = (h // out[0], w // out[1])
    return Op(MAXPOOL, node, (node.args[0],), dict(kernel=k, stride=k, padding=(0, 0), dilation=(1, 1),
                                                   ceil_mode=False))


def _stacked_along(node, dim: int, traced) -> bool:
    """Whether `node` is a torch.stack along `dim`, seen through gates, scales and identities (SK: stack -> x·attn)."""
    from .base import ACTIVATION, GATE, IDENTITY, SCALE, describe
    for _ in range(16):
        if node.op == "call_function" and node.target is torch.stack:
            d = value(arg(node, 1, "dim", 0), traced)
            return d % len(node.meta["shape"]) == dim
        op = describe(node, traced)
        if op is None or op.kind not in (GATE, SCALE, IDENTITY, ACTIVATION) or not op.inputs:
            return False
        if tuple(op.inputs[0].meta["shape"]) != tuple(node.meta["shape"]):
            return False
        node = op.inputs[0]
    return False


def reduction_kind(node, dims: tuple, traced) -> str:
    """AVGPOOL for a spatial mean of NCHW, MERGE over a branch dim, REDUCE otherwise (see the module docstring)."""
    x = node.args[0]
    rank, batch = len(x.meta["shape"]), x.meta.get("batch_dim", 0)
    if len(dims) == 1 and dims[0] != batch and (dims[0] < rank - 3 or _stacked_along(x, dims[0], traced)):
        return MERGE
    return REDUCE


@describes(functions=[torch.mean, torch.sum], methods=["mean", "sum"])
def _reduction(node, traced):
    x = node.args[0]
    shape = x.meta["shape"]
    dims = value(arg(node, 1, "dim"), traced)
    keepdim = bool(value(arg(node, 2, "keepdim", False), traced))
    if dims is None or dims == () or dims == []:
        raise UnsupportedOpError(f"{describe_node(node)}: a reduction over all dims mixes the samples of a batch")
    dims = tuple(sorted(d % len(shape) for d in ((dims,) if isinstance(dims, int) else dims)))
    if x.meta.get("batch_dim", 0) in dims:
        raise UnsupportedOpError(f"{describe_node(node)}: a reduction over the batch dim mixes the samples")
    mean = getattr(node.target, "__name__", node.target) == "mean"
    if mean and len(shape) == 4 and dims == (2, 3):
        return avgpool_op(node, shape[-2:], shape[-2:])
    kind = reduction_kind(node, dims, traced)
    params = dict(dims=dims, keepdim=keepdim, mean=mean)
    if kind == MERGE:
        params.update(arity=shape[dims[0]])
    return Op(kind, node, (x,), params)


# ------------------------------------------------------------------------------------------ max over dims
def max_reduce_op(node, x, dims, keepdim, mode: str, traced) -> Op:
    """`node` = max/min of `x` over `dims` (the values, not the indices)."""
    shape = x.meta["shape"]
    if dims is None or dims == () or dims == []:
        raise UnsupportedOpError(f"{describe_node(node)}: a {mode} over all dims mixes the samples of a batch")
    dims = tuple(sorted(d % len(shape) for d in ((dims,) if isinstance(dims, int) else dims)))
    if x.meta.get("batch_dim", 0) in dims:
        raise UnsupportedOpError(f"{describe_node(node)}: a {mode} over the batch dim mixes the samples")
    return Op(MAX_REDUCE, node, (x,), dict(dims=dims, keepdim=bool(keepdim), mode=mode))


@describes(functions=["torch.amax", "torch.amin"], methods=["amax", "amin"])
def _amax(node, traced):
    name = node.target if isinstance(node.target, str) else node.target.__name__
    dims = value(arg(node, 1, "dim", ()), traced)
    return max_reduce_op(node, node.args[0], dims, value(arg(node, 2, "keepdim", False), traced),
                         "max" if name == "amax" else "min", traced)


def _max_with_dim(producer, traced):
    """(x, dim, keepdim, mode) when `producer` is `max(x, dim)` / `min(x, dim)` (a (values, indices) pair)."""
    if not (isinstance(producer, torch.fx.Node) and producer.op in ("call_function", "call_method")):
        return None
    name = producer.target if isinstance(producer.target, str) else getattr(producer.target, "__name__", "")
    if name not in ("max", "min") or producer.target not in ("max", "min", torch.max, torch.min):
        return None
    dim = arg(producer, 1, "dim")
    if dim is None or is_tensor(dim):
        return None
    return (producer.args[0], value(dim, traced), value(arg(producer, 2, "keepdim", False), traced), name)


@describes(functions=[torch.max, torch.min], methods=["max", "min"])
def _max(node, traced):
    """max(a, b) of two tensors is `maximum`; max(x, dim) is a (values, indices) pair, described where its values
    are taken (`values_of`); max(x) over everything mixes the batch."""
    other = arg(node, 1, "other") if arg(node, 1, "dim") is None else arg(node, 1, "dim")
    if is_tensor(other):
        return threshold(node, traced)
    if other is None:
        name = node.target if isinstance(node.target, str) else node.target.__name__
        raise UnsupportedOpError(f"{describe_node(node)}: a {name} over all dims mixes the samples of a batch")
    return None  # a (values, indices) pair: no tensor of its own


def values_of(node, producer, index, traced):
    """The Op of `max(x, dim)[0]` / `.values`, or None when `producer` is something else."""
    found = _max_with_dim(producer, traced)
    if found is None or index not in (0, "values"):
        return None
    x, dim, keepdim, mode = found
    if not is_dynamic_tensor(x):
        return None
    return max_reduce_op(node, x, dim, keepdim, mode, traced)


@describes(functions=[getattr])
def _getattr(node, traced):
    producer, name = node.args[0], node.args[1]
    return values_of(node, producer, name, traced) if is_tensor(node) else None


# ------------------------------------------------------------------------------------------ separable linear maps
def separable_linear_op(node, traced) -> Op:
    """The AVGPOOL op of a fixed linear map that acts separably on the trailing spatial axes of its one input
    (N, C, *spatial; one or two spatial axes) and on each channel alike: out = A_H · x · A_Wᵀ per channel.

    The per-axis matrices are derived from the op itself: applied to a basis along axis d (ones along the others)
    it gives A_d up to the row sums r of the other axes, read off at one output position p (the product of the
    maps is then Π_d r_d[p_d]^(k-1) too large, divided out of the first). The result is checked against the op on
    a random float64 input of the real shape; an op that is not such a map (non-linear, mixing channels, not
    separable) is an UnsupportedOpError naming the node. Derived once per node (every stage describes it)."""
    cache = traced.__dict__.setdefault("_separable_maps", {})
    if node not in cache:
        try:
            cache[node] = _derive_separable(node, traced)
        except UnsupportedOpError as e:
            cache[node] = e
    if isinstance(cache[node], UnsupportedOpError):
        raise cache[node]
    return Op(AVGPOOL, node, cache[node][0], dict(cache[node][1]))


def _derive_separable(node, traced):
    fn = move_op(node, traced)
    if fn is None or len(fn.inputs) != 1:
        raise UnsupportedOpError(f"{describe_node(node)}: a resampling of more than one input-dependent tensor")
    x = fn.inputs[0]
    shape = tuple(x.meta["shape"])
    if x.meta.get("batch_dim", 0) != 0 or len(shape) not in (3, 4):
        raise UnsupportedOpError(f"{describe_node(node)}: a linear resampling of a tensor that is not "
                                 "[N, C, L] or [N, C, H, W] with the batch first")
    run = lambda t: fn.params["fn"]((t,)).double()  # noqa: E731
    spatial = shape[2:]
    k = len(spatial)
    with torch.no_grad():
        ones = run(torch.ones((1, 1, *spatial), dtype=torch.float64))[0, 0]
        pos = tuple(int(i) for i in torch.unravel_index(ones.abs().argmax(), ones.shape))
        total = float(ones[pos])
        maps = []
        for d, n in enumerate(spatial):
            view = [n if j == d else 1 for j in range(k)]
            basis = torch.eye(n, dtype=torch.float64).reshape(n, 1, *view).expand(n, 1, *spatial)
            out = run(basis.contiguous())[:, 0]  # [n, *out_spatial]
            index = (slice(None),) + tuple(slice(None) if j == d else pos[j] for j in range(k))
            maps.append(out[index].t().contiguous())  # [out_d, n]
        if total == 0:
            raise UnsupportedOpError(f"{describe_node(node)}: maps a constant input to 0: not a resampling")
        maps[0] = maps[0] / total ** (k - 1)
        probe = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        expected = run(probe)
        got = apply_axes(probe, [(2 + d, a) for d, a in enumerate(maps)])
    if got.shape != expected.shape or not bool(((got - expected).abs().max() <= 1e-9 * expected.abs().max()).item()):
        raise UnsupportedOpError(f"no LRP rule for {describe_node(node)}: it is not a fixed linear map acting "
                                 "separably on the spatial axes of each channel")
    axes = [(2 + d, a) for d, a in enumerate(maps)]
    row_sums = apply_axes(torch.ones((1, 1, *spatial), dtype=torch.float64), axes)[0, 0]
    return (x,), dict(axes=axes, row_sums=row_sums, out_spatial=tuple(expected.shape[2:]),
                      nonnegative_weights=all(bool((a >= 0).all()) for a in maps))


def apply_axes(t: torch.Tensor, axes) -> torch.Tensor:
    """t with each [out_d, in_d] matrix of `axes` applied along its dim d."""
    for d, a in axes:
        t = torch.movedim(torch.tensordot(a.to(t.dtype), t, dims=([1], [d])), 0, d)
    return t


_RESAMPLING = ("linear", "bilinear", "bicubic", "trilinear", "area")


@describes(modules=[nn.Upsample], functions=[F.interpolate])
def _interpolate(node, traced):
    """Nearest(-exact) resizing copies values: a MOVE. The other modes are fixed linear maps (see above)."""
    if node.op == "call_module":
        mode = traced.module(node).mode
    else:
        mode = value(arg(node, 3, "mode", "nearest"), traced)
    if mode not in _RESAMPLING:
        return move_op(node, traced)
    return separable_linear_op(node, traced)


@describes(modules=[nn.AvgPool1d], functions=[F.avg_pool1d, "torch.avg_pool1d"])
def _avgpool1d(node, traced):
    """A 1-d average pool (NextViT's sequence reduction): a fixed linear map along the last axis."""
    return separable_linear_op(node, traced)


@describes(modules=[nn.Fold], functions=[F.fold])
def _fold(node, traced):
    """F.fold (VOLO's outlook attention): sliding patches [N, C·k·k, L] summed back into [N, C, H, W], a fixed
    linear map whose transpose is F.unfold with the same geometry; each output cell the sum of the patch entries
    that land on it. Category `avgpool`: the z-rule through it, R_in = x ⊙ unfold(R / stab(fold(x)))."""
    if node.op == "call_module":
        m = traced.module(node)
        geometry = dict(output_size=m.output_size, kernel_size=m.kernel_size, dilation=m.dilation,
                        padding=m.padding, stride=m.stride)
    else:
        v = lambda i, name, d=None: value(arg(node, i, name, d), traced)  # noqa: E731
        geometry = dict(output_size=v(1, "output_size"), kernel_size=v(2, "kernel_size"), dilation=v(3, "dilation", 1),
                        padding=v(4, "padding", 0), stride=v(5, "stride", 1))
    x = node.args[0]
    if not is_dynamic_tensor(x) or x.meta.get("batch_dim", 0) != 0 or len(x.meta["shape"]) != 3:
        raise UnsupportedOpError(f"{describe_node(node)}: fold of a tensor that is not [N, C·k·k, L]")
    geometry = {k: pair(g) for k, g in geometry.items()}
    row_sums = F.fold(torch.ones(tuple(x.meta["shape"]), dtype=torch.float64), **geometry)[0]
    return Op(AVGPOOL, node, (x,), dict(fold=geometry, row_sums=row_sums))
