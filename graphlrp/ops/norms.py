"""Normalisations other than batch norm: layer norm (also channels-first LayerNorm2d, which traces to a permute
around `F.layer_norm`), group norm, instance norm, local response norm, L2 normalisation.

All are NORM ops (rule category `normalization`). The default rule is the identity rule of AttnLRP (Achtibat et
al., ICML 2024): with the normaliser held constant the op is an elementwise affine map, through which relevance
passes; the affine weight and bias are a scale and a shift. Layer norms also carry their parameters for the
`linearized` rule (AttnLRP's own treatment: 1/σ held constant, the centring and affine part get the ε-rule). Spelled-out normalisers (EvoNorm, FRN) reach the
same rule through `elementwise`: a divisor or a broadcast multiplier computed from the input is held constant.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import NORM, Op, arg, describes, value


@describes(modules=[nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm,
                    getattr(nn, "RMSNorm", nn.LayerNorm)],
           functions=[F.layer_norm, torch.layer_norm, F.group_norm, torch.group_norm, F.instance_norm,
                      torch.instance_norm, F.local_response_norm, F.normalize, "F.rms_norm", "torch.rms_norm"])
def _norm(node, traced):
    return Op(NORM, node, (node.args[0],), _layer_norm_params(node, traced))


_SCALINGS = tuple(f for f in (getattr(F, "rms_norm", None), getattr(torch, "rms_norm", None), F.normalize,
                               F.local_response_norm) if f is not None)
_SCALING_MODULES = tuple(m for m in (getattr(nn, "RMSNorm", None), nn.LocalResponseNorm) if m is not None)


def _layer_norm_params(node, traced) -> dict:
    """For a layer norm, what the `linearized` rule needs (normalised trailing dims, eps, affine weight and bias);
    for a group norm (module or functional spelling) its groups, eps and per-channel affine part; for a norm that
    only scales (RMSNorm, L2 and local response normalisation: no centring, no bias) `scaling`, as with its
    normaliser held constant it is a diagonal map; {} for instance norms, which only the identity rule (`pass`)
    handles."""
    detach = lambda t: None if t is None else t.detach()  # noqa: E731
    if node.op == "call_module":
        m = traced.module(node)
        if isinstance(m, nn.GroupNorm):
            return dict(group_norm=True, groups=int(m.num_groups), eps=float(m.eps), weight=detach(m.weight),
                        bias=detach(m.bias))
        if isinstance(m, _SCALING_MODULES):
            return dict(scaling=True)
        if not isinstance(m, nn.LayerNorm):
            return {}
        shape, eps, weight, bias = m.normalized_shape, m.eps, m.weight, m.bias
    elif node.target in (F.group_norm, torch.group_norm):  # timm's GroupNorm1 / GroupNormAct
        v = lambda i, name, d=None: value(arg(node, i, name, d), traced)  # noqa: E731
        return dict(group_norm=True, groups=int(v(1, "num_groups")), eps=float(v(4, "eps", 1e-5)),
                    weight=detach(v(2, "weight")), bias=detach(v(3, "bias")))
    elif node.target in (F.layer_norm, torch.layer_norm):
        v = lambda i, name, d=None: value(arg(node, i, name, d), traced)  # noqa: E731
        shape, weight, bias, eps = v(1, "normalized_shape"), v(2, "weight"), v(3, "bias"), v(4, "eps", 1e-5)
    elif node.target in _SCALINGS:
        return dict(scaling=True)
    else:
        return {}
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return dict(layer_norm=True, dims=len(shape), eps=float(eps), weight=detach(weight), bias=detach(bias))
