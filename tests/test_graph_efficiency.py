"""Regression guards for the explainer's cost, counted on the exported ONNX graph (no timing: CI machines are noisy).

The z⁺ rule needs the forward, a W⁺ forward and a transposed pass: about 3× the forward's multiply-accumulates is
the floor (see results/benchmark.md). These tests fail when a change adds work on top of that floor — a dropped
sign fact (a⁻ terms, |x| or a signed stabiliser on values known ≥ 0), an ε added in its own pass instead of in the
convolution's bias, a stride-1 ConvTranspose, a weight stored twice or not folded at load, a lost symbolic
batch size — and check that those rewrites keep the numbers.
"""
from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
import torchvision
from onnx import numpy_helper

import graphlrp
import graphlrp.rewrite as rewrite
from graphlrp import export, fx_to_onnx, optimize
from graphlrp.export import count_macs

SIZE = 64
PRESETS = ["otsuki2024", "epsilon-plus-flat"]


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


@pytest.fixture(scope="module")
def forward_onnx(resnet18):
    return export.forward_onnx(resnet18, torch.randn(1, 3, SIZE, SIZE))


@pytest.fixture(scope="module", params=PRESETS)
def explainer_onnx(request, resnet18, tmp_path_factory):
    explainer = graphlrp.compile(resnet18, torch.randn(1, 3, SIZE, SIZE), rules=request.param)
    path = tmp_path_factory.mktemp("exp") / f"{request.param}.onnx"
    explainer.export_onnx(path)
    return request.param, onnx.load(str(path))


def _producers(model):
    return {out: node for node in model.graph.node for out in node.output}


def _constants(model):
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def test_work_stays_near_three_forwards(explainer_onnx, forward_onnx):
    preset, model = explainer_onnx
    ratio = count_macs(model) / count_macs(forward_onnx)
    assert ratio <= 3.0, f"{preset}: the explainer does {ratio:.2f}x the forward's multiply-accumulates"


def test_transposed_convolutions_are_convolutions_where_stride_is_one(explainer_onnx, forward_onnx):
    preset, model = explainer_onnx
    counts = collections.Counter(n.op_type for n in model.graph.node)
    forward_convs = sum(n.op_type == "Conv" for n in forward_onnx.graph.node)
    strided = sum(any(a.name == "strides" and max(a.ints) > 1 for a in n.attribute)
                  for n in forward_onnx.graph.node if n.op_type == "Conv")
    for node in model.graph.node:
        if node.op_type == "ConvTranspose":
            strides = next((list(a.ints) for a in node.attribute if a.name == "strides"), [1, 1])
            assert max(strides) > 1, f"{preset}: stride-1 ConvTranspose {node.name} (emit a flipped-kernel Conv)"
    assert counts["ConvTranspose"] <= strided + 1  # + otsuki2024's 2x2 average pool standing in for max-pool
    assert counts["Conv"] + counts["ConvTranspose"] <= 3 * forward_convs


def test_each_weight_is_stored_once(explainer_onnx, forward_onnx):
    """W⁺, W⁻, the flipped kernels of transposed convolutions and transposed matrices are computed in the file from
    the stored weights (ops on initializers, which onnxruntime folds at session creation): the explainer stores
    about the forward's weights. What remains is genuinely other data: the first layer's z of the ones input (an
    activation-sized map) and a few scalars and vectors."""
    preset, model = explainer_onnx

    def weight_bytes(m):
        return sum(numpy_helper.to_array(i).nbytes for i in m.graph.initializer)

    ratio = weight_bytes(model) / weight_bytes(forward_onnx)
    assert ratio <= 1.15, f"{preset}: {ratio:.2f}x the weights"
    stored = {i.name for i in model.graph.initializer}
    derived = [n for n in model.graph.node if n.op_type in ("Relu", "Transpose", "Slice")
               and n.input[0] in stored and len(numpy_helper.to_array(
                   next(i for i in model.graph.initializer if i.name == n.input[0])).shape) == 4]
    assert derived, f"{preset}: no weight is derived from a stored one"


