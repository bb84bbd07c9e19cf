"""Parametric layers: convolution, linear, batch norm."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UnsupportedOpError
from ..graph import describe_node
from .base import BATCHNORM, CONV, LINEAR, Op, arg, describes, pair, value


def _conv_op(node, weight, bias, stride, padding, dilation, groups, padding_mode="zeros"):
    if weight.dim() != 4:
        raise UnsupportedOpError(f"{describe_node(node)}: only 2-d convolutions are supported")
    if padding_mode != "zeros":
        raise UnsupportedOpError(f"{describe_node(node)}: padding_mode={padding_mode!r} is not supported")
    k = weight.shape[-2:]
    dilation = pair(dilation)
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same" and all(d * (kk - 1) % 2 == 0 for d, kk in zip(dilation, k)):
            padding = tuple(d * (kk - 1) // 2 for d, kk in zip(dilation, k))
        else:
            raise UnsupportedOpError(f"{describe_node(node)}: asymmetric padding={padding!r} is not supported")
    return dict(weight=weight.detach(), bias=None if bias is None else bias.detach(), stride=pair(stride),
                padding=pair(padding), dilation=dilation, groups=int(groups))


@describes(modules=[nn.Conv2d])
def _conv_module(node, traced):
    m = traced.module(node)
    return Op(CONV, node, (node.args[0],),
              _conv_op(node, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups, m.padding_mode))


@describes(functions=[F.conv2d, "torch.conv2d"])
def _conv_function(node, traced):
    v = lambda i, name, d=None: value(arg(node, i, name, d), traced)  # noqa: E731
    return Op(CONV, node, (arg(node, 0, "input"),),
              _conv_op(node, v(1, "weight"), v(2, "bias"), v(3, "stride", 1), v(4, "padding", 0),
                       v(5, "dilation", 1), v(6, "groups", 1)))


@describes(modules=[nn.Linear])
def _linear_module(node, traced):
    m = traced.module(node)
    return Op(LINEAR, node, (node.args[0],),
              dict(weight=m.weight.detach(), bias=None if m.bias is None else m.bias.detach()))


def grouped_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Linear layers side by side: input [..., G, I], weight [G, O, I], bias [G, O] -> [..., G, O], group g's
    outputs reading group g's inputs alone. The compiler writes it where it runs independent recurrent layers as
    one (both directions of a bidirectional LSTM, Sequencer2D's vertical and horizontal LSTMs): one step of all of
    them is one node, so an unrolled graph has a node per step, not per step and layer. Its rules are the linear
    layer's, applied per group, so each unit's relevance is what G separate layers would give."""
    if input.dim() == 3:  # [N, G, I]: one batched matmul over strided views, no copy of input or weight
        out = torch.bmm(input.transpose(0, 1), weight.transpose(1, 2)).transpose(0, 1)
    else:
        out = torch.einsum("...gi,goi->...go", input, weight)
    return out if bias is None else out + bias


def grouped_linear_transposed(s: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The input-side map of `grouped_linear`: s [..., G, O] -> [..., G, I], s_g @ W_g per group (the relevance
    pass of its rules)."""
    if s.dim() == 3:
        return torch.bmm(s.transpose(0, 1), weight).transpose(0, 1)
    return torch.einsum("...go,goi->...gi", s, weight)


@describes(functions=[grouped_linear])
def _grouped_linear(node, traced):
    bias = value(arg(node, 2, "bias"), traced)
    return Op(LINEAR, node, (arg(node, 0, "input"),),
              dict(weight=value(arg(node, 1, "weight"), traced).detach(), bias=None if bias is None else bias.detach()))


@describes(functions=[F.linear])
def _linear_function(node, traced):
    bias = value(arg(node, 2, "bias"), traced)  # BEiT: F.linear(input=x, weight=w, bias=cat((q_bias, 0, v_bias)))
    return Op(LINEAR, node, (arg(node, 0, "input"),),
              dict(weight=value(arg(node, 1, "weight"), traced).detach(), bias=None if bias is None else bias.detach()))


def _bn_params(node, mean, var, weight, bias, eps):
    if mean is None or var is None:
        raise UnsupportedOpError(f"{describe_node(node)}: batch norm without running statistics")
    scale = (weight if weight is not None else torch.ones_like(mean)) / torch.sqrt(var + eps)
    shift = (bias if bias is not None else torch.zeros_like(mean)) - mean * scale
    return dict(scale=scale.detach(), shift=shift.detach())


@describes(modules=[nn.modules.batchnorm._BatchNorm])
def _bn_module(node, traced):
    m = traced.module(node)
    if m.running_mean is None:
        raise UnsupportedOpError(f"{describe_node(node)}: batch norm without running statistics")
    return Op(BATCHNORM, node, (node.args[0],),
              _bn_params(node, m.running_mean, m.running_var, m.weight, m.bias, m.eps))


@describes(functions=[F.batch_norm, "torch.batch_norm"])
def _bn_function(node, traced):
    v = lambda i, name, d=None: value(arg(node, i, name, d), traced)  # noqa: E731
    if v(5, "training", False):
        raise UnsupportedOpError(f"{describe_node(node)}: batch norm in training mode; call model.eval()")
    return Op(BATCHNORM, node, (node.args[0],),
              _bn_params(node, v(1, "running_mean"), v(2, "running_var"), v(3, "weight"), v(4, "bias"),
                         v(7, "eps", 1e-5)))
