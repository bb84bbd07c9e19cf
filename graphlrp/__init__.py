"""graphlrp: compile PyTorch CNNs and transformers into explicit, self-verified LRP explainers (relevance splitting
at residual adds, Otsuki et al., ECCV 2024; AttnLRP/CP-LRP for attention), export them to ONNX, and explain, serve or
export them with onnxruntime alone.

Importing graphlrp imports no torch: `compile`, `inspect` and `Explainer` load the compiler (the compile extra) on
first use; `load` and `adapters` need only the runtime dependencies."""
from __future__ import annotations

from .version import __version__  # noqa: F401

from .errors import (CompileError, ConservationError, ExportError, GraphLRPError, InputError, MissingExtraError,  # noqa: F401
                     ModelSpecError, NonFiniteRelevanceError, NotConservedError, PresetError, RelevanceCheckError,
                     TraceError, UnsupportedOpError, VanishingRelevanceError, WeightsError, missing_compile_extra)


def __getattr__(name):
    # heavy imports (torch) only when the compiler is used; `graphlrp.load` needs onnxruntime only
    if name in ("compile", "inspect", "Explainer"):
        try:
            from . import compiler
        except ModuleNotFoundError as e:
            error = missing_compile_extra(e, f"graphlrp.{name}")
            if error is None:
                raise
            raise error from None
        return getattr(compiler, name)
    if name == "load":
        from .runtime import load

        return load
    raise AttributeError(name)
