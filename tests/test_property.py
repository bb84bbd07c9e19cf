"""Property test: random small residual networks — random depth, widths, strides, identity / projection /
ResNet-D (pool + conv) / option-A (strided slice + channel zero padding) skips, nested merges, pre-activation
blocks (no ReLU after the add) and every spelling of the add — and random stacks of the wider zoo's block kinds
(Res2Net chunks with chained adds, n-ary and stack-sum merges, permute + LayerNorm blocks, gates, channel shuffle,
radix sums) compile, `inspect` finds every merge with the right skip kind, the explainer returns the model's
logits, conserves with `otsuki2024-conserving`, and splits exactly: R = Σ_i R_i at every merge."""
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


def _compile_and_check_conservation(model, x, split, context=None):
    """Compile with otsuki2024-conserving; the logits are the model's, relevance is finite and conserved per
    sample. Returns (explainer, relevance, taps, p(ŷ))."""
    explainer = graphlrp.compile(model, x[:1], rules="otsuki2024-conserving", split=split)
    logits, relevance, taps = explainer.explain_with_taps(x)
    with torch.no_grad():
        assert torch.allclose(logits, model(x), rtol=1e-4, atol=1e-5)
    assert torch.isfinite(relevance).all()
    p = logits.softmax(-1).max(-1).values
    ratio = relevance.flatten(1).sum(1) / p
    assert ((ratio - 1).abs() <= 1e-3).all(), (context, ratio.tolist())
    return explainer, relevance, taps, p


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

    explainer, relevance, taps, p = _compile_and_check_conservation(model, x, split)
    assert torch.allclose(taps["input"], relevance.flatten(1).sum(1))
    assert torch.allclose(taps["output"], p)
    assert len(explainer.merges) == len(merges)
    for m in explainer.merges:
        r, r_s, r_m = (taps[f"merge:{m.node}.{k}"] for k in ("R", "R_skip", "R_main"))
        assert torch.allclose(r_s + r_m, r, rtol=1e-5, atol=1e-7), m.node


# ------------------------------------------------------------------ the structures of the wider CNN zoo
NEW_BLOCKS = ("res2", "nary", "stack_sum", "channels_last", "se_gate", "spatial_gate", "shuffle", "radix")


class ZooBlock(nn.Module):
    """One residual block of a kind the ResNet spellings above do not cover, at constant width c (c divisible
    by 4): Res2Net chunks with chained adds, an n-ary add, a stack-sum merge, a ConvNeXt block (permute +
    LayerNorm + GELU MLP + layer scale), SE / CBAM-style gates (sigmoid, hard-sigmoid, softmax), a channel
    shuffle, and a split-attention radix sum."""

    def __init__(self, kind: str, c: int, gate: str):
        super().__init__()
        self.kind, self.gate_fn = kind, gate
        q = c // 4
        self.convs = nn.ModuleList(nn.Conv2d(q, q, 3, padding=1) for _ in range(3))
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)
        self.bn = _bn(c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.scale = nn.Parameter(torch.rand(c) + 0.1)
        self.squeeze, self.excite = nn.Conv2d(c, q, 1), nn.Conv2d(q, c, 1)
        self.spatial = nn.Conv2d(2, 1, 3, padding=1)
        self.radix = nn.Conv2d(c, 2 * c, 3, padding=1, groups=2)
        self.attn = nn.Conv2d(c, 2 * c, 1)

    def gate(self, z, dim=None):
        if self.gate_fn == "hardsigmoid":
            return F.hardsigmoid(z)
        if self.gate_fn == "softmax" and dim is not None:
            return z.softmax(dim)
        return torch.sigmoid(z)

    def forward(self, x):
        k = self.kind
        if k == "res2":
            parts = torch.chunk(x, 4, dim=1)
            out, sp = [parts[0]], parts[0]
            for i, conv in enumerate(self.convs):
                sp = F.relu(conv(sp + parts[i + 1]))
                out.append(sp)
            return F.relu(torch.cat(out, 1) + x)
        if k == "nary":
            return F.relu(x + self.bn(self.a(x)) + self.b(x))
        if k == "stack_sum":
            return torch.stack([x, F.relu(self.a(x)), self.b(x)]).sum(0)
        if k == "channels_last":
            y = self.a(x).permute(0, 2, 3, 1)
            y = self.scale * self.fc2(F.gelu(self.fc1(self.norm(y))))
            return x + y.permute(0, 3, 1, 2)
        if k == "se_gate":
            y = F.relu(self.bn(self.a(x)))
            g = self.gate(self.excite(F.relu(self.squeeze(y.mean((2, 3), keepdim=True)))))
            return F.relu(x + y * g)
        if k == "spatial_gate":
            y = self.a(x)
            g = self.gate(self.spatial(torch.cat([y.mean(1, keepdim=True), y.amax(1, keepdim=True)], 1)))
            return F.relu(x + y * g)
        if k == "shuffle":
            n, c, h, w = x.shape
            y = x.view(n, 4, c // 4, h, w).transpose(1, 2).reshape(n, c, h, w)
            return F.relu(x + self.bn(self.a(y)))
        # radix: split attention over two branches of one grouped conv (ResNeSt), gate softmax over the radix dim
        n, c, h, w = x.shape
        y = F.relu(self.radix(x)).reshape(n, 2, c, h, w)
        a = self.attn(y.sum(1).mean((2, 3), keepdim=True)).reshape(n, 2, c, 1, 1)
        return F.relu(x + (y * self.gate(a, dim=1)).sum(1))


class ZooNet(nn.Module):
    def __init__(self, c: int, blocks: list):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), _bn(c), nn.ReLU())
        self.blocks = nn.Sequential(*(ZooBlock(k, c, g) for k, g in blocks))
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


