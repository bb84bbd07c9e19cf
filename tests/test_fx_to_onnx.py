"""The fx → ONNX lowering, op by op: every converter's ONNX output equals PyTorch's result in onnxruntime, at a
batch size other than the example's (so a batch size baked into the file would show), plus recipes, errors and
whole explainers of a model without torchvision (CIFAR ResNet-20: slicing + zero-padding shortcuts) for every
preset. Needs no torchvision: these tests also run against the oldest torch graphlrp supports."""
from __future__ import annotations

import operator

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper

import graphlrp
from graphlrp import fx_to_onnx
from graphlrp.derived import derive
from graphlrp.optimize import flipped_kernel
from graphlrp.rewrite import Emitter

TOL = 1e-5


def run_onnx(model: onnx.ModelProto, feeds: dict):
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in feeds.items()})


def assert_close(got, expected, tol=TOL):
    expected = expected.detach().numpy()
    assert got.shape == expected.shape and got.dtype == expected.dtype, (got.shape, expected.shape, got.dtype)
    if expected.dtype == np.bool_ or np.issubdtype(expected.dtype, np.integer):
        assert np.array_equal(got, expected)
    else:
        scale = max(np.abs(expected).max(), 1e-30)
        assert np.abs(got - expected).max() / scale <= tol


