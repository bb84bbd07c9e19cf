"""graphlrp.adapters: the Captum-style `attribute` and the Quantus `explain_func`, against the explainer's own output
(a compiled Explainer and the same explainer exported to ONNX), and through Quantus itself where it is installed."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import graphlrp
from graphlrp.adapters import LRPAttribution, explain_func
from graphlrp.errors import InputError
from conftest import _tiny_resnet


@pytest.fixture(scope="module")
def model():
    return _tiny_resnet()


@pytest.fixture(scope="module")
def compiled(model):
    return graphlrp.compile(model, torch.randn(1, 3, 32, 32), rules="otsuki2024-conserving")


@pytest.fixture(scope="module")
def session(compiled, tmp_path_factory):
    path = tmp_path_factory.mktemp("adapters") / "tiny.onnx"
    compiled.export_onnx(str(path), check=False)
    return graphlrp.load(path, providers="cpu", threads=1)


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)


def _reference(compiled, x, target):
    """The compiled explainer's own relevance, called directly."""
    t = torch.full((len(x),), -1) if target is None else torch.as_tensor(np.broadcast_to(target, (len(x),)).copy())
    return compiled(torch.from_numpy(x), t)[1].numpy()


@pytest.mark.parametrize("backend", ["compiled", "onnx"])
def test_attribute_matches_the_explainer(backend, compiled, session, x):
    attribution = LRPAttribution(compiled if backend == "compiled" else session)
    for target, as_array in [(None, None), (3, 3), ([1, 2, 3, 4], [1, 2, 3, 4]),
                             (torch.tensor([5, 5, 0, 9]), [5, 5, 0, 9]), (np.array([7, 7, 7, 7]), 7),
                             (torch.tensor(2), 2)]:
        expected = _reference(compiled, x, None if as_array is None else np.asarray(as_array))
        got = attribution.attribute(x, target=target)
        assert isinstance(got, np.ndarray) and got.shape == x.shape and got.dtype == np.float32
        # the ONNX file against the PyTorch graph: float32 on either side
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max(), err_msg=str(target))


