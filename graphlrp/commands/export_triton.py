"""`graphlrp export-triton MODEL.onnx REPO_DIR`: a Triton Inference Server model repository entry."""
from __future__ import annotations

import argparse

from ._types import positive_int


def _model_name(text: str) -> str:
    if not text or text in (".", "..") or "/" in text or "\\" in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not usable as a directory name")
    return text


def register(sub) -> None:
    p = sub.add_parser("export-triton", help="write a Triton model repository entry for an explainer (.onnx)",
                       description="Writes REPO_DIR/NAME/1/model.onnx and REPO_DIR/NAME/config.pbtxt "
                                   "(onnxruntime backend, dynamic batching).")
    p.add_argument("model", help="explainer ONNX file from `graphlrp compile`")
    p.add_argument("repo", metavar="REPO_DIR", help="Triton model repository directory (created if missing)")
    p.add_argument("--max-batch", type=positive_int, default=8, metavar="B",
                   help="Triton max_batch_size (default 8)")
    p.add_argument("--name", type=_model_name, default=None,
                   help="model name in the repository (default: the ONNX file's stem)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..triton import export_triton

    model_dir = export_triton(args.model, args.repo, name=args.name, max_batch=args.max_batch)
    print(f"wrote {model_dir}/config.pbtxt and {model_dir}/1/model.onnx")
    return 0
