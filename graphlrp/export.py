"""Stage 4 — export: the explainer graph as one ONNX model, checked by onnx.checker and onnxruntime parity.

Contract: inputs `input` float32 [N, C, H, W] and `target` int64 [N] (-1 = the sample's top-1 prediction);
outputs `logits` float32 [N, K] and `relevance` float32 [N, C, H, W]; batch dynamic. metadata_props carry what a
runtime needs to preprocess images and label results (see `METADATA_KEYS`). The graph is written from the
explainer's fx graph by `graphlrp.fx_to_onnx` (no torch.onnx exporter), each model weight stored once.
"""
from __future__ import annotations

import copy
import json
import math
import operator
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F

from .errors import ExportError
from .memory import release_freed_memory
from .optimize import flipped_kernel

PARITY_TOLERANCE = 1e-4
# an ill-conditioned explainer's float32 relevance is off a float64 run on every runtime; onnxruntime passes within
# this factor of the error simulated float32 rounding causes (`expected_float32_error`). Different CPUs' kernels
# (AVX2, AVX-512) and thread counts move a real float32 error by ~2-3x, and onnxruntime's kernels land 4-12x above
# the simulated error on attnlrp's ViT-B/16 (random weights); a translation error is a fixed offset orders of
# magnitude above rounding, and a well-conditioned explainer is held to PARITY_TOLERANCE
CONDITIONING_MARGIN = 30.0
METADATA_KEYS = ("graphlrp_version", "preset", "split", "include_identity", "source_model", "input_size",
                 "preprocessing", "labels", "output_relevance", "certificate")


# what check_parity's pass was judged on: onnxruntime within PARITY_TOLERANCE of PyTorch; of the float64 run; no
# further from the float64 run than PyTorch's float32; within CONDITIONING_MARGIN x the simulated rounding error
PARITY_BASES = ("pytorch", "float64", "no-further-than-pytorch", "rounding-allowance")


@dataclass
class ExportReport:
    path: str
    max_rel_diff_relevance: float
    max_rel_diff_logits: float
    size_bytes: int
    opset: int
    # only measured when the direct comparison misses PARITY_TOLERANCE: both runtimes against a float64 run of the
    # same graph (an ill-conditioned explainer, e.g. ε = 1e-6 at a near-zero sum, is not float32-exact anywhere)
    float32_error_pytorch: float | None = None
    float32_error_onnxruntime: float | None = None
    # the error float32 rounding itself causes on this graph and batch (float64 runs with simulated rounding): the
    # allowance's base, the same on every CPU (the largest over the runs the verdict needed: each can only raise it)
    float32_error_expected: float | None = None
    # the same for the logits: a forward can be ill-conditioned too (random-weight FBNetV3-D: PyTorch's float32
    # logits 8.8% from float64), and then no float32 runtime reproduces another's logits to the tolerance
    float32_error_logits_onnxruntime: float | None = None
    float32_error_logits_expected: float | None = None
    # the relevance was 0 everywhere on the parity batch: the output does not depend on the input (a zero
    # classification head, as torchvision initialises a ViT's), so parity holds trivially and proves nothing
    zero_relevance: bool = False
    # what the compile measured on this explainer (graphlrp.verify.Certificate.to_dict(): ΣR_in / R_out per
    # sample, forward error, merge gap, largest per-node leaks); None for an explainer compiled with verify=False
    certificate: dict | None = None
    # "fp32", or "fp16": weights and every tensor of the graph in float16, input and outputs float32 (cast at the
    # boundary); its check compares it with the float32 explainer instead of asking for parity (see export_onnx)
    precision: str = "fp32"
    fp16: dict | None = None
    # PyTorch's float32 logits against the float64 run (measured with float32_error_pytorch)
    float32_error_logits_pytorch: float | None = None
    # which criterion the parity check passed on (one of PARITY_BASES); None before the check or where it failed
    parity_basis: str | None = None

    def parity_summary(self) -> str:
        """One line for a person: how far onnxruntime is from PyTorch and, where that is over the tolerance, what
        it was judged against instead."""
        direct = f"onnxruntime vs PyTorch: max relative difference {self.max_rel_diff:.1e}"
        if self.parity_basis in (None, "pytorch"):
            return f"{direct} (limit {_exp(PARITY_TOLERANCE)})"
        against = (f"against a float64 run of the same graph: onnxruntime {self.float32_error_onnxruntime:.1e}, "
                   f"PyTorch float32 {self.float32_error_pytorch:.1e}")
        if self.parity_basis == "float64":
            return f"{direct}; {against}: onnxruntime is float32-exact (limit {_exp(PARITY_TOLERANCE)})"
        if self.parity_basis == "no-further-than-pytorch":
            return f"{direct} (an ill-conditioned explainer); {against}: onnxruntime is the closer of the two"
        return (f"{direct} (an ill-conditioned explainer); {against}; float32 rounding itself moves it "
                f"{self.float32_error_expected:.1e} (simulated; allowed {CONDITIONING_MARGIN:g}x that)")

    @property
    def max_rel_diff(self) -> float:
        return max(self.max_rel_diff_relevance, self.max_rel_diff_logits)


