"""Stage 4 — export: the explainer graph as one ONNX model, checked by onnx.checker and onnxruntime parity.

Contract: inputs `input` float32 [N, C, H, W] and `target` int64 [N] (-1 = the sample's top-1 prediction);
outputs `logits` float32 [N, K] and `relevance` float32 [N, C, H, W]; batch dynamic. metadata_props carry what a
runtime needs to preprocess images and label results (see `METADATA_KEYS`).
"""
from __future__ import annotations

import copy
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ExportError

PARITY_TOLERANCE = 1e-4
METADATA_KEYS = ("graphlrp_version", "preset", "split", "include_identity", "source_model", "input_size",
                 "preprocessing", "labels", "output_relevance")


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

    @property
    def max_rel_diff(self) -> float:
        return max(self.max_rel_diff_relevance, self.max_rel_diff_logits)


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b| over the whole tensor (the parity measure used throughout graphlrp)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def build_metadata(explainer, extra: dict | None) -> dict:
    from . import __version__

    info = explainer.info
    c, h, w = info["input_size"]
    meta = {
        "graphlrp_version": __version__,
        "preset": info["preset"],
        "split": info["split"],
        "include_identity": "true" if info["include_identity"] else "false",
        "source_model": info["source_model"],
        "input_size": json.dumps([c, h, w]),
        "output_relevance": info["output_relevance"],
        # torchvision's convention (resize 256, crop 224) for ImageNet-size inputs; small inputs: resize to the crop
        "preprocessing": json.dumps({"resize": round(min(h, w) * 256 / 224) if min(h, w) >= 128 else min(h, w),
                                     "crop": [h, w], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}),
    }
    for key, value in (extra or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    return meta


def _num_classes(explainer) -> int:
    output = next(n for n in explainer._traced.graph.nodes if n.op == "output")
    return int(output.args[0].meta["shape"][-1])


def _parity_batch(explainer, batch: int = 2, seed: int = 0):
    """A random input batch and mixed targets: even samples their top-1 (-1), odd ones a random class."""
    c, h, w = explainer.info["input_size"]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c, h, w, generator=g)
    target = torch.full((batch,), -1, dtype=torch.long)
    target[1::2] = torch.randint(0, _num_classes(explainer), (len(target[1::2]),), generator=g)
    return x, target


def _onnx_bytes(explainer, opset: int, x: torch.Tensor, target: torch.Tensor):
    """The ONNX model, traced on (x, target), and the PyTorch explainer's outputs of that very run (the tracer
    executes the graph eagerly): the PyTorch side of the parity check, without running the explainer again."""
    axes = {"input": {0: "batch"}, "target": {0: "batch"}, "logits": {0: "batch"}, "relevance": {0: "batch"}}
    buf = io.BytesIO()
    outputs = []
    hook = explainer.graph_module.register_forward_hook(lambda module, args, out: outputs.append(out))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about constant sizes: H and W are fixed by design
            torch.onnx.export(explainer.graph_module, (x, target), buf, input_names=["input", "target"],
                              output_names=["logits", "relevance"], dynamic_axes=axes, opset_version=opset,
                              dynamo=False, do_constant_folding=True)
    finally:
        hook.remove()
    logits, relevance = (t.detach().clone() for t in outputs[-1][:2])
    return buf.getvalue(), (logits, relevance)


