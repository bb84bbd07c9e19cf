"""ONNX export: the contract (names, dynamic batch, metadata), onnx.checker, and onnxruntime parity with the
PyTorch explainer on mixed targets; and `graphlrp compile` / `inspect` end to end, offline."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
import torch.nn as nn
import torchvision

import graphlrp
from graphlrp.export import rel_diff

TOL = 1e-4


def session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module", params=[("resnet18", 224), ("resnet50", 160)], ids=lambda p: p[0])
def exported(request, tmp_path_factory):
    arch, size = request.param
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)().eval()
    explainer = graphlrp.compile(model, torch.randn(1, 3, size, size), model_name=arch)
    path = tmp_path_factory.mktemp("onnx") / f"{arch}.onnx"
    report = explainer.export_onnx(path, metadata={"labels": [f"c{i}" for i in range(1000)]})
    return arch, size, explainer, path, report


def test_contract_and_checker(exported):
    arch, size, explainer, path, report = exported
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["input", "target"]
    assert [o.name for o in model.graph.output] == ["logits", "relevance"]
    types = {i.name: i.type.tensor_type.elem_type for i in list(model.graph.input) + list(model.graph.output)}
    assert types == {"input": onnx.TensorProto.FLOAT, "target": onnx.TensorProto.INT64,
                     "logits": onnx.TensorProto.FLOAT, "relevance": onnx.TensorProto.FLOAT}
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["preset"] == "otsuki2024" and meta["split"] == "ratio" and meta["include_identity"] == "true"
    assert json.loads(meta["input_size"]) == [3, size, size] and meta["source_model"] == arch
    assert json.loads(meta["labels"])[:2] == ["c0", "c1"] and meta["graphlrp_version"] == graphlrp.__version__
    assert {"mean", "std", "crop"} <= set(json.loads(meta["preprocessing"]))
    assert report.max_rel_diff <= TOL


@pytest.mark.parametrize("batch", [1, 5])
def test_onnxruntime_matches_pytorch_with_mixed_targets(exported, batch):
    arch, size, explainer, path, _ = exported
    x = torch.randn(batch, 3, size, size)
    target = torch.tensor([-1, 7, -1, 999, 0][:batch])
    logits_rt, relevance_rt = session(path).run(None, {"input": x.numpy(), "target": target.numpy()})
    logits_pt, relevance_pt = explainer(x, target)
    assert relevance_rt.shape == (batch, 3, size, size)
    assert rel_diff(logits_rt, logits_pt.numpy()) <= TOL
    for i in range(batch):
        assert rel_diff(relevance_rt[i], relevance_pt[i].numpy()) <= TOL, f"{arch} sample {i}"
    # -1 means the sample's own top-1: same as passing that class explicitly
    top1 = torch.as_tensor(logits_rt.argmax(-1))
    _, explicit = explainer(x, torch.where(target < 0, top1, target))
    assert rel_diff(relevance_rt, explicit.numpy()) <= TOL


def test_parity_failure_is_loud(tmp_path, monkeypatch):
    import graphlrp.export as export

    torch.manual_seed(0)
    explainer = graphlrp.compile(torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64))
    monkeypatch.setattr(export, "PARITY_TOLERANCE", 0.0)
    monkeypatch.setattr(export, "CONDITIONING_MARGIN", 0.0)  # no allowance for float32 rounding either
    with pytest.raises(graphlrp.ExportError, match="onnxruntime disagrees"):
        explainer.export_onnx(tmp_path / "r18.onnx")


@pytest.mark.parametrize("breakage", ["unknown-op", "shapes-do-not-fit"])
def test_an_invalid_file_is_an_export_error_and_nothing_is_written(breakage, tmp_path, monkeypatch):
    """An ONNX graph graphlrp lowered wrongly (an op the spec does not know, or shapes that do not fit: GhostNetV2's
    resize once came out one pixel short) is graphlrp's bug, said as an ExportError, never onnx's own exception."""
    import graphlrp.export as export

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    explainer = graphlrp.compile(model.eval(), torch.randn(1, 3, 8, 8))
    lower = export._lower

    def broken(*args):
        proto, expected = lower(*args)
        if breakage == "unknown-op":
            proto.graph.node.append(onnx.helper.make_node("NoSuchOp", ["relevance"], ["extra"]))
        else:  # [N, 3, 8, 8] times [5]: no broadcast fits
            proto.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(5, np.float32), "five"))
            proto.graph.node.append(onnx.helper.make_node("Mul", ["relevance", "five"], ["extra"]))
        return proto, expected

    monkeypatch.setattr(export, "_lower", broken)
    with pytest.raises(graphlrp.ExportError, match="is invalid"):
        explainer.export_onnx(tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


def graphlrp_cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "graphlrp.cli", *args], capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_cli_compile_with_a_local_state_dict_and_offline(tmp_path):
    torch.manual_seed(1)
    model = torchvision.models.resnet18().eval()
    weights = tmp_path / "r18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, weights)  # wrapped
    out = tmp_path / "r18.onnx"
    proc = graphlrp_cli("compile", "resnet18", "--weights", str(weights), "-o", str(out), "--input-size", "96")
    assert "8 found" in proc.stdout and "parity" in proc.stdout and out.exists()
    x = torch.randn(2, 3, 96, 96)
    logits, _ = session(out).run(None, {"input": x.numpy(), "target": np.array([-1, -1])})
    with torch.no_grad():
        assert rel_diff(logits, model(x).numpy()) < 1e-4  # the file's weights are the state dict's
    proc = graphlrp_cli("compile", "resnet18", "--weights", "none", "--rules", "otsuki2024-conserving",
                        "--split", "symmetric", "--no-identity", "--input-size", "64", "-o", str(tmp_path / "r.onnx"))
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "r.onnx")).metadata_props}
    assert (meta["preset"], meta["split"], meta["include_identity"]) == ("otsuki2024-conserving", "symmetric", "false")


@pytest.mark.parametrize("args, message", [
    (["compile", "no_such_model", "-o", "x.onnx"], "unknown model"),
    (["compile", "resnet18", "--weights", "/nonexistent.pt", "-o", "x.onnx"], "weights file not found"),
    (["compile", "resnet18", "--weights", "none", "--rules", "nope", "-o", "x.onnx"], "unknown preset"),
    (["compile", "resnet18", "--weights", "none", "--input-size", "abc", "-o", "x.onnx"], "--input-size"),
])
def test_cli_errors_are_clear(args, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "graphlrp.cli", *args], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("spec, message", [
    ("resnet50d", "timm has it: timm:resnet50d"),  # a timm model typed without its prefix
    ("timm:resnet5", "Did you mean one of: timm:resnet50"),  # a misspelt timm name
])
def test_an_unknown_model_name_is_answered_with_the_name_that_works(spec, message, tmp_path):
    pytest.importorskip("timm")
    proc = subprocess.run([sys.executable, "-m", "graphlrp.cli", "compile", spec, "-o", "x.onnx"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.onnx").exists()


def test_weights_that_do_not_load_say_why_in_a_line(tmp_path):
    """A pickled whole model, another class count, another architecture and a file that is no weights file: each a
    WeightsError that says what is wrong in a line, never torch's page of keys or its unpickler's advice."""
    from graphlrp.errors import WeightsError
    from graphlrp.models import load_state_dict_into

    model = torchvision.models.resnet18()
    cases = {
        "whole.pt": (lambda f: torch.save(model, f),
                     ["pickled Python objects (torchvision.models.resnet.ResNet", "torch.save(model.state_dict()"]),
        "classes.pt": (lambda f: torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), f),
                       ["2 shapes differ (fc.bias: file [10], model [1000]; fc.weight: file [10, 512], model [1000, 512])"]),
        "resnet34.pt": (lambda f: torch.save(torchvision.models.resnet34().state_dict(), f),
                        ["96 tensors in the file are not in the model (layer1.2.bn1.bias", "… 93 more)"]),
        "notes.pt": (lambda f: f.write_text("not weights"), ["could not read weights from", "torch.save"]),
    }
    for name, (write, said) in cases.items():
        write(tmp_path / name)
        with pytest.raises(WeightsError) as caught:
            load_state_dict_into(torchvision.models.resnet18(), tmp_path / name)
        message = str(caught.value)
        assert all(part in message for part in said), message
        assert "\n" not in message and "\x1b" not in message and len(message) < 600, message
    # what torch itself loads still loads: BN counts that a plain dict (or a .safetensors file) often leaves out
    plain = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(plain, tmp_path / "no_counts.pt")
    load_state_dict_into(torchvision.models.resnet18(), tmp_path / "no_counts.pt")


def test_cli_inspect_needs_no_weights():
    proc = graphlrp_cli("inspect", "resnet50", "--input-size", "64")
    assert "16 merges: 12 identity, 4 projection, 0 other" in proc.stdout


def test_a_one_percent_relevance_error_fails_although_the_float64_fallback_is_consulted(tmp_path):
    """A well-conditioned explainer (ResNet-18): an onnxruntime relevance 1e-2 off fails, although the logits agree
    and the float64 fallback is consulted: the error float32 rounding causes on it is far smaller."""
    import graphlrp.export as export

    torch.manual_seed(0)
    explainer = graphlrp.compile(torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64))
    x, target = export._parity_batch(explainer)
    with torch.no_grad():
        logits, relevance = explainer(x, target)

    class Off:  # a runtime whose relevance is off by 1% of its maximum
        def run(self, names, feeds):
            noise = 1e-2 * relevance.abs().max() * torch.sign(torch.randn_like(relevance))
            return [logits.numpy(), (relevance + noise).numpy()]

    report = export.ExportReport(str(tmp_path / "x.onnx"), 0.0, 0.0, 0, 17)
    with pytest.raises(graphlrp.ExportError, match="against a float64 run"):
        export.check_parity(explainer, Off(), report, x, target, (logits, relevance))
    assert report.float32_error_pytorch < 1e-4 < report.float32_error_onnxruntime
    assert report.float32_error_expected < 1e-5


def test_a_one_percent_logits_error_fails(tmp_path):
    """The same for the logits: 1e-2 off on a well-conditioned forward fails, the relevance being exact."""
    import graphlrp.export as export

    torch.manual_seed(0)
    explainer = graphlrp.compile(torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64))
    x, target = export._parity_batch(explainer)
    with torch.no_grad():
        logits, relevance = explainer(x, target)

    class Off:
        def run(self, names, feeds):
            return [(logits + 1e-2 * logits.abs().max() * torch.sign(torch.randn_like(logits))).numpy(),
                    relevance.numpy()]

    report = export.ExportReport(str(tmp_path / "x.onnx"), 0.0, 0.0, 0, 17)
    with pytest.raises(graphlrp.ExportError, match="onnxruntime logits 1"):
        export.check_parity(explainer, Off(), report, x, target, (logits, relevance))
    assert report.float32_error_logits_expected < 1e-5


class _CancellingHead(nn.Module):
    """An ill-conditioned forward: two identical copies u of a feature reach a logit with weights M and −M(1 + δ),
    so the logit −Mδu is 1e-4 of the terms it is the difference of, and float32 rounding of those terms is ~1e-3
    of it in any runtime."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 6), nn.Linear(6, 3)
        with torch.no_grad():
            self.fc1.weight[3:] = self.fc1.weight[:3]
            self.fc1.bias[3:] = self.fc1.bias[:3]
            self.fc2.weight[:, 3:] = -self.fc2.weight[:, :3] * (1 + 1e-4)
            self.fc2.bias.zero_()

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _ill_conditioned_case():
    """The cancelling head's explainer, a batch, PyTorch's float32 (logits, relevance) on it, and a runtime whose
    outputs are a correct float32 evaluation: a float64 run with simulated float32 rounding (seed 7)."""
    import graphlrp.export as export

    torch.manual_seed(0)
    explainer = graphlrp.compile(_CancellingHead().eval(), torch.randn(1, 8), rules="otsuki2024-conserving")
    x, target = torch.randn(4, 8), torch.tensor([-1, -1, 0, 2])
    with torch.no_grad():
        logits, relevance = explainer(x, target)
    exact_logits, _ = export._float64_run(explainer, x, target)
    resolved = torch.where(target < 0, torch.as_tensor(exact_logits).argmax(1), target)
    rounded = export._float64_run(explainer, x, resolved, 7)

    class Float32Elsewhere:
        def run(self, names, feeds):
            return [np.asarray(rounded[0], np.float32), np.asarray(rounded[1], np.float32)]

    return explainer, x, target, (logits, relevance), Float32Elsewhere()