def test_onnxruntime_folds_the_derived_weights_when_it_loads_the_model(explainer_onnx, tmp_path):
    """The ops that derive rule weights from stored ones cost nothing per call: onnxruntime's constant folding
    (a basic-level optimisation, before its NCHWc layout) turns every op whose inputs are all initializers into
    an initializer when it creates the session."""
    import onnxruntime as ort

    preset, model = explainer_onnx
    path, optimized = tmp_path / "m.onnx", tmp_path / "m.opt.onnx"
    onnx.save(model, str(path))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    folded = onnx.load(str(optimized))
    constants = {i.name for i in folded.graph.initializer}
    left = [f"{n.op_type} {n.name}" for n in folded.graph.node
            if n.input and all(i in constants for i in n.input if i)]
    assert not left, f"{preset}: constant ops left after session creation: {left[:5]}"
    before = {i.name for i in model.graph.initializer}
    on_weights = [n for n in model.graph.node if n.input and all(i in before for i in n.input if i)]
    assert len(on_weights) > 10  # there was something to fold


def test_no_stabiliser_pass_after_a_convolution(explainer_onnx):
    """z + ε is folded into the bias of the z convolution, not a separate elementwise pass."""
    preset, model = explainer_onnx
    producers, constants = _producers(model), _constants(model)
    for node in model.graph.node:
        if node.op_type != "Add":
            continue
        for i, name in enumerate(node.input):
            other = node.input[1 - i]
            if producers.get(name) is not None and producers[name].op_type == "Conv" and other in constants \
                    and constants[other].size == 1:
                pytest.fail(f"{preset}: {node.name} adds a constant to convolution {producers[name].name}")


def test_ratio_split_is_a_few_elementwise_passes(resnet18, forward_onnx, tmp_path):
    """The ratio split at each of resnet18's 8 merges costs |h_m|, |h_s| (dropped where h_s is a ReLU output), two
    +δ, one +, one ÷, one × and one −: no where()/comparison passes (they cost as much as a convolution's worth of
    memory traffic on the large tensors at the merges)."""
    explainer = graphlrp.compile(resnet18, torch.randn(1, 3, SIZE, SIZE), rules="otsuki2024")
    path = tmp_path / "ratio.onnx"
    explainer.export_onnx(path, check=False)
    counts = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert counts["Where"] + counts["Greater"] + counts["Clip"] <= 2, counts  # the output's target selection only
    assert counts["Abs"] <= 8 + 3, counts  # |h_m| per merge + |h_s| at the 3 projection shortcuts
    assert counts["Sub"] <= 8, counts


def test_relevance_path_keeps_the_symbolic_batch_size(explainer_onnx):
    """ONNX shape inference carries `batch` through every convolution and elementwise op of the explainer. A new
    unknown size (what a reshape to -1 or an expand leaves behind) makes onnxruntime reorder both operands of each
    later x ⊙ c out of its blocked NCHWc layout, because it cannot prove their shapes equal (about 30 extra memory
    passes on ResNet-50)."""
    preset, model = explainer_onnx
    inferred = onnx.shape_inference.infer_shapes(model)
    batch = {v.name: v.type.tensor_type.shape.dim[0] for v in inferred.graph.value_info
             if v.type.tensor_type.shape.dim}
    checked, lost = 0, []
    for node in inferred.graph.node:
        if node.op_type in ("Conv", "ConvTranspose", "Mul", "Div", "Add", "Sub") and node.output[0] in batch:
            dim = batch[node.output[0]]
            if dim.dim_param != "batch" and dim.dim_value != 1:
                lost.append(f"{node.op_type} {node.name}")
            checked += 1
    assert checked > 100
    assert not lost, lost[:5]