def check_module(module: nn.Module, *shapes, batch: int = 5):
    """Lower `module` (fx-traced) at batch 2, run it in onnxruntime at `batch`, compare with PyTorch."""
    g = torch.Generator().manual_seed(0)
    example = tuple(torch.randn(2, *s, generator=g) for s in shapes)
    gm = fx.symbolic_trace(module)
    names = [f"x{i}" for i in range(len(shapes))]
    with torch.no_grad():
        outs = gm(*example)
    outs = outs if isinstance(outs, tuple) else (outs,)
    model, _ = fx_to_onnx.lower(gm, example, names, [f"y{i}" for i in range(len(outs))])
    xs = tuple(torch.randn(batch, *s, generator=g) for s in shapes)
    with torch.no_grad():
        expected = gm(*xs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for got, exp in zip(run_onnx(model, dict(zip(names, xs))), expected):
        assert_close(got, exp)
    return model


class Elementwise(nn.Module):
    def forward(self, x):
        a = torch.clamp(x, min=-0.5, max=0.7) + torch.clamp(x, max=0) * 2 - x.clamp(min=0) / 3
        b = torch.where(x >= 0, x + 1e-3, x - 1e-3) * torch.abs(x)
        c = torch.where(torch.lt(x, 0.2), 0.0, torch.exp(-x.abs()))
        d = torch.sigmoid(x) + torch.tanh(x) + (x > 0.1).to(torch.float32) + (x != 0).float()
        e = torch.zeros_like(x) + torch.ones_like(x) + torch.add(x, a, alpha=0.5) - operator.truediv(x, 2.0)
        return a, b, c, d, e


class Activations(nn.Module):
    def __init__(self):
        super().__init__()
        self.mods = nn.ModuleList([nn.ReLU(), nn.LeakyReLU(0.2), nn.SiLU(), nn.GELU(), nn.GELU("tanh"), nn.ELU(0.5),
                                   nn.ReLU6(), nn.Hardswish(), nn.Sigmoid(), nn.Tanh(), nn.Identity(), nn.Dropout()])

    def forward(self, x):
        out = [m(x * 4) for m in self.mods]
        out += [F.relu(x), F.leaky_relu(x, 0.1), F.silu(x), F.gelu(x), F.elu(x), F.relu6(x * 8), F.hardswish(x * 4)]
        return tuple(out)


class Shapes(nn.Module):
    def forward(self, x):  # x: [N, 4, 6, 8]
        p = x.permute(0, 2, 3, 1).reshape(x.size(0), 6, 32)
        t = torch.transpose(x, 2, 3).flatten(1)
        s = x[:, 1:3, ::2, -1]  # slice, step, int
        u = x[..., None, 2:5]  # ellipsis, new axis
        n = torch.narrow(x, 3, 2, 4)
        a, b = torch.split(x, [1, 3], 1)
        cat = torch.cat([a, b * 2], 1)
        st = torch.stack([x, -x], 2).flatten(2, 3)
        q = x.unsqueeze(1).squeeze(1).view(-1, 4, 48)
        padded = F.pad(x, (1, 2, 0, 3), value=0.5)
        return p, t, s, u, n, cat, st, q, padded


class Reductions(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm([6, 8])

    def forward(self, x):
        return (self.norm(x), F.layer_norm(x, (8,), eps=1e-3), x.sum(1), torch.sum(x, (2, 3), True), x.mean((2, 3), keepdim=True), torch.mean(x, -1),
                torch.amax(x, 1), torch.softmax(x, -1), F.log_softmax(x, dim=1), torch.argmax(x.flatten(1), -1))


class Indexing(nn.Module):
    def forward(self, x):  # x: [N, 4, 6, 8]
        flat = x.reshape(-1, 4, 48)
        idx = torch.argmax(flat, -1, keepdim=True)
        g = torch.gather(flat, 2, idx)
        scattered = torch.scatter_add(torch.zeros_like(flat), 2, idx, g)
        sel = torch.index_select(flat, 1, torch.tensor([3, 0]))
        mm = torch.matmul(flat, flat.transpose(1, 2))
        return g, scattered, sel, mm


class Layers(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
        self.convt = nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1)
        self.bn = nn.BatchNorm2d(4).eval()
        self.bn.running_mean.uniform_(-1, 1, generator=g)
        self.bn.running_var.uniform_(0.5, 2, generator=g)
        self.lin = nn.Linear(8, 5)
        self.pool = nn.MaxPool2d(3, 2, 1, ceil_mode=False)
        self.avg = nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False)
        self.aavg, self.amax = nn.AdaptiveAvgPool2d((3, 2)), nn.AdaptiveMaxPool2d(2)
        self.w = nn.Parameter(torch.randn(5, 4, 3, 3, generator=g))
        self.w_lin = nn.Parameter(torch.randn(5, 4 * 6 * 8, generator=g))

    def forward(self, x):  # x: [N, 4, 6, 8]
        pooled, idx = F.max_pool2d(x, 3, 2, 1, 1, False, True)
        return (self.conv(x), self.convt(x), self.bn(x), self.lin(x), self.pool(x), self.avg(x), self.aavg(x),
                self.amax(x), pooled, idx, F.conv2d(x, self.w, None, 1, "same", 1, 1),
                F.conv_transpose2d(x, self.w.transpose(0, 1), None, 2), F.avg_pool2d(x, 2),
                F.adaptive_avg_pool2d(x, 1).flatten(1), F.linear(x.flatten(1), self.w_lin),
                F.batch_norm(x, self.bn.running_mean, self.bn.running_var, None, self.bn.bias, False, 0.1, 1e-3))


@pytest.mark.parametrize("module", [Elementwise(), Activations(), Shapes(), Reductions(), Indexing(), Layers()],
                         ids=lambda m: type(m).__name__)
def test_converters_match_pytorch_at_another_batch_size(module):
    check_module(module.eval(), (4, 6, 8))


def test_integer_inputs_and_type_promotion():
    class Targets(nn.Module):  # the explainer's target selection: -1 = top-1, one-hot as float
        def forward(self, logits, target):
            chosen = torch.where(torch.lt(target, 0), torch.argmax(logits, -1), target)
            one_hot = torch.eq(torch.unsqueeze(chosen, 1), torch.arange(7).view(1, 7).float())
            return torch.mul(one_hot.to(torch.float32), logits)

    gm = fx.symbolic_trace(Targets())
    example = (torch.randn(2, 7), torch.tensor([-1, 3]))
    model, _ = fx_to_onnx.lower(gm, example, ["logits", "target"], ["r"])
    logits, target = torch.randn(4, 7), torch.tensor([2, -1, 6, -1])
    (got,) = run_onnx(model, {"logits": logits, "target": target})
    assert_close(got, gm(logits, target))


@pytest.mark.parametrize("compute_derived", [False, True], ids=["held", "computed"])
@pytest.mark.parametrize("groups", [1, 2])
def test_a_derived_weight_is_computed_from_the_stored_one(groups, compute_derived):
    """A constant with a recipe (W⁺, a flipped kernel of W⁺) is written as ops on the stored W, which is stored
    once; the numbers are those of the eagerly computed constant. The same when the explainer itself computes the
    derived weights in each call (a large model's, `compute_derived`): the graph holds W alone."""
    w = torch.randn(4, 4 // groups, 3, 3, generator=torch.Generator().manual_seed(2))
    root, graph = nn.Module(), fx.Graph()
    em = Emitter(graph, root, compute_derived=compute_derived)
    x = graph.placeholder("x")
    w_pos = derive(torch.clamp, w, min=0)
    z = em.call(F.conv2d, x, w_pos, None, 1, 1, 1, groups)
    back = em.call(F.conv2d, z, derive(flipped_kernel, w_pos, groups), None, 1, 1, 1, groups)
    graph.output((em.call(torch.add, back, em.call(F.conv2d, x, w, None, 1, 1, 1, groups)),))
    gm = fx.GraphModule(root, graph)
    assert len(list(gm.buffers())) == (1 if compute_derived else 3)
    model, _ = fx_to_onnx.lower(gm, (torch.randn(2, 4, 5, 5),), ["x"], ["y"])
    stored = [numpy_helper.to_array(i) for i in model.graph.initializer if i.dims and np.prod(i.dims) > 8]
    assert len(stored) == 1 and np.array_equal(stored[0], w.numpy())
    x = torch.randn(3, 4, 5, 5)
    (got,) = run_onnx(model, {"x": x})
    eager = F.conv2d(F.conv2d(x, w.clamp(min=0), None, 1, 1, 1, groups), flipped_kernel(w.clamp(min=0), groups),
                     None, 1, 1, 1, groups) + F.conv2d(x, w, None, 1, 1, 1, groups)
    assert_close(got, gm(x)[0])
    assert_close(got, eager)


@pytest.mark.parametrize("array", [np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5,
                                   np.array([1.5, -2.0], dtype=np.float16), np.arange(6, dtype=np.int64) - 3,
                                   np.array([3, 200], dtype=np.uint8), np.array([True, False]),
                                   np.zeros((0, 3), dtype=np.float32), np.array(2.5, dtype=np.float64)],
                         ids=["float32", "float16", "int64", "uint8", "bool", "empty", "scalar"])
def test_initializers_written_in_place_equal_onnx_own_conversion(array):
    """The lowering fills each initializer inside the final ModelProto (no side copy); what it writes is what
    onnx.numpy_helper.from_array writes, and reads back as the array."""
    graph = onnx.GraphProto()
    fx_to_onnx.write_initializers(graph, [("w", array)])
    (written,) = graph.initializer
    assert written == numpy_helper.from_array(array, "w")
    back = numpy_helper.to_array(written)
    assert back.dtype == array.dtype and back.shape == array.shape and np.array_equal(back, array)


def test_an_op_without_converter_is_an_export_error_naming_the_node():
    class Cumulative(nn.Module):
        def forward(self, x):
            return torch.cumsum(x, 1)

    with pytest.raises(graphlrp.ExportError, match=r"node 'cumsum'.*cumsum.*@converts"):
        fx_to_onnx.lower(fx.symbolic_trace(Cumulative()), (torch.randn(2, 3),), ["x"], ["y"])


def test_slicing_the_batch_is_refused():
    class First(nn.Module):
        def forward(self, x):
            return x[:1] * 2

    with pytest.raises(graphlrp.ExportError, match="batch"):
        fx_to_onnx.lower(fx.symbolic_trace(First()), (torch.randn(2, 3),), ["x"], ["y"])


@pytest.mark.parametrize("preset", ["otsuki2024", "otsuki2024-conserving", "epsilon-plus-flat", "epsilon-gamma-box",
                                    "epsilon-alpha2-beta1"])
def test_cifar_resnet_explainers_export_with_parity(preset, tmp_path):
    """CIFAR ResNet-20's option-A shortcuts (strided slice + channel zero-padding) under every preset: export_onnx
    checks onnxruntime against the PyTorch explainer (1e-4) itself; then a batch of 3 with explicit targets."""
    from graphlrp.zoo.cifar import resnet20

    torch.manual_seed(0)
    model = resnet20().eval()
    explainer = graphlrp.compile(model, torch.randn(1, 3, 32, 32), rules=preset)
    path = tmp_path / "r20.onnx"
    report = explainer.export_onnx(path)
    assert report.max_rel_diff <= 1e-4 or report.float32_error_onnxruntime is not None
    x, target = torch.randn(3, 3, 32, 32), torch.tensor([-1, 4, 9])
    logits, relevance = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"input": x.numpy(), "target": target.numpy()})
    logits_pt, relevance_pt = explainer(x, target)
    assert np.abs(logits - logits_pt.numpy()).max() / np.abs(logits_pt.numpy()).max() <= 1e-4
    for i in range(3):
        r, r_pt = relevance[i], relevance_pt[i].numpy()
        assert np.abs(r - r_pt).max() / max(np.abs(r_pt).max(), 1e-30) <= 1e-3, f"sample {i}"


