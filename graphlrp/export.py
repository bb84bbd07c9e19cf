"""Stage 4 — export: the explainer graph as one ONNX model, checked by onnx.checker and onnxruntime parity.

Contract: inputs `input` float32 [N, C, H, W] and `target` int64 [N] (-1 = the sample's top-1 prediction);
outputs `logits` float32 [N, K] and `relevance` float32 [N, C, H, W]; batch dynamic. metadata_props carry what a
runtime needs to preprocess images and label results (see `METADATA_KEYS`).
"""
from __future__ import annotations

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


def _onnx_bytes(explainer, opset: int, dynamic_spatial: bool) -> bytes:
    c, h, w = explainer.info["input_size"]
    x = torch.randn(2, c, h, w)
    target = torch.tensor([-1, 0], dtype=torch.long)
    axes = {"input": {0: "batch"}, "target": {0: "batch"}, "logits": {0: "batch"}, "relevance": {0: "batch"}}
    if dynamic_spatial:
        axes["input"].update({2: "height", 3: "width"})
        axes["relevance"].update({2: "height", 3: "width"})
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about constant sizes: H and W are fixed by design
        torch.onnx.export(explainer.graph_module, (x, target), buf, input_names=["input", "target"],
                          output_names=["logits", "relevance"], dynamic_axes=axes, opset_version=opset,
                          dynamo=False, do_constant_folding=True)
    return buf.getvalue()


def parity(explainer, session, batch: int = 3, seed: int = 0) -> tuple[float, float]:
    """Max relative difference of onnxruntime vs the PyTorch explainer on a random batch with mixed targets."""
    c, h, w = explainer.info["input_size"]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c, h, w, generator=g)
    logits_pt, _ = explainer(x)
    target = torch.full((batch,), -1, dtype=torch.long)
    target[1::2] = torch.randint(0, logits_pt.shape[1], (len(target[1::2]),), generator=g)
    logits_pt, rel_pt = explainer(x, target)
    logits_rt, rel_rt = session.run(["logits", "relevance"], {"input": x.numpy(), "target": target.numpy()})
    return rel_diff(rel_rt, rel_pt.numpy()), rel_diff(logits_rt, logits_pt.numpy())


def export_onnx(explainer, path, opset: int = 17, check: bool = True, metadata: dict | None = None,
                dynamic_spatial: bool = False, verbose: bool = False) -> ExportReport:
    import onnx

    try:
        model = onnx.load_from_string(_onnx_bytes(explainer, opset, dynamic_spatial))
    except Exception as e:
        raise ExportError(f"torch.onnx could not export the explainer: {type(e).__name__}: {e}") from e
    if not dynamic_spatial:  # declare the fixed spatial size of `relevance` (the exporter leaves it symbolic)
        dims = model.graph.output[1].type.tensor_type.shape.dim
        for dim, size in zip(list(dims)[1:], explainer.info["input_size"]):
            dim.dim_value = size
    for key, value in build_metadata(explainer, metadata).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "graphlrp"
    onnx.checker.check_model(model, full_check=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    report = ExportReport(str(path), float("nan"), float("nan"), path.stat().st_size, opset)
    if check:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        report.max_rel_diff_relevance, report.max_rel_diff_logits = parity(explainer, session)
        if not report.max_rel_diff <= PARITY_TOLERANCE:
            raise ExportError(f"onnxruntime disagrees with the PyTorch explainer: max relative difference "
                              f"{report.max_rel_diff:.2e} > {PARITY_TOLERANCE:.0e} ({path})")
    return report