def test_reshapes_copy_the_batch_size_and_may_not_move_it():
    """A reshape is written with target 0 (copy the input's size) in the batch entry, so shape inference keeps the
    symbolic batch; a batch-major regrouping (dim 0 holding k·B entries) writes -1 there and serves any batch size;
    a reshape that moves the batch out of dim 0 is an ExportError, not a file that only works at the example's
    batch size."""
    class Net(torch.nn.Module):
        def forward(self, x):
            return x.reshape(-1, 6, 2, 2) + 1, torch.flatten(x, 1)

    x = torch.randn(2, 3, 4, 2)
    gm = torch.fx.symbolic_trace(Net())
    model, outputs = fx_to_onnx.lower(gm, (x,), ["x"], ["a", "b"])
    reshapes = [n for n in model.graph.node if n.op_type == "Reshape"]
    targets = {i.name: numpy_helper.to_array(i).tolist() for i in model.graph.initializer}
    assert sorted(targets[n.input[1]] for n in reshapes) == [[0, 6, 2, 2], [0, 24]]
    inferred = onnx.shape_inference.infer_shapes(model)
    assert all(o.type.tensor_type.shape.dim[0].dim_param == "batch" for o in inferred.graph.output)
    import onnxruntime as ort

    x5 = torch.randn(5, 3, 4, 2)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x5.numpy()})
    for a, b in zip(got, Net()(x5)):
        assert np.array_equal(a, b.numpy())

    class Regroup(torch.nn.Module):  # batch-major regrouping: dim 0 holds 3·B rows (Swin's B·windows)
        def forward(self, x):
            return x.reshape(-1, 4) * 2

    model, _ = fx_to_onnx.lower(torch.fx.symbolic_trace(Regroup()), (torch.randn(2, 3, 4),), ["x"], ["y"])
    x5 = torch.randn(5, 3, 4)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x5.numpy()})
    assert np.array_equal(got[0], Regroup()(x5).numpy())

    class MoveBatch(torch.nn.Module):  # the batch ends up inside dim 1 (SAM's [3, B·heads, N, d]): that dim is -1
        def forward(self, x):
            return x.reshape(3, -1)

    model, _ = fx_to_onnx.lower(torch.fx.symbolic_trace(MoveBatch()), (torch.randn(2, 3, 4),), ["x"], ["y"])
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x5.numpy()})
    assert np.array_equal(got[0], MoveBatch()(x5).numpy())

    class FixedShape(torch.nn.Module):  # a shape written for the example's batch: no file can serve another
        def forward(self, x):
            return x.reshape(6, 4)

    with pytest.raises(graphlrp.ExportError, match="batch"):
        fx_to_onnx.lower(torch.fx.symbolic_trace(FixedShape()), (torch.randn(2, 3, 4),), ["x"], ["y"])


def test_no_sign_work_on_values_known_nonnegative(explainer_onnx):
    """No |x| of a ReLU output, and no signed stabiliser (x >= 0 ? x + ε : x - ε) on a z⁺ that is ≥ 0 by
    construction (non-negative input, weights and bias)."""
    preset, model = explainer_onnx
    producers, constants = _producers(model), _constants(model)
    nonneg_ops = {"Relu", "MaxPool", "Abs"}
    for node in model.graph.node:
        src = producers.get(node.input[0]) if node.input else None
        if node.op_type == "Abs" and src is not None and src.op_type in nonneg_ops:
            pytest.fail(f"{preset}: {node.name} takes |x| of {src.op_type} output")
        if node.op_type == "GreaterOrEqual" and src is not None and src.op_type == "Conv":
            data = producers.get(src.input[0])
            params = [constants.get(n) for n in src.input[1:] if n]
            if data is not None and data.op_type in nonneg_ops and all(p is not None and (p >= 0).all()
                                                                       for p in params):
                pytest.fail(f"{preset}: {node.name} tests the sign of z⁺ = {src.name}, which is ≥ 0")