def test_an_ill_conditioned_forward_is_judged_against_float64_with_simulated_rounding(tmp_path):
    """A runtime whose logits are a correct float32 evaluation (a float64 run with simulated float32 rounding,
    seed 7) differs from PyTorch's float32 logits by more than the tolerance; the export passes, because float32
    rounding itself moves these logits that far (random-weight FBNetV3-D: 8.8%)."""
    import graphlrp.export as export

    explainer, x, target, (logits, relevance), float32_elsewhere = _ill_conditioned_case()

    report = export.ExportReport(str(tmp_path / "x.onnx"), 0.0, 0.0, 0, 17)
    export.check_parity(explainer, float32_elsewhere, report, x, target, (logits, relevance))
    assert report.max_rel_diff_logits > 1e-4 and report.float32_error_logits_expected > 1e-4


def test_the_rounding_runs_stop_once_the_allowance_admits_the_runtime(tmp_path, monkeypatch):
    """Each simulated-rounding run can only raise the allowance, so the check stops at the first that admits
    onnxruntime (the verdict all runs would give) and makes every run before it refuses."""
    import graphlrp.export as export

    explainer, x, target, (logits, relevance), float32_elsewhere = _ill_conditioned_case()
    seeds = []
    real_run = export._float64_run
    monkeypatch.setattr(export, "_float64_run", lambda e, x, t, seed=None: seeds.append(seed) or real_run(e, x, t, seed))

    report = export.ExportReport(str(tmp_path / "x.onnx"), 0.0, 0.0, 0, 17)
    export.check_parity(explainer, float32_elsewhere, report, x, target, (logits, relevance))
    assert report.parity_basis == "rounding-allowance" and seeds == [None, 0]

    class Off:  # logits 1 off: no allowance admits it, so every rounding run is made before the refusal
        def run(self, names, feeds):
            return [(logits + logits.abs().max()).numpy(), relevance.numpy()]

    seeds.clear()
    report = export.ExportReport(str(tmp_path / "x.onnx"), 0.0, 0.0, 0, 17)
    with pytest.raises(graphlrp.ExportError):
        export.check_parity(explainer, Off(), report, x, target, (logits, relevance))
    assert seeds == [None, *range(export.ROUNDING_SAMPLES)] and report.parity_basis is None


