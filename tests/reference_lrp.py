"""An independent, deliberately plain LRP reference for torchvision ResNets, used only by the tests.

It walks torchvision's ResNet/BasicBlock/Bottleneck modules in Python (no torch.fx, no graphlrp code) and takes
each layer's backward step with autograd on that single layer: for z = layer(a) + ε, R_in = a ⊙ ∂(z · stopgrad(R/z))/∂a.
It implements the otsuki2024 preset (z⁺ everywhere, first-layer input replaced by ones, BN/ReLU pass-through,
the 2×2 average pool standing in for max-pool) and the three splits at residual adds.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock, Bottleneck

EPS = 1e-5
SPLIT_EPS = 1e-6


def lrp_step(layer_fn, a, relevance, eps=EPS):
    a = a.detach().clone().requires_grad_(True)
    z = layer_fn(a) + eps
    ratio = (relevance / z).detach()
    (grad,) = torch.autograd.grad((z * ratio).sum(), a)
    return a.detach() * grad


def zplus_conv(conv, a, relevance):
    w_pos = conv.weight.clamp(min=0)
    return lrp_step(lambda t: F.conv2d(t, w_pos, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups),
                    a, relevance)


def split(h_main, h_skip, relevance, mode, skip_gets_nothing):
    """Returns (R_main, R_skip)."""
    if skip_gets_nothing:
        return relevance, torch.zeros_like(relevance)
    if mode == "symmetric":
        return relevance / 2, relevance / 2
    if mode == "ratio":
        total = h_main.abs() + h_skip.abs()
        main_share = torch.where(total > 0, h_main.abs() / total.clamp_min(1e-30), torch.full_like(total, 0.5))
        return relevance * main_share, relevance * (1 - main_share)
    if mode == "signed":
        z = h_main + h_skip
        z = torch.where(z >= 0, z + SPLIT_EPS, z - SPLIT_EPS)
        return relevance * h_main / z, relevance * h_skip / z
    raise ValueError(mode)


def block_relevance(block, a, relevance, mode, include_identity):
    if isinstance(block, Bottleneck):
        chain = [block.conv1, block.bn1, block.relu, block.conv2, block.bn2, block.relu, block.conv3, block.bn3]
    elif isinstance(block, BasicBlock):
        chain = [block.conv1, block.bn1, block.relu, block.conv2, block.bn2]
    else:
        raise TypeError(type(block))
    with torch.no_grad():
        inputs = [a]
        for layer in chain:
            inputs.append(layer(inputs[-1]))
        h_main = inputs.pop()
        h_skip = a if block.downsample is None else block.downsample(a)
    r_main, r_skip = split(h_main, h_skip, relevance, mode,
                           skip_gets_nothing=block.downsample is None and not include_identity)
    for layer, layer_in in zip(reversed(chain), reversed(inputs)):
        if isinstance(layer, torch.nn.Conv2d):
            r_main = zplus_conv(layer, layer_in, r_main)
    if block.downsample is not None:
        r_skip = zplus_conv(block.downsample[0], a, r_skip)
    return r_main + r_skip


def otsuki_reference(model, x, target=None, split_mode="ratio", include_identity=True):
    """(input relevance, explained probability) for a torchvision ResNet under the otsuki2024 preset."""
    model = model.eval()
    with torch.no_grad():
        stem = model.relu(model.bn1(model.conv1(x)))
        h = model.maxpool(stem)
        blocks = [b for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for b in stage]
        block_inputs = []
        for b in blocks:
            block_inputs.append(h)
            h = b(h)
        pooled = torch.flatten(model.avgpool(h), 1)
        prob = model.fc(pooled).softmax(-1)
    rows = torch.arange(len(x))
    target = prob.argmax(-1) if target is None else target
    r = torch.zeros_like(prob)
    r[rows, target] = prob[rows, target]
    w_pos = model.fc.weight.clamp(min=0)
    r = lrp_step(lambda t: F.linear(t, w_pos), pooled, r)
    r = lrp_step(model.avgpool, h, r.view(-1, r.shape[1], 1, 1))
    for b, a in zip(reversed(blocks), reversed(block_inputs)):
        r = block_relevance(b, a, r, split_mode, include_identity)
    r = lrp_step(lambda t: F.avg_pool2d(t, 2), stem, r)
    r = zplus_conv(model.conv1, torch.ones_like(x), r)
    return r, prob[rows, target]