@pytest.mark.parametrize("preset", PRESETS + ["otsuki2024-conserving"])
def test_graph_passes_keep_the_numbers(resnet18, preset, monkeypatch):
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([-1, 3])
    fast = graphlrp.compile(resnet18, x[:1], rules=preset)
    monkeypatch.setattr(rewrite, "optimize_in_place", lambda graph, owner, seeds=(): {})
    plain = graphlrp.compile(resnet18, x[:1], rules=preset)
    logits, rel = fast(x, target)
    logits0, rel0 = plain(x, target)
    assert torch.equal(logits, logits0)
    for i in range(len(x)):
        assert ((rel[i] - rel0[i]).abs().max() / rel0[i].abs().max()).item() <= 1e-5
    n_fast = sum(n.op == "call_function" for n in fast.graph_module.graph.nodes)
    n_plain = sum(n.op == "call_function" for n in plain.graph_module.graph.nodes)
    assert n_fast < n_plain
    for explainer in (fast, plain):  # the rewrite no longer lints its graph (seconds on a 100k-node one): here it is
        explainer.graph_module.graph.lint()


def test_dead_nodes_go_as_fx_would_drop_them():
    """graphlrp's dead-node pass removes exactly what fx's eliminate_dead_code removes, impure nodes kept."""
    import torch.fx as fx

    from graphlrp.graph import drop_dead_nodes

    def f(x, y):
        unused = torch.relu(x) * 2  # a dead chain
        y.add_(1)  # whatever fx decides about a method call nobody reads, the pass decides the same
        torch._assert(x.sum() > 0, "kept")  # a side effect: kept
        return x + 1

    graphs = [fx.symbolic_trace(f).graph for _ in range(2)]
    before = len(graphs[0].nodes)
    graphs[0].eliminate_dead_code()
    assert drop_dead_nodes(graphs[1]) == before - len(graphs[0].nodes) >= 2
    assert any(n.target is torch._assert for n in graphs[1].nodes)
    assert [(n.op, str(n.target)) for n in graphs[0].nodes] == [(n.op, str(n.target)) for n in graphs[1].nodes]
    graphs[1].lint()


class _Eager:
    def call(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)


@pytest.mark.parametrize("kernel,stride,padding,groups,size", [
    (3, 1, 1, 1, 9), (1, 1, 0, 1, 8), (3, 2, 1, 1, 9), (1, 2, 0, 1, 8), (7, 2, 3, 1, 17), (3, 1, 0, 2, 7),
    (5, 3, 2, 2, 11), (2, 1, 1, 1, 6)])