def test_a_runtime_that_matches_the_float64_run_passes_without_the_rounding_simulation(tmp_path):
    """Where PyTorch's float32 relevance is the one off (1e-3 here) and onnxruntime's is within the tolerance of the
    float64 run, the export passes at once: the simulated-rounding runs (float32_error_expected) are not needed."""
    import graphlrp.export as export

    torch.manual_seed(0)
    explainer = graphlrp.compile(torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64))
    x, target = export._parity_batch(explainer)
    logits, exact = export._float64_run(explainer, x, target)
    exact = torch.as_tensor(exact).float()

    class Exact:
        def run(self, names, feeds):
            return [torch.as_tensor(logits).float().numpy(), exact.numpy()]

    off = exact + 1e-3 * exact.abs().max() * torch.sign(torch.randn_like(exact))
    report = export.ExportReport(str(tmp_path / "x.onnx"), 0.0, 0.0, 0, 17)
    export.check_parity(explainer, Exact(), report, x, target, (torch.as_tensor(logits).float(), off))
    assert report.max_rel_diff_relevance > 5e-4 and report.float32_error_onnxruntime < 1e-6
    assert report.float32_error_pytorch > 5e-4 and report.float32_error_expected is None


def test_a_runtime_no_further_from_float64_than_pytorch_passes_without_the_rounding_simulation(tmp_path):
    """Where PyTorch's float32 relevance is 1e-3 off the float64 run and onnxruntime's 5e-4 off it (an
    ill-conditioned explainer: the two float32 runs differ by more than the tolerance), the export is as exact as
    the explainer it translates and passes without the simulated-rounding runs; the CLI's line says what it was
    judged against. A runtime further from float64 than PyTorch goes on to the rounding allowance."""
    import graphlrp.export as export

    torch.manual_seed(0)
    explainer = graphlrp.compile(torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64))
    x, target = export._parity_batch(explainer)
    logits, exact = export._float64_run(explainer, x, target)
    logits, exact = torch.as_tensor(logits).float(), torch.as_tensor(exact).float()
    signs = torch.sign(torch.randn_like(exact))

    def off_by(fraction):
        return exact + fraction * exact.abs().max() * signs

    class Runtime:
        def __init__(self, relevance):
            self.relevance = relevance

        def run(self, names, feeds):
            return [logits.numpy(), self.relevance.numpy()]

    report = export.ExportReport(str(tmp_path / "x.onnx"), 0.0, 0.0, 0, 17)
    export.check_parity(explainer, Runtime(off_by(5e-4)), report, x, target, (logits, off_by(-1e-3)))
    assert report.max_rel_diff_relevance > 1e-3 and report.float32_error_expected is None
    assert report.parity_basis == "no-further-than-pytorch" and report.parity_basis in export.PARITY_BASES
    assert "onnxruntime is the closer of the two" in report.parity_summary()

    report = export.ExportReport(str(tmp_path / "x.onnx"), 0.0, 0.0, 0, 17)
    with pytest.raises(graphlrp.ExportError, match="against a float64 run"):
        export.check_parity(explainer, Runtime(off_by(2e-3)), report, x, target, (logits, off_by(-1e-3)))
    assert report.float32_error_expected is not None and report.float32_error_expected < 1e-5


