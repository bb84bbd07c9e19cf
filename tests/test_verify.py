"""Every compile checks its own explainer (graphlrp.verify): a wrong explainer is refused with an error that names
the node where the relevance departs; the measured figures travel with the explainer into the ONNX file."""
from __future__ import annotations

import dataclasses
import math
import json
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

import graphlrp
from graphlrp import rules
from graphlrp.errors import ConservationError, ExportError, PresetError, VanishingRelevanceError
from graphlrp.presets import load_preset
from graphlrp.conservation import CONSERVATION_TOLERANCE
from graphlrp.verify import certify, example_pair


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.block = nn.Conv2d(3, 8, 3, padding=1), Block(8)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.block(torch.relu(self.stem(x)))), 1))


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net().eval()


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.randn(1, 3, 16, 16)


def leaky(rule_name: str, node_name: str, transform):
    """A copy of a registered rule that applies `transform` to the relevance it hands on, at one node only."""
    spec = rules.RULES[rule_name]

    def fn(ctx, **params):
        out = spec.fn(ctx, **params)
        if ctx.op.node.name != node_name:
            return out
        return [transform(ctx, r) if r is not None else None for r in out]

    return dataclasses.replace(spec, fn=fn)


def test_conserving_preset_is_checked_and_the_certificate_says_so(net, x):
    explainer = graphlrp.compile(net, x, rules="otsuki2024-conserving")
    cert = explainer.certificate
    assert cert.conserving and len(cert.ratio) == 2  # the example and its perturbed copy
    assert max(abs(r - 1) for r in cert.ratio) <= CONSERVATION_TOLERANCE
    assert cert.forward_error <= 1e-4 and cert.merge_gap is not None and cert.merge_gap <= 1e-4
    # the certificate's ratio is the explainer's own, recomputed independently on the same pair
    logits, relevance = explainer(example_pair(x))
    R_out = torch.softmax(net(example_pair(x)), -1).max(-1).values
    assert torch.allclose(relevance.flatten(1).sum(1) / R_out, torch.tensor(cert.ratio, dtype=R_out.dtype),
                          rtol=0, atol=1e-5)


def test_a_planted_leak_is_refused_naming_its_node(net, x, monkeypatch):
    monkeypatch.setitem(rules.RULES, "zplus", leaky("zplus", "block_conv2", lambda ctx, r: ctx.call(torch.mul, r, 0.9)))
    with pytest.raises(ConservationError) as err:
        graphlrp.compile(net, x, rules="otsuki2024-conserving")
    message = str(err.value)
    assert "declares itself conserving" in message
    assert "departs first at node 'block_conv2'" in message and "rule zplus" in message
    assert "test_verify.py" in message  # the user's source line of that layer
    assert "float32 rounding cannot explain the departure: a rule leaks" in message  # Σ|R| stayed ~|R_out|


def test_a_departure_from_float32_cancellation_is_told_from_a_leak_by_the_float64_twin():
    """Four bias-free linear layers whose outputs cancel to 2e-3 of their terms: the ε-rule hands on ±500×
    the relevance per layer, exactly conserving in exact arithmetic. In float32 the sums of those values round
    off by more than 1e-3 of the output: refused, naming where Σ|R| grows, with the same explainer's float64
    ratio, which conserves (the rules hold)."""
    d = 2e-3
    layers = [nn.Linear(2, 2, bias=False) for _ in range(4)]
    for layer in layers:
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([[1.0, -1.0 + d], [1.0 + d, -1.0]]) / d)
    model = nn.Sequential(*layers).eval()
    x = torch.tensor([[1.0, 1.0 - d / 2]])
    with pytest.raises(ConservationError) as err:
        graphlrp.compile(model, x, rules="cp-lrp-conserving")
    message = str(err.value)
    assert "Σ|R| grows past 100× |R_out| in the relevance handed by '_3' (linear, rule epsilon)" in message
    assert "In float64 the same explainer conserves" in message and "a rule leaks" not in message
    model64 = nn.Sequential(*layers).double().eval()  # the advice in the message holds
    explainer = graphlrp.compile(model64, x.double(), rules="cp-lrp-conserving")
    assert max(abs(r - 1) for r in explainer.certificate.ratio) <= 1e-6  # ε = 1e-9 leaks R·ε/z


