"""Converters added for the export of the wider zoo: each checked directly against PyTorch (fx-traced module lowered
at batch 2, run in onnxruntime at another batch size) and, where it is an op graphlrp compiles, through a whole
explainer (graphlrp.compile + export_onnx, whose own onnxruntime parity check is 1e-4)."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import graphlrp
from graphlrp import fx_to_onnx
from graphlrp.errors import ExportError

from test_fx_to_onnx import check_module, run_onnx


class OnePieceSplits(nn.Module):
    """A split into one piece (DenseNet's relevance pass through the first block's one-input concat): the
    converter's output is still a sequence of one."""

    def forward(self, x):  # x: [N, 4, 6]
        (a,) = torch.split(x, [4], 1)
        (b,) = x.split(4, dim=1)
        (c,) = torch.chunk(x, 1, 2)
        (d,) = torch.tensor_split(x, 1, 2)
        return a + b * 2 + c + d, torch.split(x, [4], 1)[0] - 1


def test_a_one_piece_split_stays_a_sequence():
    model = check_module(OnePieceSplits().eval(), (4, 6))
    assert any(n.op_type == "Split" for n in model.graph.node)


def test_a_converter_returning_one_name_for_a_sequence_is_an_export_error(monkeypatch):
    class Two(nn.Module):
        def forward(self, x):
            return torch.split(x, [2, 2], 1)[1] * 2

    monkeypatch.setitem(fx_to_onnx.CONVERTERS, torch.split, lambda g, x, *a, **k: g.op("Identity", [x]))
    with pytest.raises(ExportError, match="converter returned one str for a result of 2"):
        fx_to_onnx.lower(fx.symbolic_trace(Two()), (torch.randn(2, 4),), ["x"], ["y"])


def test_densenet_style_concat_of_one_exports(tmp_path):
    """DenseNet's first dense layer concatenates a list of one tensor; its relevance pass splits into one piece."""

    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv0 = nn.Conv2d(3, 4, 3, padding=1)
            self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            x = F.relu(self.conv0(x))
            features = [x]
            y = F.relu(self.conv1(torch.cat(features, 1)))
            return self.fc(torch.cat([x, y], 1).mean((2, 3)))

    torch.manual_seed(0)
    explainer = graphlrp.compile(Dense().eval(), torch.randn(1, 3, 8, 8))
    report = explainer.export_onnx(tmp_path / "dense.onnx")
    assert report.max_rel_diff <= 1e-4



