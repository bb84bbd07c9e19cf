"""graphlrp explainers in the conventions other attribution libraries use.

* `LRPAttribution(explainer).attribute(inputs, target=...)`: Captum's calling convention (`captum.attr.LRP`).
  `inputs` is a torch tensor or a numpy array, [N, C, H, W] or [C, H, W]; `target` None (each prediction), an int,
  a list, a numpy array or a tensor of classes; the relevance comes back with the input's shape and type (a tensor
  on the input's device and dtype for a tensor, an array for an array).
* `explain_func(model, inputs, targets, **kwargs)`: Quantus' convention (`quantus.explain`): numpy in, a float32
  numpy array of the input's shape out. Quantus hands the torch model it evaluates (for the randomisation metrics,
  copies with randomised layers), so by default `explain_func` compiles the model it is given, once per set of
  weights; `explainer=` uses an explainer compiled already, after checking that it computes what `model` computes.

`explainer` is a compiled `graphlrp.Explainer`, an `ExplainerSession` from `graphlrp.load`, or the path of an
explainer ONNX file. With an ONNX explainer nothing here imports torch (a tensor input means torch is there).
"""
from __future__ import annotations

import hashlib
import os
import sys
from typing import Any

import numpy as np

from .errors import InputError
from .runtime import ExplainerSession, load

# how far the logits of `explainer=` may differ from those of Quantus' `model` before explain_func refuses the
# explainer as not the model's (relative to the largest logit; float32 forward vs onnxruntime is ~1e-6)
SAME_MODEL_RTOL = 1e-3
_CACHE_SIZE = 4  # compiled explainers explain_func keeps, by model weights


def _torch_tensor(x) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _is_compiled(explainer) -> bool:
    if "torch" not in sys.modules:
        return False  # no torch imported: no compiled explainer can exist
    try:
        from .compiler import Explainer
    except ModuleNotFoundError:  # torch without the rest of the compile extra
        return False

    return isinstance(explainer, Explainer)


def _targets(target, n: int) -> np.ndarray | None:
    """None, an int, or N ints (list, tuple, array, tensor) -> None or int64 [N]. Raises InputError."""
    if target is None:
        return None
    if _torch_tensor(target):
        target = target.detach().cpu().numpy()
    try:
        values = np.asarray(target)
    except (TypeError, ValueError):
        values = np.asarray(None)
    if values.dtype == object or values.dtype.kind not in "iu" or values.ndim > 1 or (
            values.ndim == 1 and len(values) != n):
        raise InputError(f"target must be an integer class or {n} of them (one per input), got {target!r}; "
                         "multi-dimensional targets (tuples) are not supported: an explainer explains one class")
    return np.broadcast_to(values.astype(np.int64), (n,)).copy()