def _float64_relevance(explainer, x: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """The same explainer graph evaluated in float64: the reference both float32 runtimes approximate."""
    gm = copy.deepcopy(explainer.graph_module).double()
    with torch.no_grad():
        _, rel = gm(x.double(), target)
    return rel.numpy()


def check_parity(explainer, session, report: ExportReport, x, target, expected) -> None:
    """Raise ExportError unless onnxruntime reproduces the PyTorch explainer's `expected` (logits, relevance) on
    (x, target).

    Passes when they agree to PARITY_TOLERANCE (max |a - b| / max |b|). An explainer can be ill-conditioned in
    float32 (a stabiliser ε = 1e-6 dividing a sum that is nearly zero amplifies rounding); then PyTorch's own
    float32 result is not within the tolerance of the exact one either, and the export passes when onnxruntime
    is within the tolerance of a float64 run of the same graph, or no further from it than twice PyTorch's float32
    error (and the two agree to 10 × the tolerance)."""
    logits_pt, rel_pt = (t.numpy() for t in expected)
    logits_rt, rel_rt = session.run(["logits", "relevance"], {"input": x.numpy(), "target": target.numpy()})
    report.max_rel_diff_relevance = rel_diff(rel_rt, rel_pt)
    report.max_rel_diff_logits = rel_diff(logits_rt, logits_pt)
    tol = PARITY_TOLERANCE
    if report.max_rel_diff <= tol:
        return
    conditioning = ""
    if report.max_rel_diff_logits <= tol and report.max_rel_diff_relevance <= 10 * tol:
        exact = _float64_relevance(explainer, x, target)
        report.float32_error_pytorch = rel_diff(rel_pt, exact)
        report.float32_error_onnxruntime = rel_diff(rel_rt, exact)
        if report.float32_error_onnxruntime <= tol or (
                report.float32_error_pytorch > tol
                and report.float32_error_onnxruntime <= 2 * report.float32_error_pytorch):
            return
        conditioning = (f"; against a float64 run: onnxruntime {report.float32_error_onnxruntime:.2e}, "
                        f"PyTorch {report.float32_error_pytorch:.2e}")
    raise ExportError(f"onnxruntime disagrees with the PyTorch explainer: max relative difference "
                      f"{report.max_rel_diff:.2e} > {tol:.0e}{conditioning} ({report.path})")


def _derived_forms(a: np.ndarray):
    """The forms a rule weight takes in the explainer: W⁺ = max(W, 0), and the kernel of a stride-1 transposed
    convolution (input/output channels swapped, spatially flipped) of W or of W⁺."""
    flip = lambda w: np.ascontiguousarray(w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])  # noqa: E731
    pos = np.maximum(a, 0)
    return (("relu", pos), ("flip", flip(a)), ("relu_flip", flip(pos)))


def _key(a: np.ndarray) -> tuple:
    return a.shape, float(np.abs(a).sum(dtype=np.float64))