@st.composite
def zoo_networks(draw):
    c = draw(st.sampled_from([4, 8, 12]))
    blocks = [(draw(st.sampled_from(NEW_BLOCKS)), draw(st.sampled_from(["sigmoid", "hardsigmoid", "softmax"])))
              for _ in range(draw(st.integers(1, 3)))]
    return c, blocks, draw(st.sampled_from([6, 8, 9])), draw(st.integers(0, 2 ** 16)), draw(st.sampled_from(
        ["ratio", "symmetric"]))


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(zoo_networks())
def test_random_zoo_networks(case):
    """Random stacks of the zoo's block kinds: compile, reproduce the logits, conserve, and split exactly at every
    merge (R = Σ_i R_i over the operands of an add chain or the slices of a branch-dim sum)."""
    c, blocks, size, seed, split = case
    torch.manual_seed(seed)
    with torch.no_grad():
        model = ZooNet(c, blocks).eval()
    x = torch.randn(2, 3, size, size)
    explainer, relevance, taps, p = _compile_and_check_conservation(model, x, split, blocks)
    expected_merges = sum({"res2": 4, "nary": 1, "stack_sum": 1, "radix": 2}.get(k, 1) for k, _ in blocks)
    assert len(explainer.merges) == expected_merges, [m.node for m in explainer.merges]
    for m in explainer.merges:
        parts = [taps[f"merge:{m.node}.R_{i}"] for i in range(m.arity)]
        assert torch.allclose(sum(parts), taps[f"merge:{m.node}.R"], rtol=1e-5, atol=1e-7), (m.node, m.arity)


@settings(max_examples=60, deadline=None)
@given(st.integers(4, 40), st.floats(0.05, 0.5), st.integers(0, 2**31 - 1))
def test_the_fork_of_a_merge_is_the_latest_lowest_common_ancestor(n, density, seed):
    """`analyze.lowest_common_ancestor` on random DAGs (nodes in forward order) against networkx's sets: a common
    ancestor (a node counts as its own) with no descendant that is one, and the latest such in forward order, so the
    fork does not depend on set iteration order where there are several (HRNet's fuse layers)."""
    import random

    import networkx as nx

    from graphlrp.analyze import lowest_common_ancestor

    rng = random.Random(seed)
    g = nx.DiGraph()
    for i in range(n):
        g.add_node(str(i), order=i)
        for j in range(i):
            if rng.random() < density:
                g.add_edge(str(j), str(i))
    for _ in range(10):
        a, b = str(rng.randrange(n)), str(rng.randrange(n))
        common = (nx.ancestors(g, a) | {a}) & (nx.ancestors(g, b) | {b})
        found = lowest_common_ancestor(g, a, b)
        if not common:
            assert found is None
            continue
        assert found in common and not (nx.descendants(g, found) & common)
        assert int(found) == max(int(c) for c in common)