def test_non_finite_relevance_is_refused_naming_where_it_starts(net, x, monkeypatch):
    monkeypatch.setitem(rules.RULES, "zplus", leaky("zplus", "block_conv1", lambda ctx, r: ctx.call(torch.div, r, 0.0)))
    with pytest.raises(ConservationError, match="non-finite relevance.*node 'block_conv1'"):
        graphlrp.compile(net, x, rules="otsuki2024")


def test_a_merge_that_does_not_split_exactly_is_refused(net, x, monkeypatch):
    monkeypatch.setitem(rules.RULES, "split", leaky("split", "add", lambda ctx, r: ctx.call(torch.mul, r, 1.01)))
    with pytest.raises(ConservationError, match="merge does not split exactly.*node 'add'"):
        graphlrp.compile(net, x, rules="otsuki2024")


def test_a_forward_that_differs_from_the_model_is_refused(net, x):
    explainer = graphlrp.compile(net, x, rules="otsuki2024", verify=False)
    assert explainer.certificate is None
    other = Net().eval()  # other weights: the explainer no longer computes this model
    with pytest.raises(ConservationError, match="forward does not reproduce the model"):
        certify(explainer, other, x)


def test_relevance_that_vanishes_is_an_error_unless_allowed(net, x):
    with torch.no_grad():  # features reach the head at ~1e-9: the ε = 1e-5 of otsuki2024 absorbs them
        net.fc.weight.mul_(1e-8)
        net.fc.bias.zero_()
    with pytest.raises(VanishingRelevanceError) as err:
        graphlrp.compile(net, x, rules="otsuki2024")
    assert "vanishes" in str(err.value) and "node 'fc'" in str(err.value)
    assert "otsuki2024-conserving" in str(err.value)  # what to use instead
    with pytest.warns(UserWarning, match="vanishes"):
        explainer = graphlrp.compile(net, x, rules="otsuki2024", allow_vanishing=True)
    assert explainer.certificate.vanished and max(explainer.certificate.ratio) < 0.5
    conserving = graphlrp.compile(net, x, rules="otsuki2024-conserving")  # the conserving preset keeps it
    assert max(abs(r - 1) for r in conserving.certificate.ratio) <= CONSERVATION_TOLERANCE


def test_non_conserving_presets_report_ratio_and_largest_leaks(net, x):
    cert = graphlrp.compile(net, x, rules="epsilon-plus-flat").certificate
    assert not cert.conserving and all(0.5 <= r <= 2 for r in cert.ratio)
    assert cert.leaks and abs(cert.leaks[0].fraction) >= abs(cert.leaks[-1].fraction)
    # the leaks add up to what the whole explainer lost (on the pair, relative to the output's relevance)
    assert "largest leak" in cert.summary()


def _cancelling_mlp() -> nn.Module:
    """Two bias-free linear layers: the second weighs two copies of x₀ by 10⁴ and −(10⁴ − 1), so z = x₀ and the
    ε-rule hands on +10⁴ R and −(10⁴ − 1) R, which cancel again at x₀: 2·10⁴× the output's relevance inside,
    about 1× in the map, whatever the input."""
    model = nn.Sequential(nn.Linear(4, 2, bias=False), nn.Linear(2, 3, bias=False)).eval()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].weight[:, 0] = 1.0
        model[1].weight.zero_()
        model[1].weight[0] = torch.tensor([1e4, -1e4 + 1])
        model[1].weight[1:, 0] = torch.tensor([0.1, -0.1])
    return model


def _mass_of_the_map(explainer, x) -> float:
    """Σ|R_in| / |R_out| over the certificate's example pair, from the explainer's own outputs: R_out is the
    chosen class's logit or, where the preset puts the probability on the output, its softmax."""
    pair = example_pair(x)
    with torch.no_grad():
        logits, relevance = explainer(pair)
    outputs = logits.softmax(1) if explainer.info["output_relevance"] == "probability" else logits
    r_out = outputs.gather(1, logits.argmax(1, keepdim=True))
    return float(relevance.double().abs().sum() / r_out.double().abs().sum())