@pytest.mark.parametrize("backend", ["compiled", "onnx"])
def test_attribute_keeps_the_input_type_shape_and_dtype(backend, compiled, session, x):
    attribution = LRPAttribution(compiled if backend == "compiled" else session)
    xt = torch.from_numpy(x).double()
    got = attribution.attribute(xt, target=1)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64 and got.shape == xt.shape
    expected = _reference(compiled, x, np.array(1))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    single = attribution.attribute(x[2], target=4)
    assert single.shape == x[2].shape
    np.testing.assert_allclose(single, _reference(compiled, x[2:3], np.array(4))[0], rtol=1e-4,
                               atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("backend", ["compiled", "onnx"])
def test_convergence_delta_of_a_conserving_preset_is_zero(backend, compiled, session, model, x):
    attribution = LRPAttribution(compiled if backend == "compiled" else session)
    relevance, delta = attribution.attribute(x, target=[0, 1, 2, 3], return_convergence_delta=True)
    # independent: the output relevance is the probability of the target under the model itself, in float64
    with torch.no_grad():
        p = copy.deepcopy(model).double()(torch.from_numpy(x).double()).softmax(-1)[torch.arange(4), torch.tensor([0, 1, 2, 3])].numpy()
    np.testing.assert_allclose(relevance.reshape(4, -1).astype(np.float64).sum(1), p, rtol=1e-3)
    assert delta.shape == (4,) and np.all(np.abs(delta) <= 1e-3 * p)


def test_bad_targets_and_arguments_are_input_errors(compiled, session, x):
    for attribution in (LRPAttribution(compiled), LRPAttribution(session)):
        for bad in ([(0, 1)] * 4, [1, 2], 10, [1.5] * 4, "cat"):
            with pytest.raises(InputError):
                attribution.attribute(x, target=bad)
        with pytest.raises(InputError, match="baselines"):
            attribution.attribute(x, baselines=x)
        with pytest.raises(InputError, match="tuple"):
            attribution.attribute((x, x))
    with pytest.raises(InputError, match="needs a graphlrp.Explainer"):
        LRPAttribution(torch.nn.Linear(2, 2))


def test_explain_func_compiles_the_model_it_is_given(model, compiled, x, monkeypatch):
    targets = np.array([0, 3, 6, 9])
    calls = []
    real = graphlrp.compile
    monkeypatch.setattr(graphlrp, "compile", lambda *a, **k: calls.append(k) or real(*a, **k))
    a = explain_func(model, x, targets, rules="otsuki2024-conserving")
    assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == x.shape
    np.testing.assert_allclose(a, _reference(compiled, x, targets), rtol=1e-5, atol=1e-7)
    explain_func(model, x, targets, rules="otsuki2024-conserving")
    assert len(calls) == 1  # same weights: compiled once
    randomised = _tiny_resnet()
    with torch.no_grad():
        randomised.fc.weight.normal_()
    b = explain_func(randomised, x, targets, rules="otsuki2024-conserving")
    assert len(calls) == 2
    reference = graphlrp.compile(randomised, torch.randn(1, 3, 32, 32), rules="otsuki2024-conserving")
    np.testing.assert_allclose(b, _reference(reference, x, targets), rtol=1e-5, atol=1e-7)
    assert not np.allclose(a, b)


@pytest.mark.parametrize("backend", ["compiled", "onnx"])
def test_explain_func_with_an_explainer_checks_it_is_the_models(backend, model, compiled, session, x):
    explainer = compiled if backend == "compiled" else session
    targets = np.array([2, 2, 5, 5])
    a = explain_func(model, x, targets, explainer=explainer)
    np.testing.assert_allclose(a, _reference(compiled, x, targets), rtol=1e-4,
                               atol=1e-6 * np.abs(a).max())
    np.testing.assert_allclose(explain_func(explainer, x, targets), a, rtol=1e-4, atol=1e-6 * np.abs(a).max())
    other = _tiny_resnet()
    with torch.no_grad():
        other.fc.bias.add_(1.0)
    with pytest.raises(InputError, match="not the one the explainer was compiled from"):
        explain_func(other, x, targets, explainer=explainer)
    with pytest.raises(InputError, match="compile arguments"):
        explain_func(model, x, targets, explainer=explainer, rules="epsilon")


def test_quantus_metrics_through_explain_func(model, compiled, x):
    quantus = pytest.importorskip("quantus")
    x01 = (x - x.min()) / (x.max() - x.min())  # Quantus' black baseline assumes inputs in [0, 1]
    y = compiled(torch.from_numpy(x01))[0].argmax(1).numpy()
    kwargs = {"rules": "otsuki2024-conserving"}
    # a faithfulness metric: the same scores from explain_func as from the explainer's own maps handed in
    metric = quantus.PixelFlipping(features_in_step=64, disable_warnings=True)
    via_func = metric(model=model, x_batch=x01, y_batch=y, a_batch=None, explain_func=explain_func,
                      explain_func_kwargs=kwargs, device="cpu")
    given = metric(model=model, x_batch=x01, y_batch=y, a_batch=_reference(compiled, x01, y), device="cpu")
    assert len(via_func) == len(x01)
    np.testing.assert_allclose(np.asarray(via_func, float), np.asarray(given, float), rtol=1e-5, atol=1e-6)
    # a randomisation metric: Quantus passes copies with randomised layers, and the explanations follow them
    mprt = quantus.MPRT(layer_order="top_down", seed=0, disable_warnings=True, return_last_correlation=True)
    scores = mprt(model=model, x_batch=x01, y_batch=y, a_batch=None, explain_func=explain_func,
                  explain_func_kwargs=kwargs, device="cpu")
    scores = np.asarray(scores, float)
    assert scores.shape == (len(x01),) and np.isfinite(scores).all()
    assert np.all(scores < 0.99), scores  # an explainer that ignored the randomised model would score 1