def test_the_rounding_allowance_comes_from_simulated_float32_rounding_and_is_the_same_on_every_run():
    """The parity fallback's allowance is the error float32 rounding causes on this graph, measured by float64 runs
    whose operands are perturbed by 2⁻²⁴ at random (seeded): the same number on every run and CPU, of the order of
    a real float32 run's error, and exact ops (comparisons, one-hot targets) untouched by it."""
    import graphlrp.export as export

    torch.manual_seed(0)
    explainer = graphlrp.compile(torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64))
    x, target = export._parity_batch(explainer)
    with torch.no_grad():
        _, relevance = explainer(x, target)
    exact_logits, exact = export._float64_run(explainer, x, target)
    first = export.expected_float32_error(explainer, x, target, exact_logits, exact)
    again = export.expected_float32_error(explainer, x, target, exact_logits, exact)
    pytorch = export.rel_diff(relevance.numpy(), exact)
    assert first == again
    assert 0 < first and pytorch / 30 < first < 30 * pytorch, (first, pytorch)


def test_the_simulated_rounding_allows_what_a_term_by_term_float32_sum_does():
    """A K-term sum rounds each partial sum on the way: for terms of either sign its error is about sqrt(K/2) times
    that of rounding the terms alone. The simulated runs perturb a summing op's operands by that much more, so the
    allowance they give is of the order of a float32 kernel summing term by term (numpy's float32 cumsum, computed
    here), where perturbing the terms alone fell short by a factor of about sqrt(K/2) = 45."""
    import graphlrp.export as export

    K, rows = 4096, 256
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, K, generator=g, dtype=torch.float64), torch.randn(1, K, generator=g, dtype=torch.float64)
    x, w = x.float().double(), w.float().double()  # values float32 holds exactly
    exact = F.linear(x, w)
    terms = (x * w).float().numpy()  # each product rounded once, as a kernel's multiply does
    term_by_term = np.cumsum(terms, axis=1, dtype=np.float32)[:, -1].astype(np.float64)
    kernel_error = np.sqrt(np.mean((term_by_term - exact[:, 0].numpy()) ** 2))
    simulated = []
    for seed in range(4):
        run = export._Float64Run(torch.fx.symbolic_trace(torch.nn.Identity()), rounding_seed=seed)
        args, kwargs = run._rounded(F.linear, (x, w), {})
        simulated.append(((F.linear(*args) - exact) ** 2).mean().sqrt().item())
    assert export.accumulated_terms(F.linear, (x, w), {}) == K
    assert kernel_error / 3 < np.mean(simulated) < 3 * kernel_error, (simulated, kernel_error)