def test_relevance_of_both_signs_grown_past_the_float32_limit_is_a_warning_naming_where(recwarn):
    x = torch.randn(1, 4)
    x[0, 0] = 3.0
    explainer = graphlrp.compile(_cancelling_mlp(), x, rules="cp-lrp")
    cert = explainer.certificate
    assert cert.peak_mass == pytest.approx(2e4 - 1, rel=1e-3)  # (10⁴ + 10⁴ − 1) · |R| at the copies of x₀
    assert cert.input_mass == pytest.approx(_mass_of_the_map(explainer, x), rel=1e-4)
    assert cert.input_mass < 2
    assert "node '_0'" in cert.peak_mass_at
    assert "relevance of both signs grows to 2e+04× the output's" in cert.grown and "float64" in cert.grown
    assert "the map itself" not in cert.grown  # the map is ~1×: only the precision of its values is at stake
    assert any(cert.grown == str(w.message) for w in recwarn.list)
    assert "Σ|R| / |R_out| 1 at the input, 2e+04 at most" in cert.summary()
    assert json.loads(json.dumps(cert.to_dict()))["peak_mass"] == pytest.approx(cert.peak_mass)


def test_a_map_of_one_sign_has_mass_one_and_no_warning(net, x, recwarn):
    explainer = graphlrp.compile(net, x, rules="otsuki2024")  # z⁺ everywhere but the first layer's z^B
    cert = explainer.certificate
    assert cert.grown == "" and not [w for w in recwarn.list if "both signs" in str(w.message)]
    assert cert.input_mass == pytest.approx(_mass_of_the_map(explainer, x), rel=1e-4)
    assert 0.5 <= cert.input_mass <= cert.peak_mass < 10


