"""Errors a user can act on. The command line prints these without a traceback."""


class GraphLRPError(Exception):
    """Base class: a problem with the user's model, preset, input or file, explained in the message."""


class TraceError(GraphLRPError):
    """torch.fx could not trace the model, or traced something graphlrp cannot explain."""


class UnsupportedOpError(GraphLRPError):
    """An op on the relevance path has no rule. The message names the node, the op and the source line."""


class CompileError(GraphLRPError):
    """Compilation failed for a reason graphlrp did not foresee; the message names the stage and the cause."""


class ConservationError(CompileError):
    """The compiled explainer failed its own check (`graphlrp.verify`): its forward differs from the model's, its
    relevance is not finite, a merge does not split exactly, or a conserving preset does not conserve. The message
    names the first node of the relevance pass where the sum departs: node, op, rule, source line, sums."""


class VanishingRelevanceError(ConservationError):
    """The relevance of a non-conserving preset vanishes (or grows) between output and input; the message names the
    node where. `compile(..., allow_vanishing=True)` turns it into a warning."""


class RelevanceCheckError(GraphLRPError):
    """The explainer's relevance on an input failed the check every call makes (it passed its check on the compile
    example): that input cannot be explained, and gets this error instead of a map. The server answers 422."""


class NonFiniteRelevanceError(RelevanceCheckError):
    """The explainer's relevance is NaN or infinite on an input: the message names the samples and the first node
    of the relevance pass where the relevance stops being finite."""


class NotConservedError(RelevanceCheckError):
    """An explainer whose preset declares itself conserving does not conserve on an input (|ΣR_in / R_out − 1| >
    1e-3, beyond float32 rounding): the message names the samples, their ratios and, in PyTorch, the first node
    of the relevance pass where the sum departs."""


class PresetError(GraphLRPError):
    """A rule preset (TOML) is unknown or malformed. The message names the offending key."""


class ModelSpecError(GraphLRPError):
    """A model name or factory path could not be resolved."""


class WeightsError(GraphLRPError):
    """Weights could not be loaded (offline, missing file, mismatched keys)."""


class ExportError(GraphLRPError):
    """ONNX export failed its checker or its onnxruntime parity check."""


class ExplainerLoadError(GraphLRPError):
    """An explainer ONNX file could not be opened: missing, not a graphlrp explainer, or the execution provider is absent."""


class ImageError(GraphLRPError):
    """An image could not be read or decoded. The message names the file."""


class InputError(GraphLRPError):
    """An input array or target class does not fit the explainer (wrong shape, non-finite values, unknown class)."""


class MissingExtraError(GraphLRPError, ImportError):
    """A part of graphlrp needs an optional dependency that is not installed; the message says which extra to
    install. The runtime (explain, serve, export-triton, `graphlrp.load`) needs none of the compile extra."""


COMPILE_MODULES = ("torch", "torchvision", "networkx", "onnx")


def missing_compile_extra(error: ModuleNotFoundError, what: str) -> MissingExtraError | None:
    """The error to raise when `what` failed to import one of the compile extra's packages, else None."""
    root = (error.name or "").split(".")[0]
    if root not in COMPILE_MODULES:
        return None
    return MissingExtraError(f"{what} needs the compile extra: pip install 'graphlrp[compile]' "
                             f"({root} is not installed; explain, serve and export-triton run without it)")
