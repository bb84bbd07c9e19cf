"""Rule weights that are functions of model weights, with the recipe that made them.

A rule computes W⁺ = max(W, 0), W⁻, a flipped kernel or a transposed matrix eagerly (the PyTorch explainer uses the
tensor), and `derive` remembers how: the function, the tensor it was applied to and the other arguments. The
exported ONNX graph then stores only the base tensor and computes the derived one with the recipe's ops
(onnxruntime folds them back into constants when it creates a session), so each weight is stored once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

_ATTR = "_graphlrp_recipe"


@dataclass(frozen=True, eq=False)
class Recipe:
    """`fn(base, *args, **kwargs)`: how a derived constant is computed from the tensor it derives from."""

    fn: Callable
    base: torch.Tensor
    args: tuple = ()
    kwargs: dict | None = None


def derive(fn: Callable, base: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """fn(base, *args, **kwargs), tagged with its recipe."""
    out = fn(base, *args, **kwargs)
    if out is not base:
        setattr(out, _ATTR, Recipe(fn, base, args, kwargs or None))
    return out


def recipe(tensor) -> Recipe | None:
    """The recipe of a tensor made by `derive`, else None."""
    return getattr(tensor, _ATTR, None)
