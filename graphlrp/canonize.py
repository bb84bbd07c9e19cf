"""Optional BatchNorm canonisation before the rewrite (`batchnorm = "fold"` in a preset).

Each inference-mode BN is an affine map per channel, y = s·x + t. It is folded, in this order of preference:

1. into the conv/linear that produces its input (conv → BN, the usual ResNet structure; Zennit's convention with
   its ResNet canonizer): W' = s·W (per output channel), b' = s·b + t. Exact everywhere.
2. into the conv/linear that consumes its output (BN → conv): W' = W·s (per input channel), b' = b + Σ W·t.
   This is exact only where the conv never reads padding — a zero-padded border is a zero *after* the BN, which
   the folded conv would read as BN(0) = t — so it is done only for convs with no padding (e.g. 1×1 convs) and for
   linear layers.

Either way conv(x; W', b') equals the original pair to float precision, and LRP rules see one affine layer. A
BN that fits neither pattern (e.g. the BN → ReLU → conv of pre-activation ResNets, or a BN whose producer or
consumer has other users) stays in the graph and gets the preset's `batchnorm` rule (normally `pass`).
The BN can be a module (`nn.BatchNorm2d`, subclasses included) or the functional `F.batch_norm` that e.g. timm's
`BatchNormAct2d` calls.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from . import ops
from .graph import drop_dead_nodes
from .trace import Traced, ValueProp


def _describe(node: fx.Node, traced: Traced):
    if node.op in ("placeholder", "output", "get_attr") or not node.meta.get("dynamic", False):
        return None
    return ops.describe(node, traced)


def _affine_module(kind: str, p: dict, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    # skip_init: no random initialisation, so compiling leaves the global RNG alone; the model's dtype and device
    # (a float64 model's folded layer in float32 would not run)
    where = {"dtype": weight.dtype, "device": weight.device}
    if kind == ops.CONV:
        layer = nn.utils.skip_init(nn.Conv2d, weight.shape[1] * p["groups"], weight.shape[0],
                                   tuple(weight.shape[-2:]), p["stride"], p["padding"], p["dilation"], p["groups"],
                                   bias=True, **where)
    else:
        layer = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=True, **where)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer.eval()


def _name(node: fx.Node) -> str:
    return node.target if node.op == "call_module" else node.name


def _replace(traced: Traced, anchor: fx.Node, data_input: fx.Node, layer: nn.Module, replaced: list[fx.Node],
             folded_from: tuple) -> None:
    """Put `layer(data_input)` in place of the chain `replaced` (whose last node's users move to the new node)."""
    gm, graph = traced.graph_module, traced.graph
    name = f"{anchor.name}_bnfolded"
    gm.add_submodule(name, layer)
    last = replaced[-1]
    with graph.inserting_after(last):
        new = graph.call_module(name, (data_input,))
    new.meta = dict(anchor.meta)
    new.meta.update({k: last.meta[k] for k in ("shape", "dtype") if k in last.meta})
    new.meta["folded_from"] = folded_from
    last.replace_all_uses_with(new)
    for node in reversed(replaced):
        graph.erase_node(node)


def _fold_into_producer(traced: Traced, node: fx.Node, bn: ops.Op) -> bool:
    producer = bn.inputs[0]
    prod = _describe(producer, traced)
    if prod is None or prod.kind not in (ops.CONV, ops.LINEAR) or len(producer.users) != 1:
        return False
    if prod.kind == ops.LINEAR and prod.params["weight"].dim() != 2:  # side-by-side layers (grouped_linear)
        return False
    scale, shift = bn.params["scale"], bn.params["shift"]
    weight, bias = prod.params["weight"], prod.params.get("bias")
    if weight.shape[0] != scale.numel():
        return False
    new_w = weight * scale.view((-1,) + (1,) * (weight.dim() - 1))
    new_b = (bias if bias is not None else torch.zeros_like(shift)) * scale + shift
    layer = _affine_module(prod.kind, prod.params, new_w, new_b)
    _replace(traced, producer, producer.args[0], layer, [producer, node], (_name(producer), _name(node)))
    return True


def _fold_into_consumer(traced: Traced, node: fx.Node, bn: ops.Op) -> bool:
    if len(node.users) != 1:
        return False
    consumer = next(iter(node.users))
    cons = _describe(consumer, traced)
    if cons is None or cons.kind not in (ops.CONV, ops.LINEAR) or cons.inputs[0] is not node:
        return False
    if consumer.args[0] is not node:  # conv/linear describers read their input from args[0]
        return False
    p = cons.params
    if cons.kind == ops.CONV and any(p["padding"]):
        return False  # the border would read BN(0) = t instead of the padding zero: not exact
    if cons.kind == ops.LINEAR and (len(node.meta.get("shape", ())) != 2 or p["weight"].dim() != 2):
        return False
    scale, shift = bn.params["scale"], bn.params["shift"]
    weight, bias = p["weight"], p.get("bias")
    cin = weight.shape[1] * (p["groups"] if cons.kind == ops.CONV else 1)
    if cin != scale.numel():
        return False
    if cons.kind == ops.CONV:
        g = p["groups"]
        cout, cin_g = weight.shape[:2]
        # input channel of W[o, j] is (o // (cout / g)) * cin_g + j
        channel = (torch.arange(cout) // (cout // g)).view(-1, 1) * cin_g + torch.arange(cin_g).view(1, -1)
        s, t = scale[channel], shift[channel]  # [cout, cin_g]
        new_w = weight * s[..., None, None]
        extra = (weight * t[..., None, None]).sum(dim=(1, 2, 3))
    else:
        new_w = weight * scale.view(1, -1)
        extra = weight @ shift
    new_b = (bias if bias is not None else torch.zeros_like(extra)) + extra
    layer = _affine_module(cons.kind, p, new_w, new_b)
    _replace(traced, consumer, bn.inputs[0], layer, [node, consumer], (_name(consumer), _name(node)))
    return True


def fold_batchnorm(traced: Traced) -> dict:
    """Fold BNs into an adjacent conv/linear in place, where that is exact. Returns counts:
    {"into_producer": n, "into_consumer": n, "kept": n} (kept BNs pass relevance per the preset)."""
    counts = {"into_producer": 0, "into_consumer": 0, "kept": 0}
    for direction, fold in (("into_producer", _fold_into_producer), ("into_consumer", _fold_into_consumer)):
        for node in list(traced.graph.nodes):
            if getattr(node, "_erased", False):
                continue
            bn = _describe(node, traced)
            if bn is None or bn.kind != ops.BATCHNORM:
                continue
            if fold(traced, node, bn):
                counts[direction] += 1
    counts["kept"] = sum(1 for n in traced.graph.nodes
                         if (op := _describe(n, traced)) is not None and op.kind == ops.BATCHNORM)
    if counts["into_producer"] or counts["into_consumer"]:
        drop_dead_nodes(traced.graph)
        traced.graph_module.recompile()
        traced.__dict__.pop("_constants", None)
        with torch.no_grad():
            ValueProp(traced.graph_module).run(traced.example_input)
    return counts
