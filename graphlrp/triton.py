"""Lay out an explainer ONNX file as a Triton Inference Server model repository:
REPO/NAME/config.pbtxt and REPO/NAME/1/model.onnx, served by Triton's onnxruntime backend.

The config is derived from the model as onnxruntime sees it (names, element types, shapes after onnxruntime's
shape inference), which is what Triton's onnxruntime backend checks the config against. Triton adds the batch
dimension, so `dims` leave it out; a per-sample scalar like `target` ([N]) is declared as dims [1] reshaped to [].
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from .errors import ExplainerLoadError
from .runtime import ExplainerSession, load

MAX_QUEUE_DELAY_US = 1000  # how long Triton may hold a request to grow a batch
TRITON_TYPES = {
    "tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(double)": "TYPE_FP64",
    "tensor(int64)": "TYPE_INT64", "tensor(int32)": "TYPE_INT32", "tensor(int8)": "TYPE_INT8",
    "tensor(uint8)": "TYPE_UINT8", "tensor(bool)": "TYPE_BOOL",
}


def export_triton(onnx_path: str | Path, repo_dir: str | Path, name: str | None = None, max_batch: int = 8) -> Path:
    """Write the model directory into `repo_dir` (created if needed) and return it."""
    onnx_path = Path(onnx_path)
    name = name or re.sub(r"[^A-Za-z0-9_.-]", "_", onnx_path.stem)
    session = load(onnx_path, providers="cpu")
    config = model_config(session, name, max_batch, label_file="labels.txt" if session.labels else None)
    model_dir = Path(repo_dir) / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_path, model_dir / "1" / "model.onnx")
    weights = Path(str(onnx_path) + ".data")  # an explainer over 2 GiB keeps its weights beside it (export_onnx)
    if weights.exists():
        shutil.copyfile(weights, model_dir / "1" / weights.name)
    if session.labels:
        (model_dir / "labels.txt").write_text("".join(f"{label}\n" for label in session.labels), encoding="utf-8")
    (model_dir / "config.pbtxt").write_text(config, encoding="utf-8")
    return model_dir


def model_config(session: ExplainerSession, name: str, max_batch: int, label_file: str | None = None) -> str:
    """config.pbtxt text (Triton's ModelConfig protobuf, text format) for the model's inputs and outputs."""
    inputs = [_tensor(v, "input") for v in session.session.get_inputs()]
    outputs = [_tensor(v, "output", label_file if v.name == "logits" else None) for v in session.session.get_outputs()]
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


def _tensor(value, kind: str, label_file: str | None = None) -> str:
    """One input/output entry from an onnxruntime NodeArg (name, type string, shape with str/None for open dims)."""
    if value.type not in TRITON_TYPES:
        raise ExplainerLoadError(f"{kind} {value.name!r}: element type {value.type} has no Triton equivalent")
    dims = [d if isinstance(d, int) else -1 for d in value.shape]
    if not dims or dims[0] != -1:
        raise ExplainerLoadError(f"{kind} {value.name!r} has shape {dims} without a dynamic batch dimension; "
                                 "recompile the explainer with graphlrp to get one")
    lines = [f'    name: "{value.name}"', f"    data_type: {TRITON_TYPES[value.type]}"]
    if dims[1:]:
        lines.append(f"    dims: [ {', '.join(map(str, dims[1:]))} ]")
    else:
        lines += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
    if label_file:
        lines.append(f'    label_filename: "{label_file}"')
    return "  {\n" + "\n".join(lines) + "\n  }"