def share_derived_weights(model) -> int:
    """Store each conv weight once: an initializer equal to another one's max(·, 0), or to its flipped,
    channel-swapped copy, becomes Relu / Transpose + Slice nodes computing it from that one (chains allowed:
    W → W⁺ → flipped W⁺). onnxruntime folds these nodes back into constants when it loads the model (constant
    folding runs before its NCHWc conv layout), so only the file shrinks. Returns how many were replaced."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    arrays = {i.name: numpy_helper.to_array(i) for i in graph.initializer
              if i.data_type == TensorProto.FLOAT and len(i.dims) == 4 and i.dims[0] * i.dims[1] > 1}
    by_key: dict = {}
    for name, a in arrays.items():
        by_key.setdefault(_key(a), []).append(name)
    parents: dict = {}  # name -> [(base, form)], in the order of _derived_forms (shortest first)
    for base, a in arrays.items():
        for form, d in _derived_forms(a):
            for name in by_key.get(_key(d), ()):
                if name != base and np.array_equal(arrays[name], d):
                    parents.setdefault(name, []).append((base, form))
    # resolve from the stored roots outwards, so that every derived weight hangs off a stored one (no cycles)
    stored = [n for n in arrays if n not in parents]
    resolved, derived = set(stored), {}
    while len(resolved) < len(arrays):
        progress = False
        for name, options in parents.items():
            if name in resolved:
                continue
            usable = [(b, f) for b, f in options if b in resolved]
            if usable:
                derived[name] = min(usable, key=lambda bf: len(bf[1]))  # fewest nodes: flip of W⁺ over W
                resolved.add(name)
                progress = True
        if not progress:  # only a cycle is left (e.g. two weights that are each other's flip): keep one stored
            resolved.add(next(n for n in parents if n not in resolved))
    if not derived:
        return 0
    big = np.iinfo(np.int64).max
    helpers = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
               (("_flip_starts", [-1, -1]), ("_flip_ends", [-big, -big]), ("_flip_axes", [2, 3]),
                ("_flip_steps", [-1, -1]))]
    nodes, order = [], []
    pending = dict(derived)
    while pending:  # bases before the weights derived from them
        ready = [n for n, (b, _) in pending.items() if b not in pending]
        assert ready, "derived weights form a cycle"
        order += ready
        for n in ready:
            del pending[n]
    for name in order:
        src, form = derived[name]
        if form.startswith("relu"):
            out = name if form == "relu" else f"{name}_pos"
            nodes.append(helper.make_node("Relu", [src], [out], name=f"{name}_relu"))
            src = out
        if form.endswith("flip"):
            nodes.append(helper.make_node("Transpose", [src], [f"{name}_swap"], perm=[1, 0, 2, 3],
                                          name=f"{name}_swap"))
            nodes.append(helper.make_node("Slice", [f"{name}_swap", "_flip_starts", "_flip_ends", "_flip_axes",
                                                    "_flip_steps"], [name], name=f"{name}_flip"))
    kept = [i for i in graph.initializer if i.name not in derived]
    del graph.initializer[:]
    graph.initializer.extend(kept + helpers)
    old = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + old)
    return len(derived)


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


def keep_symbolic_batch(model) -> int:
    """Write the batch entry of every constant Reshape target as 0 ("copy the input's size") instead of -1, where
    the per-sample sizes match. Same result; but ONNX shape inference then carries the symbolic batch size through
    the relevance half of the graph instead of inventing a new unknown size after the reshape, and onnxruntime
    keeps an elementwise op in its blocked NCHWc layout only when it can prove both operands have one shape.
    Returns how many targets were rewritten."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in list(_infer_shapes_without_weights(model).value_info) + list(graph.input)}
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    constants.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                      if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    rewritten = 0
    for node in graph.node:
        if node.op_type != "Reshape" or any(a.name == "allowzero" and a.i for a in node.attribute):
            continue
        target, source = constants.get(node.input[1]), shapes.get(node.input[0])
        if target is None or not source or target.ndim != 1 or not len(target) or target[0] != -1:
            continue
        if None in source[1:] or np.any(target[1:] <= 0) or np.prod(source[1:]) != np.prod(target[1:]):
            continue
        pinned = target.astype(np.int64).copy()
        pinned[0] = 0
        name = f"{node.input[1]}_keep_batch"
        if name not in constants:
            graph.initializer.append(numpy_helper.from_array(pinned, name))
            constants[name] = pinned
        node.input[1] = name
        rewritten += 1
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for node in [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]:
        graph.node.remove(node)
    return rewritten


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


def export_onnx(explainer, path, opset: int = 17, check: bool = True, metadata: dict | None = None,
                verbose: bool = False) -> ExportReport:
    import onnx

    x, target = _parity_batch(explainer)
    try:
        data, expected = _onnx_bytes(explainer, opset, x, target)
        model = onnx.load_from_string(data)
    except Exception as e:
        raise ExportError(f"torch.onnx could not export the explainer: {type(e).__name__}: {e}") from e
    dims = model.graph.output[1].type.tensor_type.shape.dim  # the fixed size of `relevance` (left symbolic)
    for dim, size in zip(list(dims)[1:], explainer.info["input_size"]):
        dim.dim_value = size
    for key, value in build_metadata(explainer, metadata).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "graphlrp"
    keep_symbolic_batch(model)
    share_derived_weights(model)
    data = model.SerializeToString()  # once: the checker and the file both take the bytes
    onnx.checker.check_model(data, full_check=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    report = ExportReport(str(path), float("nan"), float("nan"), path.stat().st_size, opset)
    if check:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        check_parity(explainer, session, report, x, target, expected)
    return report