def test_accumulated_terms_of_the_summing_ops():
    import graphlrp.export as export

    a, b = torch.zeros(2, 3, 5), torch.zeros(2, 5, 7)
    assert export.accumulated_terms(torch.matmul, (a, b), {}) == 5
    assert export.accumulated_terms(torch.einsum, ("bij,bjk->bik", a, b), {}) == 5
    assert export.accumulated_terms(torch.einsum, ("bij,bjk->b", [a, b]), {}) == 3 * 5 * 7
    assert export.accumulated_terms(torch.conv2d, (torch.zeros(1, 4, 8, 8), torch.zeros(6, 2, 3, 3)), {}) == 18
    assert export.accumulated_terms(torch.conv_transpose2d, (torch.zeros(1, 4, 8, 8), torch.zeros(4, 3, 3, 3), None,
                                                            2), {}) == 4 * 9 // 4
    assert export.accumulated_terms("sum", (a, (1, 2)), {}) == 15
    assert export.accumulated_terms(torch.mean, (a,), {"dim": -1}) == 5
    assert export.accumulated_terms(torch.mul, (a, a), {}) == 1


def test_the_float64_reference_needs_no_copy_of_the_graph():
    """The float64 run of the parity fallback casts weights as nodes read them (no deep copy of the explainer) and
    runs one sample at a time: the same numbers as the whole graph module converted to float64 (to float64
    rounding: a batch of one may take other kernels), and the explainer is left as it was."""
    import copy

    import graphlrp.export as export

    torch.manual_seed(0)
    explainer = graphlrp.compile(torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64))
    x, target = export._parity_batch(explainer)
    before = {k: v.clone() for k, v in explainer.graph_module.state_dict().items()}
    got = export._float64_relevance(explainer, x, target)
    with torch.no_grad():
        _, expected = copy.deepcopy(explainer.graph_module).double()(x.double(), target)
    assert got.dtype == np.float64 and np.allclose(got, expected.numpy(), rtol=1e-12, atol=1e-14 * np.abs(got).max())
    after = explainer.graph_module.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