# ---------------------------------------------------------------- pooling: every keyword of F.avg_pool2d
class AvgPoolSpellings(nn.Module):
    """Inception's `F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)`, the other keywords, and ceil_mode
    windows that PyTorch drops because they would start in the end padding (ONNX's shape rule keeps them)."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AvgPool2d(2, 2, 1, ceil_mode=True)

    def forward(self, x):  # x: [N, 3, 7, 8]
        return (F.avg_pool2d(x, kernel_size=3, stride=1, padding=1),
                F.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False),
                F.avg_pool2d(input=x, kernel_size=(2, 3), stride=(2, 1), padding=(1, 0), ceil_mode=True,
                             count_include_pad=True, divisor_override=None),
                F.avg_pool2d(x, 2, 2, 1, True, True),  # 7 + 2 → ONNX 5 rows, PyTorch 4
                self.pool(x),
                F.max_pool2d(x, 2, 2, 1, ceil_mode=True),
                F.max_pool2d(x, 2, 2, 1, ceil_mode=True, return_indices=True)[1])


def test_avg_pool_keywords_and_ceil_mode_match_pytorch():
    check_module(AvgPoolSpellings().eval(), (3, 7, 8))


def test_avg_pool_with_divisor_override_is_refused_clearly():
    class Divisor(nn.Module):
        def forward(self, x):
            return F.avg_pool2d(x, 2, divisor_override=3)

    with pytest.raises(ExportError, match="divisor_override=3"):
        fx_to_onnx.lower(fx.symbolic_trace(Divisor()), (torch.randn(2, 3, 4, 4),), ["x"], ["y"])


def test_inception_style_avg_pool_branch_exports(tmp_path):
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.fc = nn.Linear(4, 5)

        def forward(self, x):
            x = F.relu(self.conv(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)))
            return self.fc(F.adaptive_avg_pool2d(x, (1, 1)).flatten(1))

    torch.manual_seed(0)
    explainer = graphlrp.compile(Branch().eval(), torch.randn(1, 3, 9, 9))
    assert explainer.export_onnx(tmp_path / "branch.onnx").max_rel_diff <= 1e-4


# ---------------------------------------------------------------- F.normalize (Swin-V2's cosine attention)
class Normalize(nn.Module):
    def forward(self, x):  # x: [N, 4, 6, 5]
        return (F.normalize(x, dim=-1), F.normalize(x, p=2.0, dim=1, eps=1e-3), F.normalize(x, 1, 2),
                F.normalize(x, p=3, dim=-1), F.normalize(x, p=0.5, dim=1), F.normalize(x, p=float("inf"), dim=3),
                F.normalize(x, p=float("-inf"), dim=3), F.normalize(x * (x > 0), p=0, dim=1),
                F.normalize(x * 1e-9, dim=-1))  # below eps: x / eps


def test_normalize_matches_pytorch():
    check_module(Normalize().eval(), (4, 6, 5))


class Reductions(nn.Module):
    """Keepdim statistics that normalisers compute in the forward (GRN's ‖x‖, a std or var), every spelling."""

    def forward(self, x):  # x: [N, 4, 6, 5]
        return (x.norm(p=2, dim=(2, 3), keepdim=True), torch.norm(x, 1, (2, 3), True), x.norm(dim=1),
                x.norm(p=float("inf"), dim=-1), x.norm(p=3, dim=(1, 2)), torch.linalg.vector_norm(x, 2, dim=-1),
                torch.linalg.vector_norm(x, float("-inf"), dim=(2, 3), keepdim=True),
                x.std((2, 3), keepdim=True), x.std(dim=1, unbiased=False), torch.std(x, -1, correction=0),
                torch.var(x, (1,), correction=2, keepdim=True), x.var(1, True, True), x.var(dim=(1, 2, 3)))


def test_norm_std_and_var_match_pytorch():
    check_module(Reductions().eval(), (4, 6, 5))


def test_every_reduction_the_describers_recognise_by_name_has_a_converter():
    """`ops.elementwise.is_reduction` recognises normalisers (GRN) by these names; the forward part of an explainer
    computes them, so each spelling, method and torch function, must export."""
    from graphlrp.ops.elementwise import REDUCTIONS

    for name in sorted(REDUCTIONS):
        if hasattr(torch.Tensor, name):
            assert fx_to_onnx.has_converter("method", name), f"Tensor.{name}"
        fn = getattr(torch, name, None) or getattr(torch.linalg, name, None)
        assert fn is not None and fx_to_onnx.has_converter("function", fn), f"torch.{name}"


def test_swin_v2_style_cosine_attention_exports(tmp_path):
    class Cosine(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, 8, 4, stride=4)
            self.qkv, self.proj, self.head = nn.Linear(8, 24), nn.Linear(8, 8), nn.Linear(8, 5)
            self.logit_scale = nn.Parameter(torch.log(10 * torch.ones(1, 1, 1)))

        def forward(self, x):  # x: [N, 3, 8, 8] -> 4 tokens of 8
            x = self.embed(x).flatten(2).transpose(1, 2)
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
            attn = torch.softmax(attn * torch.clamp(self.logit_scale, max=4.6).exp(), dim=-1)
            return self.head(self.proj(attn @ v).mean(1))

    torch.manual_seed(0)
    explainer = graphlrp.compile(Cosine().eval(), torch.randn(1, 3, 8, 8))
    assert explainer.export_onnx(tmp_path / "cosine.onnx").max_rel_diff <= 1e-4


# ---------------------------------------------------------------- activations, dropouts, norms of every describer
class MoreActivations(nn.Module):
    """Each module and functional spelling the describers accept that had no converter (x: [N, 4, 6, 5])."""

    def __init__(self):
        super().__init__()
        self.mods = nn.ModuleList([
            nn.PReLU(), nn.PReLU(4, init=0.1), nn.SELU(), nn.CELU(), nn.CELU(0.5), nn.Softsign(), nn.Threshold(0.1, -2.0),
            nn.AlphaDropout(0.3), nn.FeatureAlphaDropout(0.2), nn.RReLU(0.1, 0.3),
            nn.Softshrink(0.3), nn.Hardshrink(0.4), nn.Tanhshrink(), nn.LogSigmoid()])
        with torch.no_grad():
            self.mods[1].weight.uniform_(-1, 1)
        self.slope = nn.Parameter(torch.tensor([0.1, -0.2, 0.3, 0.4]))
        self.drop1d, self.drop3d = nn.Dropout1d(), nn.Dropout3d()

    def forward(self, x):
        y = x * 3
        out = [m(y) for m in self.mods] + [self.drop1d(y.flatten(2)), self.drop3d(y.unsqueeze(2))]
        out += [F.prelu(y, self.slope), torch.prelu(y, self.slope[:1]), F.selu(y), torch.selu(y), F.celu(y, 2.0),
                torch.celu(y), F.softsign(y), F.threshold(y, 0.5, 7.0), torch.threshold(y, -0.5, 0.0),
                F.alpha_dropout(y, 0.5, False), F.feature_alpha_dropout(y, 0.1, training=False),
                F.dropout1d(y.flatten(2), 0.5, False), F.dropout2d(y, 0.5, False), F.dropout3d(y.unsqueeze(2), training=False),
                torch.dropout(y, 0.3, False), F.rrelu(y), torch.rrelu(y, 0.2, 0.4), F.softshrink(y, 0.2),
                F.hardshrink(y), torch.hardshrink(y, 0.6), F.tanhshrink(y), F.logsigmoid(y * 30), F.sigmoid(y),
                F.tanh(y), torch.fmax(y, torch.tensor(0.2)), torch.fmin(y, torch.tensor(-0.1)), y.maximum(x),
                y.minimum(x), torch.clamp_min(y, 0.1), torch.clamp_max(y, 0.3), y.clamp_min(-0.2),
                y.clamp_max(x), torch.true_divide(y, 3), y.true_divide(x.abs() + 1), torch.addcmul(x, y, x, value=0.5),
                x.addcmul(y, y)]
        return tuple(out)


class MoreNorms(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.bn3 = nn.BatchNorm3d(4)
        self.bn3.running_mean.uniform_(-1, 1, generator=g)
        self.bn3.running_var.uniform_(0.5, 2, generator=g)
        self.inorm, self.inorm_affine = nn.InstanceNorm2d(4), nn.InstanceNorm2d(4, affine=True)
        self.inorm_running = nn.InstanceNorm2d(4, track_running_stats=True)
        self.inorm_running.running_mean.uniform_(-1, 1, generator=g)
        self.inorm_running.running_var.uniform_(0.5, 2, generator=g)
        self.lrn = nn.LocalResponseNorm(3, alpha=1e-2, beta=0.7, k=2.0)
        self.rms = nn.RMSNorm([5], eps=1e-5) if hasattr(nn, "RMSNorm") else nn.Identity()
        with torch.no_grad():
            self.inorm_affine.weight.uniform_(-1, 1, generator=g)
            self.inorm_affine.bias.uniform_(-1, 1, generator=g)
            if hasattr(nn, "RMSNorm"):
                self.rms.weight.uniform_(-1, 1, generator=g)
        self.w = nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, x):  # x: [N, 4, 6, 5]
        out = [self.bn3(x.unsqueeze(2)), self.inorm(x), self.inorm_affine(x), self.inorm_running(x), self.lrn(x),
               self.rms(x), F.instance_norm(x, weight=self.w, eps=1e-3),
               torch.instance_norm(x, None, None, None, None, True, 0.1, 1e-5, False),
               F.local_response_norm(x, 5, k=1.5)]
        if hasattr(F, "rms_norm"):
            out += [F.rms_norm(x, (6, 5)), F.rms_norm(x.transpose(1, 3), (4,), self.w, 1e-3)]
        return tuple(out)


@pytest.mark.parametrize("module", [MoreActivations(), MoreNorms()], ids=lambda m: type(m).__name__)
def test_describer_ops_match_pytorch_at_another_batch_size(module):
    check_module(module.eval(), (4, 6, 5))


class Functional(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


_SLOPE = torch.tensor([0.1, -0.2, 0.3, 0.4])
EXPLAINED_OPS = {
    "PReLU": lambda: nn.PReLU(4, init=0.2), "SELU": nn.SELU, "CELU": lambda: nn.CELU(0.7), "Softsign": nn.Softsign,
    "Threshold": lambda: nn.Threshold(0.1, -1.0), "AlphaDropout": lambda: nn.AlphaDropout(0.3),
    "F.prelu": lambda: Functional(lambda x: F.prelu(x, _SLOPE)), "F.selu": lambda: Functional(F.selu),
    "F.celu": lambda: Functional(lambda x: F.celu(x, 2.0)), "F.softsign": lambda: Functional(F.softsign),
    "F.threshold": lambda: Functional(lambda x: F.threshold(x, 0.2, 0.0)),
    "F.alpha_dropout": lambda: Functional(lambda x: F.alpha_dropout(x, 0.5, False)),
    "torch.fmax": lambda: Functional(lambda x: torch.fmax(x, torch.tensor(0.05))),
    "RReLU": lambda: nn.RReLU(0.1, 0.3), "Softshrink": nn.Softshrink, "Hardshrink": lambda: nn.Hardshrink(0.1),
    "Tanhshrink": nn.Tanhshrink, "LogSigmoid": nn.LogSigmoid, "FeatureAlphaDropout": nn.FeatureAlphaDropout,
    "InstanceNorm2d": lambda: nn.InstanceNorm2d(4, affine=True), "LocalResponseNorm": lambda: nn.LocalResponseNorm(3),
    "F.normalize": lambda: Functional(lambda x: F.normalize(x, dim=1)),
}


@pytest.mark.parametrize("name", list(EXPLAINED_OPS))
def test_an_explainer_with_the_op_exports_with_parity(name, tmp_path):
    """conv → op → conv → mean → linear, compiled by graphlrp and exported (export_onnx checks onnxruntime against
    the PyTorch explainer to 1e-4 itself)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), EXPLAINED_OPS[name](), nn.Conv2d(4, 6, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)).eval()
    explainer = graphlrp.compile(model, torch.randn(1, 3, 8, 8), allow_vanishing=True)  # random: z+ may lose R
    report = explainer.export_onnx(tmp_path / "op.onnx")
    assert report.max_rel_diff <= 1e-4 and not report.zero_relevance


# ---------------------------------------------------------------- converters follow the operand's dtype
class Float64Ops(nn.Module):
    """The catch-all converters that wrote float32 constants whatever the operand (baddbmm's alpha/beta, hardtanh's
    bounds, batch norm's default affine part)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)
        self.hardtanh = nn.Hardtanh(-0.5, 0.3)

    def forward(self, x):  # x: [N, 4, 6]
        att = torch.baddbmm(x[:, :, :4], x, x.transpose(1, 2)[:, :, :4], beta=0.5, alpha=2.0)
        return (att, self.hardtanh(x), F.hardtanh(x, -2.0, 0.25),
                F.batch_norm(x, self.mean, self.var, None, None, False, 0.1, 1e-3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_catch_all_converters_follow_the_input_dtype(dtype):
    import onnx

    gm = fx.symbolic_trace(Float64Ops().eval()).to(dtype)
    example = torch.randn(2, 4, 6, dtype=dtype)
    model, _ = fx_to_onnx.lower(gm, (example,), ["x"], [f"y{i}" for i in range(4)])
    want = onnx.TensorProto.DOUBLE if dtype == torch.float64 else onnx.TensorProto.FLOAT
    assert all(o.type.tensor_type.elem_type == want for o in model.graph.output)
    x = torch.randn(3, 4, 6, dtype=dtype)
    with torch.no_grad():
        expected = gm(x)
    for got, exp in zip(run_onnx(model, {"x": x}), expected):
        assert got.dtype == exp.numpy().dtype
        assert abs(got - exp.numpy()).max() <= 1e-5 * abs(exp.numpy()).max()


# ---------------------------------------------------------------- spellings met in timm's model modules
class TimmSpellings(nn.Module):
    """PNASNet's ZeroPad2d((-1, 1, -1, 1)) shift (a crop and a pad in one), TResNet's blur pool
    `F.conv2d(x, filt, stride=2, groups=C)` with no bias argument, GCViT's `repeat_interleave` over the batch dim,
    BEiT's `F.linear(input=x, weight=w, bias=cat(...))` all by keyword, CSATv2's `x[:, :, self.permutation]`."""

    def __init__(self):
        super().__init__()
        self.shift = nn.ZeroPad2d((-1, 1, -1, 1))
        self.crop = nn.ZeroPad2d((-1, 0, 0, -2))
        self.register_buffer("filt", torch.rand(4, 1, 3, 3))
        self.register_buffer("permutation", torch.tensor([5, 0, 2, 1, 3, 4]))

    def forward(self, x):  # x: [N, 4, 6, 5]
        return (self.shift(x), self.crop(x), F.pad(x, (1, -1, -2, 1)),
                F.conv2d(x, self.filt, stride=2, groups=4), torch.conv2d(x, self.filt, None, 1, 1, 1, 4),
                x.repeat_interleave(1, dim=0), x.repeat_interleave(3, dim=1), torch.repeat_interleave(x, 2, dim=-1),
                x.repeat_interleave(2, 0), F.linear(input=x, weight=self.filt.reshape(4, 9)[:, :5],
                                                    bias=torch.cat((self.filt[0, 0, 0], self.filt[1, 0, 0, :1]))),
                F.conv2d(input=x, weight=self.filt, groups=4), x[:, :, self.permutation],
                x[..., torch.tensor([4, 4, 0])])


def test_timm_spellings_match_pytorch_at_another_batch_size():
    check_module(TimmSpellings().eval(), (4, 6, 5))


class Patches(nn.Module):
    """VOLO's outlook attention: nn.Unfold / F.unfold into patches and F.fold / nn.Fold summing them back."""

    def __init__(self):
        super().__init__()
        self.unfold = nn.Unfold(3, padding=1, stride=2)
        self.fold = nn.Fold((6, 5), 2, stride=1)

    def forward(self, x):  # x: [N, 4, 6, 5]
        u = self.unfold(x)  # [N, 36, 3·3]
        v = F.unfold(x, (2, 3), dilation=(1, 2), padding=(1, 0))
        return (u, v, F.fold(u, (6, 5), 3, padding=1, stride=2), self.fold(F.unfold(x, 2)),
                F.fold(v, output_size=(6, 5), kernel_size=(2, 3), dilation=(1, 2), padding=(1, 0)))


def test_unfold_and_fold_match_pytorch_at_another_batch_size():
    check_module(Patches().eval(), (4, 6, 5))
