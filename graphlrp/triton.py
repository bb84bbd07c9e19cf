"""Lay out an explainer ONNX file as a Triton Inference Server model repository:
REPO/NAME/config.pbtxt and REPO/NAME/1/model.onnx, served by Triton's onnxruntime backend.

The config is derived from the ONNX graph itself (names, element types, shapes), so it stays right for any
input size or class count. Triton adds the batch dimension, so `dims` leave it out; a per-sample scalar like
`target` ([N] in ONNX) is declared as dims [1] and reshaped to [] as Triton requires.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import onnx

from .errors import ExplainerLoadError
from .runtime import INPUTS, OUTPUTS

MAX_QUEUE_DELAY_US = 1000  # how long Triton may hold a request to grow a batch
TRITON_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.INT32: "TYPE_INT32", onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.BOOL: "TYPE_BOOL",
}


def export_triton(onnx_path: str | Path, repo_dir: str | Path, name: str | None = None, max_batch: int = 8) -> Path:
    """Write the model directory into `repo_dir` (created if needed) and return it."""
    onnx_path = Path(onnx_path)
    name = name or re.sub(r"[^A-Za-z0-9_.-]", "_", onnx_path.stem)
    model = _read(onnx_path)
    labels = json.loads(_metadata(model).get("labels", "null"))
    config = model_config(model, name, max_batch, label_file="labels.txt" if labels else None)
    model_dir = Path(repo_dir) / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_path, model_dir / "1" / "model.onnx")
    if labels:
        (model_dir / "labels.txt").write_text("".join(f"{label}\n" for label in labels), encoding="utf-8")
    (model_dir / "config.pbtxt").write_text(config, encoding="utf-8")
    return model_dir


def model_config(model: onnx.ModelProto, name: str, max_batch: int, label_file: str | None = None) -> str:
    """config.pbtxt text (Triton's ModelConfig protobuf, text format) for the graph's inputs and outputs."""
    initializers = {i.name for i in model.graph.initializer}
    inputs = [_tensor(v, "input") for v in model.graph.input if v.name not in initializers]
    outputs = [_tensor(v, "output", label_file if v.name == "logits" else None) for v in model.graph.output]
    return "\n".join([
        f'name: "{name}"',
        'platform: "onnxruntime_onnx"',
        'backend: "onnxruntime"',
        f"max_batch_size: {max_batch}",
        "input [", ",\n".join(inputs), "]",
        "output [", ",\n".join(outputs), "]",
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US}\n}}",
        "",
    ])


def _tensor(value: onnx.ValueInfoProto, kind: str, label_file: str | None = None) -> str:
    tensor = value.type.tensor_type
    if tensor.elem_type not in TRITON_TYPES:
        raise ExplainerLoadError(f"{kind} {value.name!r}: element type "
                                 f"{onnx.TensorProto.DataType.Name(tensor.elem_type)} has no Triton equivalent")
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    if not dims or dims[0] != -1:
        raise ExplainerLoadError(f"{kind} {value.name!r} has shape {dims} without a dynamic batch dimension; "
                                 "recompile the explainer with graphlrp to get one")
    lines = [f'    name: "{value.name}"', f"    data_type: {TRITON_TYPES[tensor.elem_type]}"]
    if dims[1:]:
        lines.append(f"    dims: [ {', '.join(map(str, dims[1:]))} ]")
    else:
        lines += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
    if label_file:
        lines.append(f'    label_filename: "{label_file}"')
    return "  {\n" + "\n".join(lines) + "\n  }"


def _read(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise ExplainerLoadError(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise ExplainerLoadError(f"{path}: not an ONNX model ({e})") from None
    names = {v.name for v in model.graph.input} | {v.name for v in model.graph.output}
    missing = [n for n in INPUTS + OUTPUTS if n not in names]
    if missing:
        raise ExplainerLoadError(f"{path}: not a graphlrp explainer (no {', '.join(missing)}); "
                                 "compile one with `graphlrp compile`")
    return model


def _metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}
