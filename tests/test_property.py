"""Property test: random small residual networks — random depth, widths, strides, identity / projection /
ResNet-D (pool + conv) / option-A (strided slice + channel zero padding) skips, nested merges, pre-activation
blocks (no ReLU after the add) and every spelling of the add — compile, `inspect` finds every merge with the right
skip kind, the explainer returns the model's logits, conserves with `otsuki2024-conserving`, and splits exactly:
R = R_skip + R_main at every merge."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphlrp

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SPELLINGS = ("+", "torch.add", "+=", "add_", "alpha")
EXPECTED_KIND = {"identity": "identity", "projection": "projection", "pool_projection": "projection",
                 "option_a": "other"}


@dataclass(frozen=True)
class BlockSpec:
    cout: int
    stride: int
    skip: str  # identity | projection | pool_projection | option_a
    depth: int  # convs on the main branch
    inner: "BlockSpec | None"  # a nested residual block inside the main branch
    post_relu: bool  # False: pre-activation style, the add is not followed by a ReLU
    spelling: str
    skip_first: bool  # `skip + main` instead of `main + skip`


def _bn(c):
    bn = nn.BatchNorm2d(c)
    bn.running_mean.uniform_(-0.1, 0.1)
    bn.running_var.uniform_(0.5, 1.5)
    return bn


class Block(nn.Module):
    def __init__(self, spec: BlockSpec, cin: int):
        super().__init__()
        self.spec = spec
        c, s = spec.cout, spec.stride
        self.convs = nn.ModuleList([nn.Conv2d(cin, c, 3, s, 1, bias=False)] +
                                   [nn.Conv2d(c, c, 3, 1, 1, bias=False) for _ in range(spec.depth - 1)])
        self.bns = nn.ModuleList([_bn(c) for _ in range(spec.depth)])
        self.inner = Block(spec.inner, c) if spec.inner is not None else None
        if spec.skip == "projection":
            self.proj = nn.Sequential(nn.Conv2d(cin, c, 1, s, bias=False), _bn(c))
        elif spec.skip == "pool_projection":
            pool = nn.AvgPool2d(s, s, ceil_mode=True, count_include_pad=False) if s > 1 else nn.Identity()
            self.proj = nn.Sequential(pool, nn.Conv2d(cin, c, 1, bias=False), _bn(c))
        self.pad = (c - cin) // 2, (c - cin) - (c - cin) // 2

    def shortcut(self, x):
        kind, s = self.spec.skip, self.spec.stride
        if kind == "identity":
            return x
        if kind == "option_a":
            return F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0, self.pad[0], self.pad[1]))
        return self.proj(x)

    def forward(self, x):
        out = x
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            out = bn(conv(out))
            if i < len(self.convs) - 1:
                out = F.relu(out)
                if i == 0 and self.inner is not None:
                    out = self.inner(out)
        skip = self.shortcut(x)
        a, b = (skip, out) if self.spec.skip_first else (out, skip)
        sp = self.spec.spelling
        if sp == "+":
            h = a + b
        elif sp == "torch.add":
            h = torch.add(a, b)
        elif sp == "alpha":
            h = torch.add(a, b, alpha=0.5)
        elif sp == "+=":
            a += b
            h = a
        else:
            a.add_(b)
            h = a
        return F.relu(h) if self.spec.post_relu else h


class Net(nn.Module):
    def __init__(self, c0: int, maxpool: bool, blocks: list):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c0, 3, padding=1, bias=False), _bn(c0), nn.ReLU())
        self.pool = nn.MaxPool2d(3, 2, 1) if maxpool else nn.Identity()
        layers, c = [], c0
        for spec in blocks:
            layers.append(Block(spec, c))
            c = spec.cout
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        x = F.relu(self.blocks(self.pool(self.stem(x))))  # a last ReLU, as pre-activation nets have too
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def expected_kinds(blocks) -> list:
    kinds = []
    for spec in blocks:
        if spec.inner is not None:
            kinds += expected_kinds([spec.inner])
        kinds.append(EXPECTED_KIND[spec.skip])
    return kinds


@st.composite
def block_specs(draw, cin: int, nested: bool = True):
    stride = draw(st.sampled_from([1, 1, 2]))
    cout = draw(st.integers(3, 8))
    options = []
    if stride == 1 and cout == cin:
        options.append("identity")
    options += ["projection", "pool_projection"]
    if cout >= cin and (stride > 1 or cout > cin):
        options.append("option_a")
    skip = draw(st.sampled_from(options))
    # the analysis tells skip from main by length: keep the main branch longer than a non-empty skip
    depth = draw(st.integers(1 if skip == "identity" else 2, 3))
    inner = None
    if nested and depth >= 2 and draw(st.booleans()):
        inner = draw(block_specs(cout, nested=False).filter(lambda s: s.skip == "identity"))
    return BlockSpec(cout, stride, skip, depth, inner, draw(st.booleans()), draw(st.sampled_from(SPELLINGS)),
                     draw(st.booleans()))


@st.composite
def networks(draw):
    c0 = draw(st.integers(3, 6))
    blocks, c = [], c0
    for _ in range(draw(st.integers(1, 4))):
        spec = draw(block_specs(c))
        blocks.append(spec)
        c = spec.cout
    size = draw(st.sampled_from([8, 9, 12]))
    return c0, draw(st.booleans()), blocks, size, draw(st.integers(0, 2 ** 16)), draw(st.sampled_from(
        ["ratio", "symmetric"]))


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(networks())
def test_random_residual_networks(case):
    c0, maxpool, blocks, size, seed, split = case
    torch.manual_seed(seed)
    with torch.no_grad():
        model = Net(c0, maxpool, blocks).eval()
    x = torch.randn(2, 3, size, size)

    merges = graphlrp.inspect(model, x[:1])
    assert [m.skip_kind for m in merges] == expected_kinds(blocks)

    explainer = graphlrp.compile(model, x[:1], rules="otsuki2024-conserving", split=split)
    logits, relevance, taps = explainer.explain_with_taps(x)
    with torch.no_grad():
        assert torch.allclose(logits, model(x), rtol=1e-4, atol=1e-5)
    assert torch.isfinite(relevance).all()
    p = logits.softmax(-1).max(-1).values
    ratio = relevance.flatten(1).sum(1) / p
    assert ((ratio - 1).abs() <= 1e-3).all(), ratio.tolist()
    assert torch.allclose(taps["input"], relevance.flatten(1).sum(1))
    assert torch.allclose(taps["output"], p)
    assert len(explainer.merges) == len(merges)
    for m in explainer.merges:
        r, r_s, r_m = (taps[f"merge:{m.node}.{k}"] for k in ("R", "R_skip", "R_main"))
        assert torch.allclose(r_s + r_m, r, rtol=1e-5, atol=1e-7), m.node
