"""The two registries agree: every op graphlrp's describers accept (graphlrp/ops: `describes(modules=...,
functions=..., methods=...)`) has an ONNX converter (`graphlrp.fx_to_onnx.converts`), or a documented canonical
rewrite to one (`fx_to_onnx.CANONICAL_REWRITES`): an op that compiles also exports. One case per describer target,
generated from the registry; the checker itself (`fx_to_onnx.missing_converters`) is tested on planted entries."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from graphlrp import fx_to_onnx
from graphlrp.ops import base

TARGETS = fx_to_onnx.describer_targets()


@pytest.mark.parametrize("kind, target, name", TARGETS, ids=[f"{k}:{n}" for k, _, n in TARGETS])
def test_every_describer_target_has_an_onnx_converter(kind, target, name):
    assert fx_to_onnx.has_converter(kind, target), (
        f"{name} is described in graphlrp/ops (it compiles) but has no ONNX converter: add one with @converts in "
        "graphlrp/fx_to_onnx.py, or document the rewrite that replaces it in CANONICAL_REWRITES")


def test_the_registries_agree():
    assert fx_to_onnx.missing_converters() == []
    assert len(TARGETS) > 100  # the generator found the registries


class PlantedModule(nn.Module):
    def forward(self, x):
        return x


class PlantedSubclass(nn.ReLU):  # found through its MRO: nn.ReLU has a converter
    pass


def planted_function(x):
    return x


@pytest.fixture
def planted():
    """A describer for a fake module class, function and Tensor method, none with a converter; removed after."""
    before = dict(base._BY_MODULE), dict(base._BY_FUNCTION), dict(base._BY_METHOD)
    base.describes(modules=[PlantedModule, PlantedSubclass], functions=[planted_function],
                   methods=["planted_method"])(lambda node, traced: None)
    yield
    for registry, saved in zip((base._BY_MODULE, base._BY_FUNCTION, base._BY_METHOD), before):
        registry.clear()
        registry.update(saved)


def test_the_check_reports_a_planted_describer_without_converter(planted):
    missing = fx_to_onnx.missing_converters()
    assert f"{__name__}.PlantedModule" in missing
    assert f"{__name__}.planted_function" in missing
    assert "Tensor.planted_method" in missing
    assert not any("PlantedSubclass" in m for m in missing)  # a subclass of a converted module is converted
    assert len(missing) == 3


def test_a_canonical_rewrite_counts_as_a_converter(planted, monkeypatch):
    monkeypatch.setitem(fx_to_onnx.CANONICAL_REWRITES, planted_function, "rewritten to torch.mul before export")
    assert f"{__name__}.planted_function" not in fx_to_onnx.missing_converters()


def test_registering_a_converter_twice_raises(monkeypatch):
    monkeypatch.setattr(fx_to_onnx, "CONVERTERS", dict(fx_to_onnx.CONVERTERS))
    fx_to_onnx.converts(planted_function)(lambda g, x: x)
    with pytest.raises(ValueError, match="registered already"):
        fx_to_onnx.converts(planted_function)(lambda g, x: x)
    with pytest.raises(ValueError, match="F.pad is registered already"):
        fx_to_onnx.converts(F.pad)(lambda g, x, pad: x)
    with pytest.raises(ValueError, match="registered already"):  # nothing of a refused call is registered
        fx_to_onnx.converts("planted_method", torch.relu)(lambda g, x: x)
    assert "planted_method" not in fx_to_onnx.CONVERTERS


def test_one_call_may_name_the_same_target_twice(monkeypatch):
    monkeypatch.setattr(fx_to_onnx, "CONVERTERS", dict(fx_to_onnx.CONVERTERS))
    fx_to_onnx.converts(planted_function, planted_function)(lambda g, x: x)  # as F.prelu is torch.prelu
    assert F.prelu is torch.prelu and fx_to_onnx.CONVERTERS[F.prelu] is fx_to_onnx.CONVERTERS[torch.prelu]


def test_f_pad_has_one_converter_that_handles_every_mode():
    assert fx_to_onnx.CONVERTERS[F.pad] is fx_to_onnx._pad_any