def _exp(x: float) -> str:
    """1e-4, not 1e-04."""
    return f"{x:.0e}".replace("e-0", "e-").replace("e+0", "e+")


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b| over the whole tensor (the parity measure used throughout graphlrp)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def build_metadata(explainer, extra: dict | None, **preprocessing) -> dict:
    """The metadata_props: what the compiler knows, the preprocessing the runtime must apply (with any
    `resize`/`crop_pct`/`interpolation`/`mean`/`std` overrides) and the class names (`labels`)."""
    from .labels import check_labels
    from .version import __version__

    info = explainer.info
    c = info["input_size"][0]
    labels = preprocessing.pop("labels", None)
    image_prep = explainer.preprocessing.with_overrides(**preprocessing)
    if len(image_prep.mean) != c:
        raise ExportError(f"the model takes {c} channels but the preprocessing normalises {len(image_prep.mean)}")
    meta = {
        "graphlrp_version": __version__,
        "preset": info["preset"],
        "split": info["split"],
        "include_identity": "true" if info["include_identity"] else "false",
        "source_model": info["source_model"],
        "input_size": json.dumps(list(info["input_size"])),
        "output_relevance": info["output_relevance"],
        "preprocessing": json.dumps(image_prep.to_dict()),
    }
    labels = check_labels(labels, explainer.num_classes, strict=True) if labels is not None else explainer.labels
    if labels:
        meta["labels"] = json.dumps(labels)
    if info.get("certificate") is not None:
        meta["certificate"] = json.dumps(info["certificate"])
    for key, value in (extra or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    return meta


def _num_classes(explainer) -> int:
    output = next(n for n in explainer._traced.graph.nodes if n.op == "output")
    return int(output.args[0].meta["shape"][-1])


def _parity_batch(explainer, batch: int = 2, seed: int = 0):
    """A random input batch and mixed targets: even samples their top-1 (-1), odd ones a random class."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *explainer.info["input_size"], generator=g)
    target = torch.full((batch,), -1, dtype=torch.long)
    target[1::2] = torch.randint(0, _num_classes(explainer), (len(target[1::2]),), generator=g)
    return x, target


def _lower(explainer, opset: int, x: torch.Tensor, target: torch.Tensor):
    """The ONNX model, written from the explainer's fx graph (`graphlrp.fx_to_onnx`), and the PyTorch explainer's
    outputs on (x, target) from the same run (the lowering executes the graph): the PyTorch side of the parity
    check, without running the explainer again."""
    from .fx_to_onnx import lower

    model, (logits, relevance) = lower(explainer.graph_module, (x, target), ["input", "target"],
                                       ["logits", "relevance"], opset)
    return model, (logits, relevance)


def forward_onnx(model: torch.nn.Module, example_input: torch.Tensor, opset: int = 17):
    """The model's plain forward as an ONNX ModelProto (input `input`, output `logits`, batch dynamic), written by
    the same fx → ONNX lowering as the explainers: the reference the explainer's cost is compared with, and a fast
    forward for the evaluation's many model calls. Raises graphlrp's TraceError/ExportError."""
    from .fx_to_onnx import lower
    from .trace import trace

    traced = trace(model, example_input)
    pair = example_input[:1].expand(2, *example_input.shape[1:]).contiguous()  # batch 2: dim 0 tells apart
    model_proto, _ = lower(traced.graph_module, (pair,), ["input"], ["logits"], opset)
    return model_proto


class _Float64Run(torch.fx.Interpreter):
    """A graph run in float64 without a float64 copy of the whole graph module: each floating-point operand of an
    op (a parameter, buffer or constant included) is cast where the op takes it and freed when it returns, and a
    module call runs a float64 copy of that one leaf module. Peak memory: the float32 graph plus the float64
    activations alive at once and one op's float64 weights, instead of a deep copy of every weight in float32 and
    float64 (or, casting weights where they are read, every weight the relevance pass uses again held in float64
    from the forward on: 1.8 GB for a 300 M-parameter ViT).

    With `rounding_seed`, every floating-point operand of every op that rounds (sums, products, quotients,
    convolutions, matmuls, reductions, the transcendental functions; `_ROUNDING_OPS`) and every parameter of a
    leaf module is multiplied by 1 + u·s·2⁻²⁴, u uniform in [−1, 1] from that seed: a float64 run that meets the
    rounding a float32 run meets, as a random sample. s is 1 for an op that sums nothing; an op that adds up K
    terms into each output (a matmul, linear layer, convolution, einsum, sum or mean) rounds every partial sum on
    the way, an error sqrt(K/2) times that of rounding the terms alone for terms of either sign (recursive
    summation), so its operands get s = sqrt(K/2) (`accumulated_terms`). With s = 1 the simulation missed it:
    ViT-B/16's attnlrp relevance in PyTorch's float32 kernels landed 8-14x further from the float64 run than the
    simulated runs, on a patch whose ε-rule denominator (1.6e-6) is a 768-term sum that cancels. How far
    the run lands from the exact one is the error any correct float32 runtime must be allowed (cancellation inside
    a sum included: each term is perturbed), and it does not depend on the CPU, its kernels or the machine's
    load. A relative perturbation keeps every sign and zero, and
    the ops that are exact in float32 (moves, comparisons, max, ReLU, selections) see their operands untouched,
    so masks, winners and one-hot targets decide as in the exact run."""

    # the perturbations 1 + u·2⁻²⁴ are read from a pool drawn once per seed, at a random offset per operand (wrapping
    # around for an operand larger than the pool): drawing fresh numbers for every operand of every op took 18 of
    # the 42 s of GC ViT-B's export check. The pool's length is odd, so no axis of a tensor lines up with its period.
    NOISE_POOL = (1 << 22) + 1

    def __init__(self, module, rounding_seed: int | None = None):
        super().__init__(module)
        self.generator = None if rounding_seed is None else torch.Generator().manual_seed(rounding_seed)
        self._factors = None
        if self.generator is not None:
            u = torch.rand(self.NOISE_POOL, generator=self.generator, dtype=torch.float64).mul_(2).sub_(1)
            self._factors = u.mul_(2.0 ** -24).add_(1)

    def _round(self, v, scale: float = 1.0):
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            return v
        n, pool = v.numel(), self.NOISE_POOL
        start = int(torch.randint(pool, (1,), generator=self.generator))
        if start + n <= pool:
            factors = self._factors[start:start + n]
        else:
            factors, done = torch.empty(n, dtype=torch.float64), 0
            while done < n:  # the pool from `start` on, then again from its beginning
                take = min(pool - start, n - done)
                factors[done:done + take] = self._factors[start:start + take]
                done, start = done + take, 0
        if scale != 1.0:
            factors = (factors - 1).mul_(scale).add_(1)
        return v * factors.view(v.shape)

    def _rounded(self, target, args, kwargs):
        """The operands in float64 (the graph may make float32 tensors of its own, EdgeNeXt's position code from
        torch.zeros), perturbed where `target` rounds and a rounding seed is set."""
        args, kwargs = torch.fx.node.map_aggregate(args, _as_float64), torch.fx.node.map_aggregate(kwargs, _as_float64)
        if self.generator is None or target not in _ROUNDING_OPS:
            return args, kwargs
        scale = summation_scale(accumulated_terms(target, args, kwargs))
        rounded = lambda v: self._round(v, scale)  # noqa: E731
        return torch.fx.node.map_aggregate(args, rounded), torch.fx.node.map_aggregate(kwargs, rounded)

    def call_function(self, target, args, kwargs):
        if target in _EXACT_WEIGHT_OPS and not _any_float64((args, kwargs)):
            # W⁺, W⁻, a flipped kernel made from float32 weights: exact in float32, so made there (half the bytes)
            # and cast where a rounding op reads them
            return super().call_function(target, args, kwargs)
        args, kwargs = self._rounded(target, args, kwargs)
        if target in (torch.conv2d, F.conv2d):
            return conv2d_float64(*args, **kwargs)
        if target in (torch.conv_transpose2d, F.conv_transpose2d):
            return conv_transpose2d_float64(*args, **kwargs)
        return super().call_function(target, args, kwargs)

    def call_method(self, target, args, kwargs):
        return super().call_method(target, *self._rounded(target, args, kwargs))

    def call_module(self, target, args, kwargs):
        module = super().fetch_attr(target)
        args, kwargs = torch.fx.node.map_aggregate(args, _as_float64), torch.fx.node.map_aggregate(kwargs, _as_float64)
        if isinstance(module, torch.nn.Conv2d) and module.padding_mode == "zeros" and len(args) == 1 and not kwargs:
            # its weights cast where they are read, like a functional conv's: no copy of the module (a deep copy
            # per call was a fifth of NASNet-A-Large's float64 run)
            weight, bias = _as_float64(module.weight), _as_float64(module.bias)
            if self.generator is not None:
                scale = summation_scale(accumulated_terms(torch.conv2d, (args[0], weight), {}))
                weight, bias, args = (self._round(weight, scale), self._round(bias, scale),
                                      (self._round(args[0], scale),))
            return conv2d_float64(args[0], weight, bias, module.stride, module.padding, module.dilation,
                                  module.groups)
        if (isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not module.training
                and module.running_mean is not None and len(args) == 1 and not kwargs):
            stats = [_as_float64(t) for t in (module.running_mean, module.running_var, module.weight, module.bias)]
            if self.generator is not None:
                stats, args = [self._round(t) for t in stats], (self._round(args[0]),)
            return F.batch_norm(args[0], *stats, False, 0.0, module.eps)
        if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
            module = copy.deepcopy(module).double()
            if self.generator is not None:
                # a linear layer sums in_features terms per output; other leaf modules are taken as not summing
                scale = summation_scale(module.in_features if isinstance(module, torch.nn.Linear) else 1)
                rounded = lambda v: self._round(v, scale)  # noqa: E731
                with torch.no_grad():
                    for t in list(module.parameters()) + list(module.buffers()):
                        if t.is_floating_point():
                            t.copy_(rounded(t))
                args, kwargs = (torch.fx.node.map_aggregate(args, rounded),
                                torch.fx.node.map_aggregate(kwargs, rounded))
        return module(*args, **kwargs)


def _pair(v) -> tuple:
    return (v, v) if isinstance(v, int) else tuple(v)


def conv2d_float64(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """F.conv2d, with grouped convolutions of few taps per output (depthwise ones) computed as a sum over kernel
    taps of shifted slices. PyTorch's float64 CPU convolution has no fast kernel for them: it runs one small
    GEMM per group, 0.6 s for one 7x7 depthwise layer of ConvNeXt at 56x56, which made the float64 reference of
    a ConvNeXt-B explainer take minutes. Same sums, in float64; other convolutions go to F.conv2d."""
    taps = weight.shape[1] * weight.shape[2] * weight.shape[3] if weight.dim() == 4 else 0
    if groups == 1 or taps > 64 or isinstance(padding, str) or x.dim() != 4:
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    n, _, h, w = x.shape
    c_out, per_group, kh, kw = weight.shape
    oh, ow = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    x = F.pad(x, (pw, pw, ph, ph))
    first_input = (torch.arange(c_out, device=x.device) // (c_out // groups)) * per_group
    out = x.new_zeros(n, c_out, oh, ow) if bias is None else bias.view(1, -1, 1, 1).expand(n, -1, oh, ow).clone()
    for c in range(per_group):
        xc = x if per_group == 1 and c_out == x.shape[1] else x.index_select(1, first_input + c)
        for i in range(kh):
            for j in range(kw):
                patch = xc[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
                out.addcmul_(patch, weight[:, c, i, j].view(1, -1, 1, 1))
    return out


def conv_transpose2d_float64(s, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """F.conv_transpose2d, with depthwise ones (one input channel per group) computed as a sum over kernel taps of
    strided slices of the output, the adjoint of `conv2d_float64`'s: PyTorch's float64 kernel runs them group by
    group (74,000 calls in one float64 run of NASNet-A-Large's explainer). Same sums, in float64."""
    taps = weight.shape[2] * weight.shape[3] if weight.dim() == 4 else 0
    if groups == 1 or weight.shape[0] != groups or taps > 64 or s.dim() != 4:
        return F.conv_transpose2d(s, weight, bias, stride, padding, output_padding, groups, dilation)
    (sh, sw), (ph, pw), (oph, opw), (dh, dw) = _pair(stride), _pair(padding), _pair(output_padding), _pair(dilation)
    n, c_in, h, w = s.shape
    _, per_group, kh, kw = weight.shape
    oh = (h - 1) * sh - 2 * ph + dh * (kh - 1) + oph + 1
    ow = (w - 1) * sw - 2 * pw + dw * (kw - 1) + opw + 1
    full = s.new_zeros(n, c_in * per_group, oh + 2 * ph, ow + 2 * pw)  # before the padding is cut off
    for k in range(per_group):
        out_k = full[:, k::per_group]  # output channel g·per_group + k reads input channel g
        for i in range(kh):
            for j in range(kw):
                target = out_k[:, :, i * dh:i * dh + sh * (h - 1) + 1:sh, j * dw:j * dw + sw * (w - 1) + 1:sw]
                target.addcmul_(s, weight[:, k, i, j].view(1, -1, 1, 1))
    out = full[:, :, ph:ph + oh, pw:pw + ow]
    return out + bias.view(1, -1, 1, 1) if bias is not None else out.contiguous()


def _any_float64(values) -> bool:
    found = []
    torch.fx.node.map_aggregate(values, lambda v: found.append(
        isinstance(v, torch.Tensor) and v.dtype == torch.float64))
    return any(found)


def _as_float64(v):
    if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != torch.float64:
        return v.double()
    return v


# ops exact in float32 that the explainer applies to weights (W⁺ = clamp(W, min=0), W⁻, |W|, a flipped kernel)
def summation_scale(terms: int) -> float:
    """How much larger than the rounding of its terms alone the error of a float32 sum of `terms` terms of either
    sign is (its partial sums rounded on the way): sqrt(K/2), at least 1."""
    return max(1.0, math.sqrt(terms / 2))


def accumulated_terms(target, args, kwargs) -> int:
    """How many terms a float32 kernel adds up into one output of `target` (matmuls, linear layers, convolutions,
    einsum, sums and means; 1 for any other op): the partial sums it rounds on the way."""
    def arg(i, name, default=None):
        return args[i] if len(args) > i else kwargs.get(name, default)

    def numel(v):
        return v.numel() if isinstance(v, torch.Tensor) else 1

    if target in (F.linear, torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm"):
        x = arg(0, "input")
        return int(x.shape[-1]) if isinstance(x, torch.Tensor) and x.dim() else 1
    if target in (torch.conv2d, torch.conv1d):
        w = arg(1, "weight")
        return int(w[0].numel()) if isinstance(w, torch.Tensor) else 1
    if target is torch.conv_transpose2d:
        w, stride, groups = arg(1, "weight"), _pair(arg(3, "stride", 1)), int(arg(6, "groups", 1))
        return max(1, w.shape[0] // groups * w[0, 0].numel() // (stride[0] * stride[1]))
    if target is torch.einsum:
        equation = args[0].replace(" ", "")
        operands = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
        if "..." in equation or "->" not in equation:
            return 1
        inputs, output = equation.split("->")
        sizes = {c: t.shape[i] for spec, t in zip(inputs.split(","), operands) for i, c in enumerate(spec)}
        return int(math.prod(sizes[c] for c in sizes if c not in output))
    if target in (torch.sum, torch.mean, "sum", "mean"):
        x, dim = arg(0, "input"), arg(1, "dim")
        if not isinstance(x, torch.Tensor):
            return 1
        if dim is None or (isinstance(dim, (list, tuple)) and not dim):
            return numel(x)
        dims = dim if isinstance(dim, (list, tuple)) else (dim,)
        return int(math.prod(x.shape[d] for d in dims))
    return 1


_EXACT_WEIGHT_OPS = {torch.clamp, torch.clamp_min, torch.clamp_max, torch.abs, torch.neg, flipped_kernel}

# the ops whose float32 result is rounded (functions and Tensor method names); every other op of an explainer graph
# (moves, comparisons, selections, max/min, ReLU, casts) is exact in float32 and sees its operands unperturbed
_ROUNDING_OPS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.matmul, operator.iadd, operator.imul,
    torch.add, torch.sub, torch.mul, torch.div, torch.true_divide, torch.matmul, torch.bmm, torch.einsum,
    torch.sum, torch.mean, torch.conv2d, torch.conv1d, torch.conv_transpose2d, F.linear, torch.addcmul,
    torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.pow, torch.reciprocal, torch.sigmoid, torch.tanh,
    torch.softmax, F.softmax, F.log_softmax, F.gelu, F.silu, F.mish, F.softplus, F.elu, F.hardswish, F.hardsigmoid,
    F.layer_norm, F.group_norm, F.batch_norm, F.instance_norm, F.normalize, F.avg_pool2d, F.avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool1d, F.interpolate, torch.cumsum, torch.norm, torch.var, torch.std,
    torch.erf,
    "add", "sub", "mul", "div", "truediv", "matmul", "bmm", "sum", "mean", "exp", "log", "sqrt", "rsqrt", "pow",
    "reciprocal", "sigmoid", "tanh", "softmax", "log_softmax", "norm", "var", "std", "cumsum", "addcmul", "erf",
}


def _float64_run(explainer, x: torch.Tensor, target: torch.Tensor, rounding_seed: int | None = None):
    """(logits, relevance) of the explainer graph evaluated in float64, one sample at a time (the explainer treats
    samples independently, so the float64 forward values kept for the relevance pass are those of one image)."""
    run = _Float64Run(explainer.graph_module, rounding_seed)
    with torch.no_grad():
        outs = [run.run(x[i:i + 1].double(), target[i:i + 1]) for i in range(len(x))]
    return torch.cat([o[0] for o in outs]).numpy(), torch.cat([o[1] for o in outs]).numpy()


def _float64_relevance(explainer, x: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """The same explainer graph evaluated in float64: the reference both float32 runtimes approximate."""
    return _float64_run(explainer, x, target)[1]


ROUNDING_SAMPLES = 2  # float64 runs with simulated float32 rounding; the largest distance sets the allowance


def expected_float32_errors(explainer, x: torch.Tensor, target: torch.Tensor, exact_logits, exact,
                            enough=None) -> tuple:
    """(logits error, relevance error) a correct float32 runtime is to be allowed on (x, target): the largest
    distances from the exact float64 run of ROUNDING_SAMPLES float64 runs with simulated float32 rounding
    (`_Float64Run`). The targets are resolved from the exact logits first, so a near-tie cannot make a noisy run
    explain another class. `enough(logits error, relevance error)`: stop after the first runs whose maxima
    satisfy it (a further run can only raise them, so a verdict that passes on them passes on all)."""
    resolved = torch.where(target < 0, torch.as_tensor(exact_logits).argmax(1), target)
    e_logits = e_relevance = 0.0
    for seed in range(ROUNDING_SAMPLES):
        logits, relevance = _float64_run(explainer, x, resolved, seed)
        e_logits = max(e_logits, rel_diff(logits, exact_logits))
        e_relevance = max(e_relevance, rel_diff(relevance, exact))
        if enough is not None and enough(e_logits, e_relevance):
            break
    return e_logits, e_relevance


def expected_float32_error(explainer, x: torch.Tensor, target: torch.Tensor, exact_logits, exact) -> float:
    """The relevance part of `expected_float32_errors`."""
    return expected_float32_errors(explainer, x, target, exact_logits, exact)[1]


class _SessionForOneRun:
    """An onnxruntime session opened for one check and closed after it, so that its memory is free again before the
    float64 reference runs. Set up for one run, not for speed: no constant folding (the weight modifiers W⁺, W⁻
    are computed where they are used instead of held as folded copies of every weight: +1.9 GB at load for a
    350 MB ConvNeXt-B explainer), no prepacked weight copies, no memory arena, and one sample at a time (the
    activations of one image alive, not of the batch: 0.6 GB less for EfficientNet-B7 at 224 px; and the file is
    run at batch 1, not only at the batch size it was written with). Every other graph optimisation (fusions, the
    NCHWc layout) is the one a serving session applies."""

    def __init__(self, path):
        self.path = str(path)

    def run(self, names, feeds):
        import onnxruntime as ort

        release_freed_memory()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.add_session_config_entry("session.disable_prepacking", "1")
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
        session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"],
                                       disabled_optimizers=["ConstantFolding"])
        batch = len(next(iter(feeds.values())))
        runs = [session.run(names, {k: v[i:i + 1] for k, v in feeds.items()}) for i in range(batch)]
        return [np.concatenate(outputs) for outputs in zip(*runs)]


ZERO_RELEVANCE_WARNING = ("the relevance is 0 everywhere on the parity images, so the explainer explains nothing on "
                          "them and the parity check compares the logits only")


def zero_relevance_warning(explainer) -> str:
    """The export's zero-relevance warning, with its cause where the compile's check found it (a zero head, or
    the node where an ε absorbed the relevance) rather than a guess."""
    cert = getattr(explainer, "certificate", None)
    if cert is not None and cert.vanished:
        return f"{ZERO_RELEVANCE_WARNING}; the compile's check found why: {cert.vanished}"
    return ZERO_RELEVANCE_WARNING


def check_parity(explainer, session, report: ExportReport, x, target, expected) -> None:
    """Raise ExportError unless onnxruntime reproduces the PyTorch explainer's `expected` (logits, relevance) on
    (x, target).

    Passes when they agree to PARITY_TOLERANCE (max |a - b| / max |b|). An explainer can be ill-conditioned in
    float32 (a stabiliser ε = 1e-6 dividing a sum that is nearly zero amplifies rounding); then no float32 result
    is within the tolerance of the exact one, PyTorch's included. So can the forward (random-weight FBNetV3-D:
    PyTorch's float32 logits 8.8% from float64). Logits and relevance each pass when onnxruntime is within
    max(tolerance, CONDITIONING_MARGIN × e) of a float64 run of the same graph, where e is the error float32
    rounding causes on this graph and batch, measured by float64 runs with simulated float32 rounding
    (`expected_float32_errors`). e is not measured where it cannot change the verdict: where onnxruntime's logits
    agree with PyTorch's and its relevance is within the tolerance of the float64 run (the PyTorch side was off),
    and where onnxruntime is no further from the float64 run than PyTorch's float32 explainer in both outputs (the
    export is as exact as what it translates; on a well-conditioned graph PyTorch is float32-exact, so a
    translation error never passes this way). e does not depend on the CPU, its
    kernels, thread counts or the machine's load, so neither does the verdict, beyond onnxruntime's own error
    moving within the 30x margin; a 1% error on a well-conditioned explainer still fails, in the logits or in the
    relevance. The report keeps PyTorch's float32 error, onnxruntime's and e for both (`float32_error_*`).

    (Verifying the translation itself in float64, a float64 ONNX model run in onnxruntime, would give a verdict
    that rounding cannot sway; onnxruntime's CPU provider has no float64 kernel for Conv, ConvTranspose,
    AveragePool, GlobalAveragePool, Erf, Softplus, Elu, HardSigmoid, HardSwish, Selu, Softsign,
    InstanceNormalization, LRN or Resize (1.32), so it cannot run one for a CNN or a ViT.)"""
    if expected is not None and not bool(torch.isfinite(expected[1]).all()):
        from .errors import NonFiniteRelevanceError
        from .verify import raise_nonfinite

        try:
            raise_nonfinite(explainer, x, target, expected[1])
        except NonFiniteRelevanceError as e:
            raise ExportError(f"the parity check cannot compare: on its random images {e}; an input of the "
                              f"runtime that meets the same 0 gets an error, not a map") from None
    logits_pt, rel_pt = (t.numpy() for t in expected)
    logits_rt, rel_rt = session.run(["logits", "relevance"], {"input": x.numpy(), "target": target.numpy()})
    report.max_rel_diff_relevance = rel_diff(rel_rt, rel_pt)
    report.max_rel_diff_logits = rel_diff(logits_rt, logits_pt)
    report.zero_relevance = not np.any(rel_pt)
    if report.zero_relevance:
        warnings.warn(zero_relevance_warning(explainer), stacklevel=3)
    tol = PARITY_TOLERANCE
    if report.max_rel_diff <= tol:
        report.parity_basis = "pytorch"
        return
    exact_logits, exact = _float64_run(explainer, x, target)
    report.float32_error_pytorch = rel_diff(rel_pt, exact)
    report.float32_error_logits_pytorch = rel_diff(logits_pt, exact_logits)
    report.float32_error_onnxruntime = rel_diff(rel_rt, exact)
    report.float32_error_logits_onnxruntime = rel_diff(logits_rt, exact_logits)
    if report.max_rel_diff_logits <= tol and report.float32_error_onnxruntime <= tol:
        report.parity_basis = "float64"
        return  # onnxruntime is float32-exact; PyTorch's kernels were not
    if (report.float32_error_onnxruntime <= report.float32_error_pytorch
            and report.float32_error_logits_onnxruntime <= max(tol, report.float32_error_logits_pytorch)):
        # onnxruntime is no further from the exact result than the explainer it translates, in both outputs: the
        # export is as good as the PyTorch explainer, whatever the conditioning (and the two simulated-rounding
        # float64 runs, the most expensive part of the check, are not needed; a translation error on a
        # well-conditioned graph is far from a float32-exact PyTorch run and still goes to the allowance below)
        report.parity_basis = "no-further-than-pytorch"
        return

    def allowed(e_logits, e_relevance) -> bool:
        logits_ok = (report.max_rel_diff_logits <= tol
                     or report.float32_error_logits_onnxruntime <= max(tol, CONDITIONING_MARGIN * e_logits))
        return logits_ok and report.float32_error_onnxruntime <= max(tol, CONDITIONING_MARGIN * e_relevance)

    # the allowance grows with each simulated-rounding run, so the runs stop once it admits onnxruntime: the verdict
    # is the one all of them would give (nasnetalarge: one float64 run of 9 s less)
    e_logits, e_relevance = expected_float32_errors(explainer, x, target, exact_logits, exact, enough=allowed)
    report.float32_error_logits_expected, report.float32_error_expected = e_logits, e_relevance
    if allowed(e_logits, e_relevance):
        report.parity_basis = "rounding-allowance"
        return
    raise ExportError(
        f"onnxruntime disagrees with the PyTorch explainer: max relative difference {report.max_rel_diff:.2e} > "
        f"{tol:.0e} (logits {report.max_rel_diff_logits:.2e}, relevance {report.max_rel_diff_relevance:.2e}); "
        f"against a float64 run: onnxruntime logits {report.float32_error_logits_onnxruntime:.2e}, relevance "
        f"{report.float32_error_onnxruntime:.2e}, PyTorch relevance {report.float32_error_pytorch:.2e}; float32 "
        f"rounding simulated: logits {e_logits:.2e}, relevance {e_relevance:.2e} (allowed: {CONDITIONING_MARGIN:g}x "
        f"that) ({report.path})")


def _infer_shapes_without_weights(model):
    """onnx shape inference on a copy whose large initializers are declared as inputs of the same shape: the same
    shapes, without serialising hundreds of MB of weights (the cost of onnx.shape_inference on the model itself)."""
    import onnx
    from onnx import helper

    graph = model.graph
    small = [i for i in graph.initializer if int(np.prod(i.dims)) <= 1024]
    declared = [helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in graph.initializer
                if int(np.prod(i.dims)) > 1024]
    light = helper.make_graph(graph.node, graph.name, list(graph.input) + declared, graph.output, small)
    copy_ = helper.make_model(light, opset_imports=model.opset_import, ir_version=model.ir_version)
    return onnx.shape_inference.infer_shapes(copy_).graph


def count_macs(model) -> float:
    """Multiply-accumulates per sample of an ONNX model's Conv, ConvTranspose, Gemm and MatMul nodes (shapes from
    onnx shape inference, symbolic dims as 1): the cost measure of the explainer-vs-forward comparisons."""
    from onnx import numpy_helper

    inferred = _infer_shapes_without_weights(model)
    shapes = {vi.name: [d.dim_value or 1 for d in vi.type.tensor_type.shape.dim]
              for vi in list(inferred.value_info) + list(inferred.input) + list(inferred.output)}
    shapes.update({i.name: list(i.dims) for i in model.graph.initializer})
    for node in model.graph.node:  # weights held in Constant nodes
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = list(numpy_helper.to_array(attr.t).shape)
    total = 0.0
    for node in model.graph.node:
        out, ins = shapes.get(node.output[0]), [shapes.get(i) for i in node.input]
        if out is None or any(s is None for s in ins[:2]):
            continue
        if node.op_type == "Conv":
            total += float(np.prod(out)) * float(np.prod(ins[1][1:]))
        elif node.op_type == "ConvTranspose":
            total += float(np.prod(ins[0])) * float(np.prod(ins[1][1:]))
        elif node.op_type in ("Gemm", "MatMul"):
            transposed = any(a.name == "transA" and a.i for a in node.attribute)
            total += float(np.prod(out)) * (ins[0][-2] if transposed else ins[0][-1])
    return total


EXTERNAL_DATA_BYTES = 1_900_000_000  # weights over this: stored as ONNX external data (protobuf's 2 GiB limit)


def _weight_bytes(model) -> int:
    return sum(len(t.raw_data) or int(np.prod(t.dims)) * 4 for t in model.graph.initializer)


PRECISIONS = ("fp32", "fp16")
FP16_SMALLEST = 2.0 ** -24  # float16's smallest subnormal: a smaller nonzero constant would round to 0


def half_graph(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A float16 copy of an explainer graph whose input and outputs stay float32: every floating-point parameter,
    buffer and tensor constant in float16, the float input cast to float16 where it enters and the floating
    outputs cast back to float32. Nonzero number constants below float16's smallest subnormal (the 1e-30 that
    keeps a ratio split's denominator from 0) become ±2⁻²⁴, so they keep doing their job instead of rounding to
    0; every other constant rounds to the nearest float16 (ε = 1e-6 is a float16 subnormal, 1.01e-6)."""
    from .derived import Recipe, derive, recipe

    half = copy.deepcopy(gm)
    memo: dict = {}

    def to_half(t):
        """t in float16, with its recipe (W⁺ = max(W, 0), ...) on the float16 base: each weight stays stored once."""
        if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float16):
            return t
        if id(t) not in memo:
            r = recipe(t)
            if r is None:
                out = t.detach().half()
            else:
                out = derive(r.fn, to_half(r.base), *r.args, **(r.kwargs or {}))
            memo[id(t)] = (t, out)  # keeps t alive: its id is not reused while the memo lives
        return memo[id(t)][1]

    def half_recipe(r):
        return None if r is None else Recipe(r.fn, to_half(r.base), r.args, r.kwargs)

    for module in half.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = torch.nn.Parameter(to_half(p.data), requires_grad=False)
        for name, b in list(module._buffers.items()):
            module._buffers[name] = to_half(b)
        for name, t in list(vars(module).items()):
            if isinstance(t, torch.Tensor):
                setattr(module, name, to_half(t))
    for node in half.graph.nodes:
        if node.meta.get("recipe") is not None:
            node.meta["recipe"] = half_recipe(node.meta["recipe"])
    graph = half.graph

    def tiny_ok(v):
        if isinstance(v, float) and v != 0 and abs(v) < FP16_SMALLEST:
            return FP16_SMALLEST if v > 0 else -FP16_SMALLEST
        return v

    for node in list(graph.nodes):
        if node.op == "placeholder" and node.name == next(n.name for n in graph.nodes if n.op == "placeholder"):
            with graph.inserting_after(node):
                cast = graph.call_function(torch.Tensor.to, (node, torch.float16))
            node.replace_all_uses_with(cast, delete_user_cb=lambda u: u is not cast)
        elif node.op in ("call_function", "call_method", "call_module"):
            node.args = torch.fx.node.map_aggregate(node.args, tiny_ok)
            node.kwargs = torch.fx.node.map_aggregate(node.kwargs, tiny_ok)
            if node.op == "call_function" and node.target is torch.Tensor.to and torch.float32 in node.args:
                node.args = tuple(torch.float16 if a is torch.float32 else a for a in node.args)
        elif node.op == "output":
            def back(v):
                if not isinstance(v, torch.fx.Node):
                    return v
                with graph.inserting_before(node):
                    return graph.call_function(torch.Tensor.to, (v, torch.float32))  # logits, relevance
            node.args = torch.fx.node.map_aggregate(node.args, back)
    graph.lint()
    half.recompile()
    return half


def _fp16_check(explainer, session, report: ExportReport, x, target) -> None:
    """What float16 costs, measured on the parity batch against the float32 explainer in PyTorch: the largest
    relevance and logit differences (max |a − b| / max |b|) and ΣR_in / R_out per sample for both (R_out, the
    relevance put on the target, from the float32 explainer's taps). Raises ExportError where the float16 graph
    gives a value that is not finite (an overflow past 65504 or a 0/0 that float32 avoids)."""
    logits16, rel16 = session.run(["logits", "relevance"], {"input": x.numpy(), "target": target.numpy()})
    logits32, rel32, taps = explainer.explain_with_taps(x, target)
    if not (np.isfinite(rel16).all() and np.isfinite(logits16).all()):
        raise ExportError(f"the float16 explainer gives values that are not finite on the parity batch "
                          f"(relevance: {int((~np.isfinite(rel16)).sum())} entries, logits: "
                          f"{int((~np.isfinite(logits16)).sum())}); float16's range (±65504) does not hold this "
                          f"model's activations or relevance ({report.path})")
    out = taps["output"].double().numpy()
    dims = tuple(range(1, rel16.ndim))
    report.max_rel_diff_relevance = rel_diff(rel16, rel32.numpy())
    report.max_rel_diff_logits = rel_diff(logits16, logits32.numpy())
    report.zero_relevance = not np.any(rel32.numpy())
    report.fp16 = {
        "relevance_vs_fp32": report.max_rel_diff_relevance,
        "logits_vs_fp32": report.max_rel_diff_logits,
        "conservation_fp16": (rel16.astype(np.float64).sum(dims) / out).tolist(),
        "conservation_fp32": (rel32.double().numpy().sum(dims) / out).tolist(),
    }


def export_onnx(explainer, path, opset: int = 17, check: bool = True, metadata: dict | None = None,
                verbose: bool = False, precision: str = "fp32", **preprocessing) -> ExportReport:
    """See `Explainer.export_onnx`. precision="fp16" writes the graph in float16 (float32 input and outputs); its
    check states the distance to the float32 explainer and both conservation ratios (`report.fp16`) instead of
    requiring parity, and refuses a graph whose float16 values are not finite."""
    import onnx

    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    meta = build_metadata(explainer, metadata, **preprocessing)  # first: a bad override fails before the work
    if precision != "fp32":
        meta["precision"] = precision

    x, target = _parity_batch(explainer)
    release_freed_memory()  # the lowering runs the explainer at the parity batch: start from the live memory only
    try:
        if precision == "fp16":
            from .fx_to_onnx import lower

            model, _ = lower(half_graph(explainer.graph_module), (x, target), ["input", "target"],
                             ["logits", "relevance"], opset)
            expected = None
        else:
            model, expected = _lower(explainer, opset, x, target)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"the explainer could not be written as ONNX: {type(e).__name__}: {e}") from e
    onnx.helper.set_model_props(model, meta)  # (a Python reference to a sub-message would keep the whole proto alive)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    external = _weight_bytes(model) > EXTERNAL_DATA_BYTES
    if external:  # a protobuf message holds at most 2 GiB: the weights go to PATH.data beside the graph
        location = path.name + ".data"
        if (path.parent / location).exists():
            (path.parent / location).unlink()  # onnx appends to an existing file
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=location, size_threshold=1024)
        del model
        checked = str(path)
    else:
        checked = model.SerializeToString()  # once: the checker and the file both take the bytes
        del model
    try:
        onnx.checker.check_model(checked, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        # graphlrp wrote an invalid file (a node that breaks the ONNX spec, or shapes that do not fit together): its
        # bug, said as an ExportError
        if external:
            path.unlink(missing_ok=True)
            (path.parent / location).unlink(missing_ok=True)
        raise ExportError(f"the ONNX model graphlrp wrote for this explainer is invalid (onnx.checker: "
                          f"{' '.join(str(e).split())[:300]}); nothing was written") from e
    if not external:
        path.write_bytes(checked)
    del checked  # onnxruntime reads the file: the bytes and the proto need not live beside its session
    size = path.stat().st_size + ((path.parent / location).stat().st_size if external else 0)
    report = ExportReport(str(path), float("nan"), float("nan"), size, opset,
                          certificate=explainer.info.get("certificate"), precision=precision)
    if check:
        session = _SessionForOneRun(path)
        try:
            if precision == "fp16":
                _fp16_check(explainer, session, report, x, target)
            else:
                check_parity(explainer, session, report, x, target, expected)
        except ExportError:
            raise
        except Exception as e:  # onnxruntime refusing the file, or the float64 reference failing: graphlrp's bug
            raise ExportError(f"the check of the written file failed: {type(e).__name__}: "
                              f"{' '.join(str(e).split())[:300]} ({path})") from e
    return report
