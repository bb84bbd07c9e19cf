"""graphlrp: compile PyTorch ResNets into explicit, stateless LRP explainers (Otsuki et al., ECCV 2024)."""
from __future__ import annotations

from .version import __version__  # noqa: F401

from .errors import (CompileError, ConservationError, ExportError, GraphLRPError, ModelSpecError,  # noqa: F401
                     PresetError, TraceError, UnsupportedOpError, VanishingRelevanceError, WeightsError)


def __getattr__(name):
    # heavy imports (torch) only when the compiler is used; `graphlrp.load` needs onnxruntime only
    if name in ("compile", "inspect", "Explainer"):
        from . import compiler

        return getattr(compiler, name)
    if name == "load":
        from .runtime import load

        return load
    raise AttributeError(name)