def test_conv_transpose_emission_is_the_adjoint(kernel, stride, padding, groups, size):
    g = torch.Generator().manual_seed(kernel * 31 + stride)
    x = torch.randn(2, 4, size, size, generator=g, requires_grad=True)
    for weight in (torch.randn(6, 4 // groups, kernel, kernel, generator=g),
                   torch.ones(6, 4 // groups, kernel, kernel)):  # equal output channels: the summed form
        y = F.conv2d(x, weight, None, stride, padding, 1, groups)
        s = torch.randn(y.shape, generator=g)
        expected = torch.autograd.grad(y, x, s)[0]
        got = optimize.conv_transpose(_Eager(), s, weight, (stride,) * 2, (padding,) * 2, (1, 1), groups,
                                      (size, size), tuple(y.shape[-2:]))
        assert got.shape == expected.shape
        assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-5


@pytest.mark.parametrize("preset", ["otsuki2024", "otsuki2024-conserving"])
def test_no_subnormal_floats_in_the_relevance_pass(resnet18, preset):
    """Subnormal floats (0 < |x| < 1.2e-38) make every op that touches them many times slower on x86 CPUs. The ratio
    split must give a zero term (an identity skip where the ReLU output is 0) exactly 0, not R·ε/Σ|h|: no value in
    the explainer's graph is subnormal."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, SIZE, SIZE)
    explainer = graphlrp.compile(resnet18, x[:1], rules=preset)
    tiny = torch.finfo(torch.float32).tiny
    subnormal = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                count = int(((out != 0) & (out.abs() < tiny)).sum())
                if count:
                    subnormal[n.name] = count
            return out

    with torch.no_grad():
        Recorder(explainer.graph_module).run(x, torch.tensor([-1, 3]))
    assert not subnormal, subnormal


def test_no_where_in_the_epsilon_stabiliser(explainer_onnx):
    """The signed stabiliser z + ε·sign(z) (sign(0) = +1) uses no `Where`: onnxruntime's Where with scalar
    branches is an unvectorised broadcast, several times an Add's cost on the same tensor. The only Where left is
    the output's target selection (on int64 class indices) and zeros_like's Where(true, 0, x)."""
    preset, model = explainer_onnx
    producers, constants = _producers(model), _constants(model)
    for node in model.graph.node:
        if node.op_type == "Where":
            cond = producers.get(node.input[0])
            branches = [constants.get(name) for name in node.input[1:]]
            signed_shift = cond is not None and cond.op_type in ("GreaterOrEqual", "Greater", "Less") and all(
                b is not None and b.size == 1 and b.dtype.kind == "f" for b in branches)
            assert not signed_shift, f"{preset}: {node.name} selects ±ε on the sign of {cond.input[0]}"


def test_merge_stabiliser_uses_the_relu_output(resnet18):
    """At resnet18's 8 merges epsilon-plus-flat's signed split divides R by stab(h); R is zero wherever relu(h)
    is (every rule above the ReLU hands back a product with it), so the stabiliser is relu(h) + ε, one Add on
    the ReLU output the forward holds: no comparison on the merges' tensors is left (the classifier's ε-rule on
    the logits keeps its one)."""
    explainer = graphlrp.compile(resnet18, torch.randn(1, 3, SIZE, SIZE), rules="epsilon-plus-flat")
    counts = collections.Counter(n.target for n in explainer.graph_module.graph.nodes if n.op == "call_function")
    assert counts[torch.ge] <= 1, counts[torch.ge]


def _stabiliser_module(h_of_x):
    class Net(torch.nn.Module):
        def forward(self, x, y):
            h = h_of_x(x)
            a = torch.relu(h)
            R = torch.mul(a, y) + torch.mul(y, a)  # zero wherever relu(h) is
            den = torch.add(h, torch.where(torch.ge(h, 0.0), 1e-6, -1e-6))
            return torch.div(R, den), torch.div(y, den)  # the second numerator is not zero where h <= 0

    return Net()


def test_relu_stabiliser_and_where_free_shift_are_exact():
    """The two rewrites of the signed stabiliser on hand-picked values: h exactly 0, -0, -ε, ±tiny, subnormal,
    large; against the where() form run eagerly (bit-identical for the Where-free shift; equal up to the sign of
    zero for relu(h) + ε, where the numerator is 0)."""
    h_values = torch.tensor([0.0, -0.0, -1e-6, 1e-6, 1e-40, -1e-40, 3.5, -2.25, 1e30, -1e30, 5e-7, -5e-7])

    net = _stabiliser_module(lambda x: x * 1.0)
    gm = torch.fx.symbolic_trace(net)
    fired = optimize.optimize_graph(gm)
    assert fired["relu_stabiliser"] == 1 and fired["where_free"] == 1, fired
    assert not any(n.target is torch.where for n in gm.graph.nodes if n.op == "call_function")
    y = torch.randn(len(h_values), generator=torch.Generator().manual_seed(0))
    got, got_plain = gm(h_values, y)
    want, want_plain = net(h_values, y)
    assert torch.equal(got_plain, want_plain)  # Where-free shift: the same bits
    assert torch.equal(got, want)  # == treats -0 and +0 alike
    assert torch.isfinite(got).all()


def test_relu_stabiliser_needs_a_numerator_that_vanishes_with_the_relu():
    class Net(torch.nn.Module):
        def forward(self, x, y):
            a = torch.relu(x)
            R = torch.mul(a, y) + y  # the + y term is not zero where relu(x) is
            return torch.div(R, torch.add(x, torch.where(torch.ge(x, 0.0), 1e-6, -1e-6)))

    gm = torch.fx.symbolic_trace(Net())
    fired = optimize.optimize_graph(gm)
    assert fired["relu_stabiliser"] == 0 and fired["where_free"] == 1, fired
    x = torch.tensor([0.0, -1.0, 2.0, -1e-6])
    y = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.equal(gm(x, y), Net()(x, y))


class TokenMLP(torch.nn.Module):
    """A transformer MLP on [B, N, C] tokens, pooled to logits."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = torch.nn.Linear(8, 24), torch.nn.Linear(24, 8), torch.nn.Linear(8, 5)

    def forward(self, x):
        return self.head((x + self.fc2(F.gelu(self.fc1(x)))).mean(1))


def test_compile_time_maps_of_a_token_linear_are_stored_once_not_once_per_token():
    """z⁺ with dead units spread (otsuki2024-conserving) divides by W⁺·1, the same at every token: a [24] vector,
    not a [1, N, 24] copy (SAM at 1024 px: 48 MB per layer in memory and in the file). The relevance is the one of
    the full-size map, which the rule computes in float64 here as the reference."""
    from graphlrp.rules.base import broadcast_compact

    t = torch.arange(6.0).reshape(1, 1, 6).expand(1, 40, 6)
    assert broadcast_compact(t).shape == (1, 1, 6) and torch.equal(broadcast_compact(t).expand_as(t), t)
    varied = torch.randn(1, 40, 6)
    assert broadcast_compact(varied).shape == varied.shape
    torch.manual_seed(0)
    model, x = TokenMLP().eval(), torch.randn(2, 40, 8)
    explainer = graphlrp.compile(model, x[:1], rules="otsuki2024-conserving")
    shapes = [tuple(b.shape) for name, b in explainer.graph_module.named_buffers() if name.startswith("_lrp")]
    assert not [s for s in shapes if len(s) == 3 and s[1] == 40], shapes
    _, relevance, taps = explainer.explain_with_taps(x)
    assert torch.allclose(taps["input"], taps["output"], rtol=1e-5)
    double = graphlrp.compile(model.double(), x[:1].double(), rules="otsuki2024-conserving", verify=False)
    assert torch.allclose(relevance.double(), double(x.double())[1], rtol=1e-4, atol=1e-6 * relevance.abs().max())


class Attention(torch.nn.Module):
    """Two blocks of softmax self-attention on [B, N, C] tokens, pooled to logits: [B, N, N] attention weights each."""

    def __init__(self, c=8):
        super().__init__()
        self.qkv = torch.nn.ModuleList([torch.nn.Linear(c, 3 * c) for _ in range(2)])
        self.proj = torch.nn.ModuleList([torch.nn.Linear(c, c) for _ in range(2)])
        self.head = torch.nn.Linear(c, 5)

    def forward(self, x):
        for qkv, proj in zip(self.qkv, self.proj):
            q, k, v = qkv(x).chunk(3, dim=-1)
            x = x + proj(torch.softmax(q @ k.transpose(-2, -1) * 0.35, dim=-1) @ v)
        return self.head(x.mean(1))


def _peak_live_bytes(gm, *args) -> int:
    """The largest total of tensor bytes alive at once when fx runs `gm` (values freed after their last use)."""
    class Live(torch.fx.Interpreter):
        peak = 0

        def run_node(self, n):
            out = super().run_node(n)
            values = [v for v in list(self.env.values()) + [out] if isinstance(v, torch.Tensor)]
            storages = {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes() for v in values}
            self.peak = max(self.peak, sum(storages.values()))
            return out

    live = Live(gm)
    with torch.no_grad():
        live.run(*args)
    return live.peak


@pytest.mark.parametrize("preset", ["cp-lrp-conserving", "otsuki2024-conserving", "attnlrp"])
def test_large_attention_weights_are_computed_again_for_the_relevance_pass_not_held(preset, monkeypatch, tmp_path):
    """Attention weights of at least RECOMPUTE_NUMEL elements per sample are recomputed from q and k where the
    relevance pass reads them (SAM's global attention at 1024 px: 0.8 GB per block and image held otherwise). The
    relevance is the same, the export too, and the peak of live tensors falls."""
    torch.manual_seed(0)
    model, x = Attention().eval(), torch.randn(2, 300, 8)
    held = graphlrp.compile(model, x[:1], rules=preset)
    monkeypatch.setattr(optimize, "RECOMPUTE_NUMEL", 300 * 300)
    recomputed = graphlrp.compile(model, x[:1], rules=preset)
    def softmaxes(explainer):
        return len([n for n in explainer.graph_module.graph.nodes if n.target is torch.softmax])

    assert softmaxes(recomputed) > softmaxes(held)  # the relevance pass's own copies
    target = torch.tensor([-1, 3])
    a, b = held(x, target), recomputed(x, target)
    assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1], rtol=1e-6, atol=1e-7 * a[1].abs().max())
    assert _peak_live_bytes(recomputed.graph_module, x, target) < _peak_live_bytes(held.graph_module, x, target)
    recomputed.export_onnx(tmp_path / "recomputed.onnx")  # its own onnxruntime parity check (raises if it fails)