class MakesItsOwnFloat32(nn.Module):
    """A forward that makes a float32 tensor of its own from the input's size and feeds it to a convolution
    (EdgeNeXt's position code: zeros((B, H, W)), cumsum, a conv projection)."""

    def __init__(self):
        super().__init__()
        self.a, self.proj = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(1, 4, 1)

    def forward(self, x):
        n, _, h, w = x.shape
        pos = torch.zeros((n, 1, h, w)).cumsum(2) / h
        return self.a(x) + self.proj(pos)


def test_the_float64_reference_runs_a_graph_that_makes_float32_tensors_of_its_own():
    import torch.fx as fx

    import graphlrp.export as export

    torch.manual_seed(0)
    gm = fx.symbolic_trace(MakesItsOwnFloat32().eval())
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        expected = gm(x).numpy()  # float32 (gm.double() itself fails: its conv meets the float32 position code)
        for seed in (None, 0):
            out = export._Float64Run(gm, seed).run(x.double())
            assert out.dtype == torch.float64 and export.rel_diff(out.numpy(), expected) < 1e-5


def test_the_float64_reference_runs_convolutions_and_batch_norms_without_copying_them():
    """Conv2d and eval-mode BatchNorm2d run from their weights cast where they are read (no copy of the module):
    the exact run is the float64 model's, and a rounding run moves it by about float32's rounding."""
    import copy

    import torch.fx as fx

    import graphlrp.export as export

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 5, padding=2, groups=8, bias=False), nn.BatchNorm2d(8)).eval()
    for bn in (net[1], net[4]):
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
    gm = fx.symbolic_trace(net)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    with torch.no_grad():
        expected = copy.deepcopy(net).double()(x)
        exact = export._Float64Run(gm).run(x)
        rounded = export._Float64Run(gm, 3).run(x)
    torch.testing.assert_close(exact, expected, rtol=1e-12, atol=1e-12)
    assert 1e-9 < export.rel_diff(rounded.numpy(), exact.numpy()) < 1e-5
    after = gm.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_weights_over_the_protobuf_limit_go_to_external_data_beside_the_file(tmp_path, monkeypatch):
    """An explainer whose weights pass 2 GiB (ViT-H, RegNetY-128GF) cannot be one protobuf message: the export
    writes PATH and PATH.data, checks them and runs the parity check from them; Triton's repository gets both."""
    import graphlrp.export as export
    from graphlrp.triton import export_triton

    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", 1000)  # this small net stands in for a 2 GiB one
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    explainer = graphlrp.compile(net, torch.randn(1, 3, 16, 16), rules="otsuki2024-conserving")
    path = tmp_path / "big.onnx"
    report = explainer.export_onnx(path)
    data = tmp_path / "big.onnx.data"
    assert data.is_file() and data.stat().st_size > 8 * 3 * 3 * 3 * 4  # the conv weight lives there
    assert report.size_bytes == path.stat().st_size + data.stat().st_size
    assert report.max_rel_diff <= 1e-4
    x = torch.randn(2, 3, 16, 16)
    logits, relevance = ort.InferenceSession(str(path)).run(None, {"input": x.numpy(),
                                                                  "target": np.array([-1, 1], dtype=np.int64)})
    ref_logits, ref_relevance = explainer(x, torch.tensor([-1, 1]))
    np.testing.assert_allclose(relevance, ref_relevance.numpy(), rtol=1e-4, atol=1e-6 * float(np.abs(relevance).max()))
    model_dir = export_triton(path, tmp_path / "repo")
    assert (model_dir / "1" / "big.onnx.data").is_file()
    ort.InferenceSession(str(model_dir / "1" / "model.onnx"))  # finds its weights beside it