class LRPAttribution:
    """Captum-style LRP attribution with a graphlrp explainer: `LRPAttribution(explainer).attribute(x, target=k)`.

    Unlike `captum.attr.LRP`, the rules are the ones the explainer was compiled with (its preset, shown in
    `preset`), and the relevance is that of the output the preset names (`output_relevance`: "probability" or
    "logit")."""

    def __init__(self, explainer):
        if isinstance(explainer, (str, os.PathLike)):
            explainer = load(explainer)
        if not isinstance(explainer, ExplainerSession) and not _is_compiled(explainer):
            raise InputError(f"LRPAttribution needs a graphlrp.Explainer, an ExplainerSession (graphlrp.load) or "
                             f"the path of an explainer .onnx file, got {type(explainer).__name__}")
        self.explainer = explainer

    @property
    def preset(self) -> str | None:
        e = self.explainer
        return e.metadata.get("preset") if isinstance(e, ExplainerSession) else getattr(e.preset, "name", None)

    @property
    def output_relevance(self) -> str | None:
        e = self.explainer
        return e.metadata.get("output_relevance") if isinstance(e, ExplainerSession) else e.info.get(
            "output_relevance")

    def attribute(self, inputs, target=None, return_convergence_delta: bool = False, **kwargs):
        """Relevance of `inputs` for `target`, with the input's shape and type. `return_convergence_delta=True`
        also returns, per sample, Σ relevance minus the explained output's relevance at the top (what Captum
        calls the convergence delta; zero for a conserving preset)."""
        if kwargs:
            raise InputError(f"LRPAttribution.attribute takes inputs, target and return_convergence_delta; "
                             f"{', '.join(sorted(kwargs))} not supported")
        if isinstance(inputs, (tuple, list)) and inputs and (_torch_tensor(inputs[0]) or
                                                             isinstance(inputs[0], np.ndarray)):
            raise InputError("LRPAttribution explains one input tensor; a tuple of inputs is not supported")
        tensor = _torch_tensor(inputs)
        x = inputs.detach().cpu().numpy() if tensor else np.asarray(inputs)
        single = x.ndim == 3
        batch = x[None] if single else x
        relevance, top = self._explain(batch, _targets(target, len(batch)))
        out = relevance[0] if single else relevance
        if tensor:
            torch = sys.modules["torch"]
            out = torch.from_numpy(np.ascontiguousarray(out)).to(device=inputs.device, dtype=inputs.dtype)
        elif np.issubdtype(x.dtype, np.floating):
            out = out.astype(x.dtype, copy=False)
        if not return_convergence_delta:
            return out
        delta = relevance.reshape(len(relevance), -1).astype(np.float64).sum(axis=1) - top
        if tensor:
            delta = sys.modules["torch"].from_numpy(delta).to(device=inputs.device, dtype=inputs.dtype)
        return out, delta

    def _explain(self, x: np.ndarray, targets: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(relevance [N, C, H, W] float32, relevance of the explained output [N]) for a batch."""
        e = self.explainer
        if isinstance(e, ExplainerSession):
            explanations = e.explain(x, targets)
            relevance = np.stack([exp.relevance for exp in explanations])
            logits = np.stack([exp.logits for exp in explanations])
            chosen = np.array([exp.target for exp in explanations])
        else:
            import torch

            device = next(iter(e.parameters()), torch.empty(0)).device
            if x.ndim != 4:
                raise InputError(f"input has shape {list(x.shape)}; the explainer takes [C, H, W] or [N, C, H, W]")
            if targets is not None and e.num_classes and ((targets < -1) | (targets >= e.num_classes)).any():
                bad = int(targets[(targets < -1) | (targets >= e.num_classes)][0])
                raise InputError(f"unknown target class {bad}: this explainer has {e.num_classes} classes")
            xt = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32), device=device)
            tt = None if targets is None else torch.as_tensor(targets, device=device)
            logits_t, relevance_t = e(xt, tt)
            relevance, logits = relevance_t.float().cpu().numpy(), logits_t.float().cpu().numpy()
            chosen = logits.argmax(axis=1) if targets is None else np.where(targets < 0, logits.argmax(axis=1),
                                                                            targets)
        picked = logits[np.arange(len(logits)), chosen].astype(np.float64)
        if self.output_relevance == "probability":
            z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
            picked = np.exp(z[np.arange(len(z)), chosen]) / np.exp(z).sum(axis=1)
        return relevance, picked


# -- Quantus ----------------------------------------------------------------------------------------------------

_compiled: dict[tuple, Any] = {}


def _fingerprint(model) -> tuple:
    """Identity of a torch model's weights: its id, class and a digest of every parameter and buffer."""
    digest = hashlib.blake2b(digest_size=16)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        digest.update(name.encode())
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return id(model), type(model).__qualname__, digest.hexdigest()


def _compile_for(model, inputs: np.ndarray, compile_kwargs: dict):
    import torch

    import graphlrp

    key = _fingerprint(model) + (tuple(inputs.shape[1:]), repr(sorted(compile_kwargs.items())))
    if key not in _compiled:
        if len(_compiled) >= _CACHE_SIZE:
            _compiled.pop(next(iter(_compiled)))
        device = next(iter(model.parameters()), torch.empty(0)).device
        example = torch.as_tensor(np.ascontiguousarray(inputs[:1], dtype=np.float32), device=device)
        kwargs = dict({"allow_vanishing": True}, **compile_kwargs)
        was_training = model.training
        try:
            _compiled[key] = graphlrp.compile(model.eval(), example, **kwargs)
        finally:
            model.train(was_training)
    return _compiled[key]


def _check_same_model(model, attribution: LRPAttribution, inputs: np.ndarray) -> None:
    """Refuse an `explainer=` that does not compute what Quantus' `model` computes (a randomised copy, say):
    explaining it would report the original model's relevance for the randomised one."""
    import torch

    device = next(iter(model.parameters()), torch.empty(0)).device
    was_training = model.training
    try:
        with torch.no_grad():
            ours = model.eval()(torch.as_tensor(np.ascontiguousarray(inputs, dtype=np.float32), device=device))
    finally:
        model.train(was_training)
    ours = ours.float().cpu().numpy()
    e = attribution.explainer
    if isinstance(e, ExplainerSession):
        theirs = np.stack([exp.logits for exp in e.explain(np.ascontiguousarray(inputs, dtype=np.float32))])
    else:
        with torch.no_grad():
            theirs = e(torch.as_tensor(np.ascontiguousarray(inputs, dtype=np.float32),
                                       device=next(iter(e.parameters()), torch.empty(0)).device))[0]
        theirs = theirs.float().cpu().numpy()
    scale = max(float(np.abs(ours).max()), 1e-12)
    diff = float(np.abs(ours - theirs).max()) / scale if ours.shape == theirs.shape else float("inf")
    if diff > SAME_MODEL_RTOL:
        raise InputError(f"explain_func: the model Quantus passed is not the one the explainer was compiled from "
                         f"(outputs differ by {diff:.2e} relative, limit {SAME_MODEL_RTOL:g}; a randomisation "
                         f"metric passes randomised copies): leave explainer= out to compile each model")


def explain_func(model, inputs, targets, explainer=None, device=None, **kwargs) -> np.ndarray:
    """Quantus' `explain_func`: relevance of `inputs` [N, C, H, W] for `targets` [N] as float32 numpy.

    `model` is what Quantus evaluates: a torch model (compiled here, once per set of weights, with the keyword
    arguments of `graphlrp.compile` given in `kwargs`, e.g. `rules="epsilon"`; `allow_vanishing` defaults to True
    since metrics often use untrained models), or a graphlrp explainer. `explainer=` (an `Explainer`,
    `ExplainerSession` or .onnx path) uses that explainer instead, after checking that it computes what `model`
    computes. Pass these through Quantus' `explain_func_kwargs`. `device` (Quantus adds it) is accepted: a compiled
    explainer runs where the model's weights are, an ONNX one on its session's providers."""
    x = inputs.detach().cpu().numpy() if _torch_tensor(inputs) else np.asarray(inputs)
    if x.ndim != 4:
        raise InputError(f"explain_func takes inputs [N, C, H, W], got shape {list(x.shape)}")
    if explainer is not None:
        if kwargs:
            raise InputError(f"explain_func: {', '.join(sorted(kwargs))} are compile arguments, but explainer= "
                             "is compiled already")
        attribution = LRPAttribution(explainer)
        if model is not None and model is not explainer and not isinstance(model, ExplainerSession) \
                and not _is_compiled(model):
            _check_same_model(model, attribution, x)
    elif isinstance(model, (ExplainerSession, str, os.PathLike)) or _is_compiled(model):
        if kwargs:
            raise InputError(f"explain_func: {', '.join(sorted(kwargs))} are compile arguments, but the model is "
                             "a compiled explainer")
        attribution = LRPAttribution(model)
    elif "torch" in sys.modules and isinstance(model, sys.modules["torch"].nn.Module):
        attribution = LRPAttribution(_compile_for(model, x, kwargs))
    else:
        raise InputError(f"explain_func needs a torch model or a graphlrp explainer, got {type(model).__name__}")
    relevance = attribution.attribute(np.ascontiguousarray(x, dtype=np.float32),
                                      target=None if targets is None else _targets(targets, len(x)))
    return np.asarray(relevance, dtype=np.float32)