def test_export_says_why_the_relevance_is_zero_from_the_compiles_check_not_a_guess(x, tmp_path):
    """Features that reach the head as exact zeros (as torchvision's random EfficientNets bring them to ~1e-14):
    the head's output is its bias, the z⁺ rule hands on R·0/(0 + ε) = 0. The export's warning takes its cause
    from the compile's check, which names the head, rather than guessing a zero-initialised head."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
        model[4].bias.copy_(torch.tensor([0.5, -0.2, 0.1]))
    with pytest.warns(UserWarning, match="the relevance vanishes on this model"):
        explainer = graphlrp.compile(model, x, rules="otsuki2024", allow_vanishing=True)
    with pytest.warns(UserWarning, match="relevance is 0 everywhere") as caught:
        report = explainer.export_onnx(tmp_path / "zero.onnx")
    assert report.zero_relevance
    message = next(str(w.message) for w in caught if "relevance is 0 everywhere" in str(w.message))
    assert "the compile's check found why: preset 'otsuki2024': the relevance vanishes" in message
    assert "node '_4' (call_module 4: Linear)" in message and "zero-initialised head" not in message


def test_the_certificate_is_in_the_export_report_and_the_onnx_metadata(net, x, tmp_path):
    explainer = graphlrp.compile(net, x, rules="otsuki2024-conserving")
    report = explainer.export_onnx(tmp_path / "e.onnx")
    assert report.certificate["ratio"] == explainer.certificate.ratio
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "e.onnx")).metadata_props}
    assert json.loads(meta["certificate"])["conserving"] is True


def test_overrides_or_a_signed_split_withdraw_the_promise_of_conservation(net, x):
    assert load_preset("otsuki2024-conserving").conserving and load_preset("cp-lrp-conserving").conserving
    assert not load_preset("otsuki2024").conserving
    assert not graphlrp.compile(net, x, rules="otsuki2024-conserving", overrides={"fc": "epsilon"}).certificate.conserving
    assert not graphlrp.compile(net, x, rules="otsuki2024-conserving", split="signed").certificate.conserving


def test_conserving_must_be_a_boolean():
    with pytest.raises(PresetError, match="conserving must be true or false"):
        load_preset({"conserving": "yes"})


def test_compile_cli_names_a_preset_that_takes_what_the_default_refuses(tmp_path, capsys):
    from graphlrp.cli import main

    source = tmp_path / "dilated_pool_net.py"
    source.write_text(textwrap.dedent("""
        import torch.nn as nn

        class DilatedPoolNet(nn.Module):  # a dilated max-pool: otsuki2024's average stand-in has no dilated form
            def __init__(self):
                super().__init__()
                self.a = nn.Conv2d(3, 4, 3, padding=1)
                self.pool = nn.MaxPool2d(3, stride=1, padding=1, dilation=2)
                self.fc = nn.Linear(4, 5)

            def forward(self, x):
                return self.fc(self.pool(self.a(x).relu()).mean(dim=(2, 3)))

        def build():
            return DilatedPoolNet().eval()
    """))
    code = main(["compile", f"{source}:build", "--weights", "none", "--input-size", "16", "-o", str(tmp_path / "o.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "window_average with dilation" in err
    assert "'otsuki2024-conserving' can: --rules otsuki2024-conserving" in err
    assert main(["compile", f"{source}:build", "--weights", "none", "--input-size", "16", "--rules",
                 "otsuki2024-conserving", "-o", str(tmp_path / "o.onnx")]) == 0


def test_a_max_pool_with_no_2x2_stand_in_gets_the_z_rule_over_its_own_windows():
    """GoogLeNet's 3x3/stride-1 max-pools: otsuki2024 falls back to window_average there (same ε), exactly."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 1, 1),
                        nn.Flatten(), nn.Linear(4 * 16 * 16, 5)).eval()
    x = torch.randn(2, 3, 16, 16)
    fallback = graphlrp.compile(net, x, rules="otsuki2024", allow_vanishing=True)
    explicit = graphlrp.compile(net, x, rules="otsuki2024", allow_vanishing=True,
                                overrides={"2": {"rule": "window_average", "epsilon": 1e-5, "stabilizer": "add"}})
    torch.testing.assert_close(fallback(x)[1], explicit(x)[1], rtol=0, atol=0)
    with pytest.raises(graphlrp.UnsupportedOpError, match="2x2 stand-in"):
        graphlrp.compile(net, x, rules="otsuki2024", overrides={"2": "avg2x2"}, allow_vanishing=True)


class CachedScale(nn.Module):
    """An eval-mode cache filled by the forward, as timm's attention-bias caches are: after `model(x)` with
    autograd on it holds a non-leaf tensor, which deepcopy refuses."""

    def __init__(self):
        super().__init__()
        self.conv, self.scale, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Parameter(torch.rand(4, 1, 1) + 0.5), nn.Linear(4, 3)
        self.cache = {}

    def forward(self, x):
        if not self.training:
            if "scale" not in self.cache:
                self.cache["scale"] = self.scale * 2
            s = self.cache["scale"]
        else:
            s = self.scale * 2
        return self.fc(torch.relu(self.conv(x) * s).mean((2, 3)))


def test_compiling_after_an_autograd_forward_gives_the_same_explainer(x):
    torch.manual_seed(0)
    model = CachedScale().eval()
    before = graphlrp.compile(model, x, rules="otsuki2024-conserving")
    model.cache.clear()  # (the compile's own check filled it without autograd)
    model(x)  # autograd on: the cache now holds a tensor with a grad_fn
    assert model.cache["scale"].grad_fn is not None
    after = graphlrp.compile(model, x, rules="otsuki2024-conserving")
    again = graphlrp.compile(model, x, rules="otsuki2024-conserving")
    for other in (after, again):
        for a, b in zip(before(x), other(x)):
            assert torch.equal(a, b)
    assert model.cache["scale"].grad_fn is not None  # the user's model is left as it was


