"""`graphlrp inspect MODEL`: the merge report. Needs no weights and no network."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("inspect", help="list the residual merges graphlrp finds in a model",
                       description="Trace MODEL (random weights) and print every add where a skip meets a branch.")
    p.add_argument("model", help="torchvision name, timm:NAME, or path/to/file.py:factory")
    p.add_argument("--input-size", help="H or H,W (default: the model's)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    import graphlrp
    from ..analyze import merge_table
    from ..models import load_model
    from .compile import parse_size

    model, info = load_model(args.model, "none")
    h, w = parse_size(args.input_size, info.input_size)
    merges = graphlrp.inspect(model, torch.randn(1, info.channels, h, w))
    print(f"{info.name}: input {info.channels}x{h}x{w}")
    print(merge_table(merges))
    return 0
