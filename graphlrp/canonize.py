"""Optional BatchNorm canonisation before the rewrite: fold each BN into the conv/linear that feeds it.

After folding, conv(x; W', b') equals BN(conv(x; W, b)) exactly, so LRP rules see one affine layer (Zennit's
convention with its ResNet canonizer). A BN whose input is not a conv used only by that BN stays and passes
relevance through.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import ops
from .trace import Traced, ValueProp


def fold_batchnorm(traced: Traced) -> int:
    """Fold BNs into their producing conv/linear in place; returns how many were folded."""
    gm, graph = traced.graph_module, traced.graph
    folded = 0
    for node in list(graph.nodes):
        op = ops.describe(node, traced) if node.op != "placeholder" else None
        if op is None or op.kind != ops.BATCHNORM:
            continue
        producer = op.inputs[0]
        prod = ops.describe(producer, traced) if producer.op != "placeholder" else None
        if prod is None or prod.kind not in (ops.CONV, ops.LINEAR) or len(producer.users) != 1:
            continue
        scale, shift = op.params["scale"], op.params["shift"]
        weight, bias = prod.params["weight"], prod.params.get("bias")
        shape = (-1,) + (1,) * (weight.dim() - 1)
        new_w = weight * scale.view(shape)
        new_b = (bias if bias is not None else torch.zeros_like(shift)) * scale + shift
        if prod.kind == ops.CONV:
            p = prod.params
            layer = nn.Conv2d(new_w.shape[1] * p["groups"], new_w.shape[0], tuple(new_w.shape[-2:]), p["stride"],
                              p["padding"], p["dilation"], p["groups"], bias=True)
        else:
            layer = nn.Linear(new_w.shape[1], new_w.shape[0], bias=True)
        with torch.no_grad():
            layer.weight.copy_(new_w)
            layer.bias.copy_(new_b)
        name = f"{producer.name}_bnfolded"
        gm.add_submodule(name, layer.eval())
        with graph.inserting_after(producer):
            new = graph.call_module(name, (producer.args[0],))
        new.meta = dict(producer.meta)
        new.meta["folded_from"] = (producer.target if producer.op == "call_module" else producer.name,
                                   node.target if node.op == "call_module" else node.name)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        graph.erase_node(producer)
        folded += 1
    if folded:
        graph.eliminate_dead_code()
        gm.recompile()
        with torch.no_grad():
            ValueProp(gm).run(traced.example_input)
    return folded