def test_a_zero_head_is_refused_unless_vanishing_is_allowed(net, x):
    with torch.no_grad():  # a zero-initialised head (timm's and torchvision's ViT/Mixer init): every logit is 0
        net.fc.weight.zero_()
        net.fc.bias.zero_()
    logit_preset = {"output": "logit", "conserving": True,
                    "rules": {"conv": "zplus", "linear": "zplus", "first_layer": "zplus", "avgpool": "z"}}
    with pytest.raises(VanishingRelevanceError, match="relevance put on the output is 0"):
        graphlrp.compile(net, x, rules=logit_preset)
    with pytest.warns(UserWarning, match="explains nothing"):
        cert = graphlrp.compile(net, x, rules=logit_preset, allow_vanishing=True).certificate
    assert cert.vanished and all(math.isnan(r) for r in cert.ratio)


def test_a_preset_may_ask_for_a_warning_instead_of_refusing_vanishing_relevance(net, x):
    with torch.no_grad():
        net.fc.weight.mul_(1e-8)
        net.fc.bias.zero_()
    warn = {"output": "probability", "on_vanishing": "warn",
            "rules": {"conv": {"rule": "zplus", "epsilon": 1e-5}, "linear": {"rule": "zplus", "epsilon": 1e-5},
                      "first_layer": {"rule": "zplus", "epsilon": 1e-5}, "avgpool": "z"}}
    with pytest.raises(VanishingRelevanceError):
        graphlrp.compile(net, x, rules={**warn, "on_vanishing": "error"})
    with pytest.warns(UserWarning, match="vanishes"):
        cert = graphlrp.compile(net, x, rules=warn).certificate
    assert cert.vanished and max(cert.ratio) < 0.5
    assert load_preset("cp-lrp").on_vanishing == "warn" and load_preset("otsuki2024").on_vanishing == "error"
    with pytest.raises(PresetError, match="on_vanishing must be"):
        load_preset({"on_vanishing": "ignore"})