@pytest.mark.parametrize("preset", ["otsuki2024", "epsilon-gamma-box", "cp-lrp-conserving"])
def test_derived_weights_computed_in_every_call_give_the_held_explainer(preset, tmp_path, monkeypatch):
    """derived_weights="computed" (what `graphlrp compile` builds, and "auto" over `DERIVED_WEIGHTS_HELD_UP_TO`
    bytes of weights: a 1.2 B-parameter ViT's z⁺ explainer held W, W⁺ and W⁻, over 20 GB with the model): W⁺, W⁻,
    |W| and γ-modified weights are ops on W in the graph instead of buffers. The explainer holds no more than the
    model's weights (and the first layer's small maps), gives the relevance of the explainer that holds them
    (float32 rounding: z + ε folded differently), and its ONNX file is the same size and passes the parity check."""
    import graphlrp.rewrite as rewrite

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])

    def build(choice):
        explainer = graphlrp.compile(model, x[:1], rules=preset, allow_vanishing=True, derived_weights=choice)
        held = sum(b.numel() * b.element_size() for b in explainer.graph_module.buffers())
        report = explainer.export_onnx(tmp_path / f"{choice}.onnx")
        computed = sum(bool(n.meta.get("derived_weight")) for n in explainer.graph_module.graph.nodes)
        return explainer(x, torch.tensor([-1, 3])), held, computed, report

    (logits, relevance), held, computed, report = build("held")
    (logits_c, relevance_c), held_c, computed_c, report_c = build("computed")
    assert held > 1.5 * model_bytes and computed == 0  # held: W and derived copies (W⁺ of most layers, ...)
    assert held_c < 1.1 * model_bytes and computed_c >= 20  # one or more per convolution
    assert torch.equal(logits_c, logits)
    assert rel_diff(relevance_c.numpy(), relevance.numpy()) < 1e-5
    assert abs(report_c.size_bytes - report.size_bytes) < 0.01 * report.size_bytes
    assert report_c.max_rel_diff <= 1e-4
    (_, _), held_auto, computed_auto, _ = build("auto")  # under the limit: held
    assert (held_auto, computed_auto) == (held, 0)
    monkeypatch.setattr(rewrite, "DERIVED_WEIGHTS_HELD_UP_TO", model_bytes - 1)
    (_, _), held_auto, computed_auto, _ = build("auto")  # over it: computed
    assert (held_auto, computed_auto) == (held_c, computed_c)


def test_the_cli_explainer_holds_the_model_weights_once(tmp_path, monkeypatch):
    """`graphlrp compile` builds its explainer only to export it: the derived weights are computed from W in
    every call, not held beside it (0.8 GB less for a 100 M-parameter CNN while onnxruntime checks the file)."""
    from graphlrp import cli

    seen = []
    real = graphlrp.Explainer.export_onnx

    def spy(explainer, *args, **kwargs):
        seen.append(sum(bool(n.meta.get("derived_weight")) for n in explainer.graph_module.graph.nodes))
        return real(explainer, *args, **kwargs)

    monkeypatch.setattr(graphlrp.Explainer, "export_onnx", spy)
    assert cli.main(["compile", "resnet18", "--weights", "none", "--input-size", "32", "-o",
                     str(tmp_path / "r.onnx")]) == 0
    assert len(seen) == 1 and seen[0] >= 20


def test_derived_weights_takes_three_choices():
    with pytest.raises(graphlrp.CompileError, match="derived_weights must be one of auto, held, computed"):
        graphlrp.compile(torchvision.models.resnet18().eval(), torch.randn(1, 3, 32, 32), derived_weights="lazy")