def test_forward_onnx_is_the_plain_model():
    from graphlrp.export import forward_onnx
    from graphlrp.zoo.cifar import resnet20

    torch.manual_seed(0)
    model = resnet20().eval()
    proto = forward_onnx(model, torch.randn(1, 3, 32, 32))
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["logits"]
    x = torch.randn(4, 3, 32, 32)
    (got,) = run_onnx(proto, {"input": x})
    with torch.no_grad():
        assert_close(got, model(x), tol=1e-4)


# ---------------------------------------------------------------- converters of the wider model zoo and transformers
class ZooStructure(nn.Module):
    """Structural ops of Res2Net, ShuffleNet, Swin, ECA, FPN-style top-down paths, as their forwards spell them."""

    def forward(self, x):  # x: [N, 8, 6, 6]
        a, b = torch.chunk(x, 2, dim=1)
        c = x.chunk(3, dim=2)[2]  # uneven: 2, 2, 2 rows
        d = torch.movedim(x, 1, -1).reshape(x.shape[0], 36, 8)
        e0, e1, e2 = torch.tensor_split(x, 3, dim=3)
        u = torch.unbind(x[:, :3], dim=1)[1]
        r = torch.roll(x, shifts=(2, -1), dims=(2, 3))
        s = torch.select(x, 1, 5) + x.select(1, -1)
        up = F.interpolate(x, scale_factor=2, mode="nearest") + F.interpolate(x, size=(12, 12), mode="bilinear")
        ps = F.pixel_unshuffle(F.pixel_shuffle(x, 2), 2)
        ex = x.mean(1, keepdim=True).expand_as(x) + x[:, :1].repeat(1, 8, 1, 1)
        pad = F.pad(x, (1, 2, 0, 1), mode="reflect") + F.pad(x, (1, 2, 0, 1), mode="replicate")
        # sizes whose ratio float32 cannot hold (GhostNetV2 resizes its 3×3 gate to 7×7: 3 · (7 / 3) < 7 there)
        odd = (F.interpolate(F.avg_pool2d(x, 2), size=(7, 7), mode="nearest"),
               F.interpolate(F.avg_pool2d(x, 2), size=(7, 5), mode="bilinear"))
        return a * b, c, d, e0 + e1 - e2, u, r, s, up, ps, ex, pad, *odd


class ZooLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln, self.gn, self.conv1d = nn.LayerNorm(6), nn.GroupNorm(2, 8), nn.Conv1d(1, 1, 3, padding=1, bias=False)
        self.hs, self.pad = nn.Hardsigmoid(), nn.ConstantPad2d((1, 0, 2, 1), 0.5)
        with torch.no_grad():
            for p in [self.ln.weight, self.ln.bias, self.gn.weight, self.gn.bias]:
                p.uniform_(-1, 1)

    def forward(self, x):
        eca = self.conv1d(x.mean((2, 3)).unsqueeze(1)).squeeze(1)  # ECA's channel conv
        ln = self.ln(x) + F.layer_norm(x.permute(0, 2, 3, 1), (8,)).permute(0, 3, 1, 2)
        gn = self.gn(x) + F.group_norm(x, 4, eps=1e-3)
        att = torch.einsum("nchw,ndhw->ncd", x, x) + torch.baddbmm(x.flatten(2)[:, :, :8], x.flatten(2)[:, :, :8],
                                                                   x.flatten(2)[:, :, :8], beta=0.5, alpha=2.0)
        return self.hs(x * 3) * eca[:, :, None, None], ln, gn, att.softmax(-1), self.pad(x)


@pytest.mark.parametrize("module", [ZooStructure(), ZooLayers()], ids=lambda m: type(m).__name__)
def test_zoo_converters_match_pytorch_at_another_batch_size(module):
    check_module(module.eval(), (8, 6, 6))