class _ReadsSlices(torch.nn.Module):
    """Reads its input in disjoint slices: one per time step (x[:, t]) and two channel ranges with gaps around
    them (x[..., 1:3], x[..., 5:7] of 8)."""

    def __init__(self, steps=5):
        super().__init__()
        self.steps = steps
        self.step, self.channels, self.head = torch.nn.Linear(8, 6), torch.nn.Linear(4, 6), torch.nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.channels(torch.cat([x[..., 1:3], x[..., 5:7]], -1))).mean(1)
        for t in range(self.steps):
            h = h + torch.relu(self.step(x[:, t]))
        return self.head(h)


class _BiLSTM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm, self.head = torch.nn.LSTM(4, 5, batch_first=True, bidirectional=True), torch.nn.Linear(10, 3)

    def forward(self, x):
        return self.head(self.lstm(x)[0].mean(1))


@pytest.mark.parametrize("model", [_ReadsSlices(), _BiLSTM()], ids=["slices", "bidirectional-lstm"])
def test_relevance_of_disjoint_slices_is_one_concatenation_not_a_sum_of_padded_copies(model, monkeypatch):
    """Relevance coming back from slices of one dimension is joined by one cat (a padded full-size copy per slice,
    summed one by one, made an unrolled LSTM's input relevance quadratic in its length), with the same values."""
    torch.manual_seed(0)
    model.eval()
    x = torch.randn(2, 5, 8 if isinstance(model, _ReadsSlices) else 4)
    joined = graphlrp.compile(model, x[:1], rules="otsuki2024-conserving")
    monkeypatch.setattr(rewrite, "gather_padded_slices", lambda em, parts, shape: parts)
    summed = graphlrp.compile(model, x[:1], rules="otsuki2024-conserving")

    def count(explainer, target):
        return sum(n.op == "call_function" and n.target is target for n in explainer.graph_module.graph.nodes)

    assert count(summed, F.pad) >= 5 and count(joined, F.pad) <= 2  # the channel gaps need a pad each, at most
    assert count(joined, torch.add) <= count(summed, torch.add) - 4
    logits, rel = joined(x)
    logits0, rel0 = summed(x)
    assert torch.equal(logits, logits0)
    assert torch.equal(rel, rel0)  # each element is one slice's value plus exact zeros (two for both directions)
    assert rel.abs().sum() > 0