@pytest.mark.parametrize("preset", ["otsuki2024", "epsilon-plus-flat"])
def test_fp16_export_halves_the_file_and_states_what_it_costs(preset, tmp_path):
    """precision="fp16": float32 input and outputs, float16 weights and graph, half the file. Checked on a new
    batch against the float32 PyTorch explainer (the independent reference): relevance within 3e-2 and
    ΣR_in / R_out within 1e-2 of float32's (measured: 1e-3 to 1e-2 and 5e-4 on resnet18 at 64 px); the report
    states the same distances on its parity batch."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    explainer = graphlrp.compile(model, torch.randn(1, 3, 64, 64), rules=preset)
    r32 = explainer.export_onnx(tmp_path / "fp32.onnx", check=False)
    r16 = explainer.export_onnx(tmp_path / "fp16.onnx", precision="fp16")
    assert r16.precision == "fp16" and r16.size_bytes <= 0.55 * r32.size_bytes
    m = onnx.load(str(tmp_path / "fp16.onnx"))
    assert [i.type.tensor_type.elem_type for i in m.graph.input] == [onnx.TensorProto.FLOAT, onnx.TensorProto.INT64]
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in m.graph.output)
    big = [i for i in m.graph.initializer if np.prod(i.dims) > 16]
    assert big and all(i.data_type == onnx.TensorProto.FLOAT16 for i in big)
    assert {p.key: p.value for p in m.metadata_props}["precision"] == "fp16"
    assert r16.fp16["relevance_vs_fp32"] <= 3e-2 and r16.fp16["logits_vs_fp32"] <= 1e-2
    assert np.allclose(r16.fp16["conservation_fp16"], r16.fp16["conservation_fp32"], atol=1e-2)

    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 3, 64, 64, generator=g)
    target = torch.tensor([-1, 7, 123])
    session = ort.InferenceSession(str(tmp_path / "fp16.onnx"), providers=["CPUExecutionProvider"])
    logits16, rel16 = session.run(None, {"input": x.numpy(), "target": target.numpy()})
    logits32, rel32, taps = explainer.explain_with_taps(x, target)
    assert rel_diff(logits16, logits32.numpy()) <= 1e-2
    for i in range(len(x)):
        assert rel_diff(rel16[i], rel32[i].numpy()) <= 3e-2
        out = float(taps["output"][i])
        assert abs(float(rel16[i].astype(np.float64).sum()) / out - float(rel32[i].double().sum()) / out) <= 1e-2


def test_fp16_refuses_values_float16_cannot_hold(tmp_path):
    """Activations past float16's 65504 become inf: an ExportError that says so, not a file of NaNs."""
    class Loud(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.fc = torch.nn.Linear(8, 4)
            with torch.no_grad():
                self.conv.weight.mul_(1e6)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    explainer = graphlrp.compile(Loud().eval(), torch.randn(1, 3, 16, 16), rules="epsilon-plus-flat",
                                 allow_vanishing=True)
    with pytest.raises(graphlrp.ExportError, match="not finite"):
        explainer.export_onnx(tmp_path / "loud.onnx", precision="fp16")
    with pytest.raises(graphlrp.ExportError, match="precision"):
        explainer.export_onnx(tmp_path / "x.onnx", precision="int8")


def test_cli_compile_precision_fp16(tmp_path):
    out = tmp_path / "r18-fp16.onnx"
    proc = graphlrp_cli("compile", "resnet18", "--weights", "none", "--input-size", "64", "--precision", "fp16",
                        "-o", str(out))
    assert "fp16      vs the float32 explainer" in proc.stdout and "parity" not in proc.stdout
    model = onnx.load(str(out))
    assert {p.key: p.value for p in model.metadata_props}["precision"] == "fp16"
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    logits, rel = session(out).run(None, {"input": np.random.randn(2, 3, 64, 64).astype(np.float32),
                                          "target": np.array([-1, 3])})
    assert logits.dtype == rel.dtype == np.float32 and np.isfinite(rel).all()


@pytest.mark.parametrize("c_in,c_out,groups,kernel,stride,padding,dilation,bias", [
    (8, 8, 8, 7, 1, 3, 1, True),      # ConvNeXt's depthwise 7x7
    (8, 16, 8, 3, 2, 1, 1, False),    # depthwise with a channel multiplier, strided
    (8, 8, 4, 3, 1, (1, 2), (1, 2), True),  # grouped, two channels per group, dilated, uneven padding
    (6, 6, 6, 5, 3, 0, 1, False),     # no padding, stride 3
    (4, 8, 1, 3, 1, 1, 1, True),      # ungrouped: PyTorch's own convolution
])
def test_float64_reference_convolution_is_pytorchs(c_in, c_out, groups, kernel, stride, padding, dilation, bias):
    """The float64 reference computes grouped convolutions tap by tap (PyTorch's float64 kernel for them is
    minutes slow on a ConvNeXt); the sums are PyTorch's, as a functional call and as an nn.Conv2d."""
    from graphlrp.export import conv2d_float64

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, groups, bias=bias).double()
    x = torch.randn(2, c_in, 11, 13, dtype=torch.float64)
    with torch.no_grad():
        expected = conv(x)
        got = conv2d_float64(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels,multiplier,kernel,stride,padding,output_padding,dilation,bias", [
    (8, 1, 7, 1, 3, 0, 1, True),       # the transposed pass of a depthwise 7x7
    (8, 2, 3, 2, 1, 1, 1, False),      # a channel multiplier, strided, with output padding
    (6, 1, 5, 2, (2, 1), (1, 0), (1, 2), True),  # uneven padding and output padding, dilated
    (4, 1, 3, 3, 0, 2, 1, False),      # no padding, stride 3
])
def test_float64_reference_transposed_convolution_is_pytorchs(channels, multiplier, kernel, stride, padding,
                                                              output_padding, dilation, bias):
    """Depthwise transposed convolutions (the relevance pass of a depthwise conv) are summed tap by tap in the
    float64 reference; the sums are PyTorch's conv_transpose2d's."""
    from graphlrp.export import conv_transpose2d_float64

    torch.manual_seed(0)
    weight = torch.randn(channels, multiplier, kernel, kernel, dtype=torch.float64)
    b = torch.randn(channels * multiplier, dtype=torch.float64) if bias else None
    s = torch.randn(2, channels, 9, 10, dtype=torch.float64)
    expected = F.conv_transpose2d(s, weight, b, stride, padding, output_padding, channels, dilation)
    got = conv_transpose2d_float64(s, weight, b, stride, padding, output_padding, channels, dilation)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