def test_stochastic_depth_is_the_identity_in_eval_mode():
    torchvision_ops = pytest.importorskip("torchvision.ops")

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.sd = torchvision_ops.StochasticDepth(0.3, "row")

        def forward(self, x):
            return x + self.sd(x * 2) + torchvision_ops.stochastic_depth(x, 0.5, "row", training=False)

    check_module(Block().eval(), (3, 4, 4))


class ClassToken(nn.Module):
    """torchvision ViT's class token: a parameter expanded to the batch size read from the input, then
    concatenated with the tokens; the batch size comes from the input at run time, not the example's."""

    def __init__(self):
        super().__init__()
        self.class_token = nn.Parameter(torch.randn(1, 1, 6))

    def forward(self, x):  # x: [N, 4, 6]
        n = x.shape[0]
        return torch.cat([self.class_token.expand(n, -1, -1), x], dim=1) * 2


def test_class_token_expanded_to_the_batch_size():
    check_module(ClassToken().eval(), (4, 6))


class WindowAttention(nn.Module):
    """Swin's window partition and reverse (the batch and the windows share dim 0: B·windows), its q/k/v axis in
    front of them, and MaxViT's swapaxes."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(4, 12)

    def forward(self, x):  # x: [N, 4, 4, 4] (B, H, W, C), windows of 2×2
        b = x.shape[0]
        w = x.view(b, 2, 2, 2, 2, 4).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4, 4)  # [B·4, 4 tokens, C]
        q, k, v = self.qkv(w).reshape(-1, 4, 3, 2, 2).permute(2, 0, 3, 1, 4).unbind(0)  # [B·4, heads, tokens, d]
        a = torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v
        a = a.transpose(1, 2).reshape(-1, 2, 2, 2, 2, 4).permute(0, 1, 3, 2, 4, 5).reshape(b, 4, 4, 4)
        return a + torch.swapaxes(x, 1, 2) + x.swapdims(-1, -2)


def test_window_partition_keeps_the_batch_in_dim_0():
    check_module(WindowAttention().eval(), (4, 4, 4))


class HeadsFoldedBehindAConstantDim(nn.Module):
    """SAM's attention: qkv reshaped to [B, N, 3, heads, d], permuted to [3, B, heads, N, d] and reshaped to
    [3, B·heads, N, d], so the batch sits in dim 1 behind a constant 3. The ONNX Reshape must infer that dim, not
    write the example's B·heads."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(4, 12)

    def forward(self, x):  # x: [N, 4 tokens, 4]
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, 2).permute(2, 0, 3, 1, 4).reshape(3, b * 2, n, 2).unbind(0)
        a = torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v  # [B·heads, N, d]
        return a.view(b, 2, n, 2).permute(0, 2, 1, 3).reshape(b, n, 4) + x


def test_a_batch_behind_a_constant_dim_is_inferred_at_any_batch_size():
    check_module(HeadsFoldedBehindAConstantDim().eval(), (4, 4))


class WindowsAfterACpuTensor(nn.Module):
    """Windows in dim 0 (B·k entries) after tensors the forward makes on the CPU from traced sizes and moves with
    `.to(device=...)` (EdgeNeXt's position code): the batch probe, which runs on the meta device, must still see
    dim 0 at batch + 1, or the window reshape reads as moving the batch."""

    def forward(self, x):  # x: [N, 4, 6]
        n, c, w = x.shape
        # graphlrp's trace records x.device as the constant it was: "cpu"
        pos = torch.arange(w).to(device="cpu", dtype=x.dtype) / w
        mask = torch.zeros((n, w)).to(device=torch.device("cpu"), dtype=torch.bool)
        y = (x + pos).masked_fill(mask[:, None, :], 0.0)
        windows = y.reshape(n, c, 2, 3).permute(0, 2, 1, 3).reshape(n * 2, c, 3)
        return windows.reshape(n, 2, c, 3).sum(1)


def test_the_batch_probe_moves_tensors_made_on_the_cpu_to_the_meta_device():
    check_module(WindowsAfterACpuTensor().eval(), (4, 6))