def test_compile_cli_names_a_preset_when_the_default_presets_certificate_fails(tmp_path, capsys, monkeypatch):
    """A ConservationError of the default preset (non-finite relevance, say) gets the same hint as a missing rule:
    which shipped preset takes the model."""
    from graphlrp.cli import main
    from graphlrp.errors import ConservationError

    real = graphlrp.compile

    def planted(model, example, rules=None, **options):
        if rules == "otsuki2024":
            raise ConservationError("planted: the relevance first stops being finite at node 'layer1_0_conv1'")
        return real(model, example, rules=rules, **options)

    monkeypatch.setattr(graphlrp, "compile", planted)
    code = main(["compile", "resnet18", "--weights", "none", "--input-size", "32", "-o", str(tmp_path / "o.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "planted" in err
    assert "'otsuki2024-conserving' can: --rules otsuki2024-conserving" in err


def _only_sample_1_fails_in_the_runtime_and_the_server(session, x, good_relevance, error, detail: str) -> None:
    """The exported explainer on (good, bad): `run_each` explains sample 0 and puts `error` in sample 1's place,
    `explain` raises it, and the server answers 200 for the good input and 422 (mentioning `detail`) for the bad."""
    results = session.run_each(x.numpy(), np.full(2, -1, np.int64))
    assert np.allclose(results[0].relevance, good_relevance.numpy(), rtol=1e-4, atol=1e-6)
    assert isinstance(results[1], error)
    with pytest.raises(error, match="sample 1"):
        session.explain(x.numpy())

    from starlette.testclient import TestClient
    from graphlrp.server import create_app

    with TestClient(create_app(session)) as client:
        ok = client.post("/v1/explain", json={"array": x[0].tolist()})
        bad = client.post("/v1/explain", json={"array": x[1].tolist()})
    assert ok.status_code == 200, ok.text
    assert bad.status_code == 422 and detail in bad.json()["detail"]


class _ZeroDenominator(torch.nn.Module):
    """otsuki2024's conv rule keeps the bias and adds ε: z + ε = W⁺a + b + ε, exactly 0 where a = 0 and b = −ε.
    The example (all inputs positive) never gets there; an input with a negative pixel does."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = torch.nn.Conv2d(1, 1, 1), torch.nn.Conv2d(1, 1, 1)
        self.fc = torch.nn.Linear(16, 3)
        with torch.no_grad():
            self.conv1.weight.fill_(1.0)
            self.conv1.bias.zero_()
            self.conv2.weight.fill_(1.0)
            self.conv2.bias.fill_(-1e-5)

    def forward(self, x):
        return self.fc(self.conv2(torch.relu(self.conv1(x))).flatten(1))


def test_relevance_that_is_not_finite_on_a_later_input_is_an_error_naming_the_node(tmp_path):
    """The certificate checks the example; an input where a rule divides 0 by 0 must not come back as a NaN map.
    The PyTorch explainer names the sample and the node, the export's parity check says why it cannot compare, the
    exported explainer (runtime) fails that sample alone, and the server answers 422 for it and 200 for a good
    input."""
    from graphlrp.errors import NonFiniteRelevanceError

    torch.manual_seed(0)
    net, example = _ZeroDenominator().eval(), 1 + torch.rand(1, 1, 4, 4)
    explainer = graphlrp.compile(net, example, rules="otsuki2024", allow_vanishing=True)
    x = torch.cat([example, example])
    x[1, 0, 1, 2] = -1.0
    good_logits, good_relevance = explainer(x[:1])
    assert torch.isfinite(good_relevance).all()
    with pytest.raises(NonFiniteRelevanceError, match=r"sample\(s\) \[1\] of 2.*node 'conv2'.*rule zplus"):
        explainer(x)
    assert not torch.isfinite(explainer.graph_module(x, torch.full((2,), -1))[1]).all()  # what it would have been

    path = tmp_path / "e.onnx"
    with pytest.raises(ExportError, match=r"parity check cannot compare.*not finite.*node 'conv2'"):
        explainer.export_onnx(path)  # its random parity images have negative pixels
    explainer.export_onnx(path, check=False)
    session = graphlrp.load(path)
    _only_sample_1_fails_in_the_runtime_and_the_server(session, x, good_relevance[0], NonFiniteRelevanceError,
                                                        "not finite")


class _TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5, bias=False), nn.Linear(5, 3, bias=False)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_a_conserving_explainer_that_stops_conserving_on_a_later_input_is_an_error_naming_the_node(tmp_path):
    """A conserving preset with an ε that matters only at small pre-activations: it conserves on the large compile
    example (the certificate passes) and loses relevance on a small input. Every call checks: PyTorch names the
    sample and the node, the runtime fails that sample alone, the server answers 422 for it and 200 for the other."""
    from graphlrp.errors import NotConservedError

    torch.manual_seed(0)
    net = _TwoLayers().eval()
    rule = {"rule": "epsilon", "epsilon": 1e-3, "bias": "zero"}
    preset = {"name": "eps-1e-3", "output": "logit", "conserving": True,
              "rules": {"first_layer": rule, "linear": rule, "activation": "pass"}}
    example = 100 * torch.randn(1, 6)
    explainer = graphlrp.compile(net, example, rules=preset)
    assert explainer.certificate.worst_ratio_error <= CONSERVATION_TOLERANCE
    x = torch.cat([example, 1e-3 * example])
    logits, relevance = explainer(x[:1])
    assert abs(float(relevance.sum()) / float(logits.max()) - 1) <= CONSERVATION_TOLERANCE
    with pytest.raises(NotConservedError, match=r"sample 1: 0\.\d+.*departs first at node 'fc\d'.*rule epsilon"):
        explainer(x)
    with torch.no_grad():
        logits, relevance = explainer.graph_module(x, torch.full((2,), -1))  # what it would have returned
    assert abs(float(relevance[1].sum()) / float(logits[1].max()) - 1) > 0.01

    path = tmp_path / "e.onnx"
    explainer.export_onnx(path, check=False)
    session = graphlrp.load(path)
    assert session.conserving
    _only_sample_1_fails_in_the_runtime_and_the_server(session, x, explainer(x[:1])[1][0], NotConservedError,
                                                        "conserving")


def test_conservation_allows_rounding_only_where_the_chosen_class_output_is_small():
    """The predicted class: |ΣR_in / R_out − 1| ≤ 1e-3, whatever Σ|R_in| is (a map whose relevance grew to 10⁶×
    the output rounds its sum percents away: not excused). A chosen class whose logit is ~0: float32 rounding of
    its map's relevance of both signs (1e-6·Σ|R_in|) passes, capped at 1e-3 of the prediction's output."""
    from graphlrp.conservation import array_departures, output_relevance

    logits = np.array([[1e-7, 2.0], [3.0, 0.5], [3.0, 0.5], [3.0, 0.5]])
    relevance = np.array([[5.0, -5.0 + 1e-6], [1.5, 1.5], [1.5, 1.0], [3e6 + 3.06, -3e6]])
    assert array_departures(logits, relevance, np.array([0, -1, -1, -1]), "logit") == {
        2: pytest.approx(2.5 / 3), 3: pytest.approx(3.06 / 3)}
    # the chosen class's departure beyond rounding of Σ|R_in| (1e-5 here) is reported
    assert array_departures(logits[:1], np.array([[5.0, -5.0 + 3e-5]]), np.array([0]), "logit") == {
        0: pytest.approx(3e-5 / 1e-7)}
    # a chosen class of probability 1.7e-5 whose map sums to 50× that (8e-4, under 1e-3 of the prediction's 1.0):
    # one sign, so no rounding to excuse it
    few = np.array([[3.0, -8.0]])
    p = output_relevance(few, np.array([1]), "probability")[0]
    assert array_departures(few, np.array([[25 * p, 25 * p]]), np.array([1]), "probability") == {0: pytest.approx(50)}
    logits = np.array([[1e-7, -2.0], [3.0, 0.5], [3.0, 0.5]])
    p = output_relevance(logits, np.array([1, 1, 0]), "probability")
    assert np.allclose(p, [np.exp(-2) / (np.exp(-2) + np.exp(1e-7)), 1 / (1 + np.exp(2.5)), 1 / (1 + np.exp(-2.5))])


ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"


@pytest.mark.skipif(not (ASSETS / "cifar10-resnet" / "resnet20.pt").is_file(), reason="needs ../shared/assets")
def test_relevance_amplified_beyond_float64_is_refused_with_the_cause_and_the_preset_that_conserves():
    """The trained CIFAR ResNet-20 under an ε-rule that leaves biases (batch-norm shifts) out everywhere
    (cp-lrp-conserving before its convolutions kept theirs): it divides by bias-free z that is ~0 where the unit's
    real input is not, and Σ|R| grows to ~10¹⁵× the output. Refused, saying that float64 cannot hold it either and
    that otsuki2024-conserving (z⁺) conserves, which it does, to 1e-3, on the same model and input; so does
    cp-lrp-conserving as shipped."""
    import tomllib

    from graphlrp.presets import preset_dir
    from graphlrp.zoo.cifar import resnet20

    bias_free = tomllib.loads((preset_dir() / "cp-lrp-conserving.toml").read_text())
    bias_free["batchnorm"] = "pass"
    bias_free["rules"]["conv"] = {**bias_free["rules"]["conv"], "bias": "zero"}

    model = resnet20().eval()
    model.load_state_dict(torch.load(ASSETS / "cifar10-resnet" / "resnet20.pt", weights_only=True))
    x = torch.from_numpy(np.load(ASSETS / "cifar10-test-dev.npz")["images"][:1]).permute(0, 3, 1, 2).float() / 255
    with pytest.raises(ConservationError) as err:
        graphlrp.compile(model, x, rules=bias_free)
    message = str(err.value)
    assert "Σ|R| grows past 100× |R_out|" in message and "beyond what float64 sums to 1e-3 either" in message
    assert "otsuki2024-conserving (z⁺" in message
    for preset in ("otsuki2024-conserving", "cp-lrp-conserving"):
        explainer = graphlrp.compile(model, x, rules=preset)
        assert max(abs(r - 1) for r in explainer.certificate.ratio) <= CONSERVATION_TOLERANCE
