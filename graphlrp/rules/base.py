"""LRP rules, the registry and shared modifiers: one small registered function per rule, composed from a few modifiers.

A rule receives a `RuleContext` (the op, the relevance R arriving at its output, and an emitter that appends
tensor ops to the explainer graph) and returns the relevance for each of the op's relevance inputs. Rules for
conv/linear layers follow one pattern (Zennit's idea of a rule): for each term k, an input modifier a_k, a weight
modifier W_k and a bias modifier b_k give z = Σ_k layer(a_k; W_k, b_k); the stabilised ratio s = R / stab(z) is
sent back through the transposed layer, R_in = Σ_k c_k · a_k ⊙ layerᵀ(s; W_k). Weight modifiers are applied once,
at compile time, so the explainer holds W⁺, W⁻, … as constants.
"""
from __future__ import annotations

import inspect as _inspect
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .. import ops
from ..derived import derive
from ..errors import PresetError, UnsupportedOpError
from ..graph import describe_node

AFFINE = (ops.CONV, ops.LINEAR)


@dataclass
class RuleSpec:
    name: str
    fn: Callable
    kinds: tuple
    defaults: dict
    doc: str


RULES: dict[str, RuleSpec] = {}


def rule(name: str, kinds: tuple):
    """Register `fn(ctx, **params)` as rule `name` for the given op kinds; its keyword defaults are its params."""

    def deco(fn):
        params = {k: p.default for k, p in list(_inspect.signature(fn).parameters.items())[1:]}
        if name in RULES:  # one function per rule name: a second would silently replace the first
            raise ValueError(f"rule {name!r} is already registered ({RULES[name].fn.__module__}.{RULES[name].fn.__name__})")
        RULES[name] = RuleSpec(name, fn, tuple(kinds), params, (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return deco


def get_rule(name: str, where: str) -> RuleSpec:
    if name not in RULES:
        raise PresetError(f"{where}: unknown rule {name!r}; known rules: {', '.join(sorted(RULES))}")
    return RULES[name]


# the values the rules' string parameters accept; checked when a preset is read, so a typo names its key
PARAM_CHOICES = {
    "stabilizer": ("add", "signed"),
    "bias": ("keep", "zero", "positive", "negative"),
    "input": ("activation", "ones"),
    "dead_units": ("drop", "spread"),
    "otherwise": ("error", "uniform"),
}
# where one rule's parameter takes other values than the shared choices above
RULE_PARAM_CHOICES = {
    ("avg2x2", "otherwise"): ("error", "window_average"),
    ("epsilon", "bias"): ("keep", "zero", "positive", "negative", "spread"),
}
NONNEGATIVE_PARAMS = ("epsilon", "gamma", "alpha", "beta", "cancelled")
TINY = 1e-30  # a normal float32 (smallest normal ≈ 1.2e-38) that keeps a denominator away from 0


def check_params(spec: RuleSpec, params: dict, where: str) -> None:
    """Validate a preset's parameters for rule `spec`; a PresetError names the offending key `where.param`."""
    for k, v in params.items():
        if k not in spec.defaults:
            raise PresetError(f"{where}.{k}: unknown parameter of rule {spec.name!r} "
                              f"(it takes: {', '.join(spec.defaults) or 'none'})")
        default = spec.defaults[k]
        choices = RULE_PARAM_CHOICES.get((spec.name, k), PARAM_CHOICES.get(k))
        if choices is not None:
            if v not in choices:
                raise PresetError(f"{where}.{k}: must be one of {', '.join(map(repr, choices))}, got {v!r}")
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise PresetError(f"{where}.{k}: must be a number, got {v!r}")
            if k in NONNEGATIVE_PARAMS and v < 0:
                raise PresetError(f"{where}.{k}: must be >= 0, got {v!r}")
        elif default is None:  # zbox bounds: a number or one number per channel
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) or (
                isinstance(v, list) and v and all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in v))
            if not ok:
                raise PresetError(f"{where}.{k}: must be a number or a list of numbers (one per channel), got {v!r}")
    if spec.name == "alpha_beta":
        alpha = params.get("alpha", spec.defaults["alpha"])
        beta = params.get("beta", spec.defaults["beta"])
        if abs(alpha - beta - 1) > 1e-9:
            raise PresetError(f"{where}: alpha_beta needs alpha - beta = 1 (got alpha={alpha}, beta={beta})")


# ------------------------------------------------------------------------------------------ modifiers
def stabilize(ctx, z, epsilon: float, stabilizer: str):
    """'add': z + ε (the released otsuki2024 code); 'signed': z + ε·sign(z) with sign(0) = +1 (Zennit)."""
    if epsilon == 0:
        return z
    if stabilizer == "add":
        return ctx.call(torch.add, z, epsilon)
    if stabilizer == "signed":
        return ctx.call(torch.where, ctx.call(torch.ge, z, 0.0), ctx.call(torch.add, z, epsilon),
                        ctx.call(torch.sub, z, epsilon))
    raise PresetError(f"stabilizer must be 'add' or 'signed', got {stabilizer!r}")


def broadcast_compact(t: torch.Tensor) -> torch.Tensor:
    """`t` with every dim along which it is constant cut to size 1: the same operand of a broadcasting op, stored
    once instead of once per position. A compile-time map of a linear layer, 1 / (W⁺·1), is the same at every
    token; at SAM's 4096 tokens it was 48 MB per layer, in memory and in the ONNX file."""
    for d in range(t.dim()):
        if t.shape[d] > 1:
            first = t.narrow(d, 0, 1)
            if torch.equal(t, first.expand_as(t)):
                t = first
    return t.contiguous()


def positive(w):
    return derive(torch.clamp, w, min=0)


def negative(w):
    return derive(torch.clamp, w, max=0)


def bias_mode(b, mode: str, weight_part: str = "all"):
    """The bias that goes with a weight modifier: 'keep', 'zero', or 'positive'/'negative' parts."""
    if b is None or mode == "zero":
        return None
    if mode == "keep":
        return b
    if mode in ("positive", "negative"):
        return positive(b) if mode == "positive" else negative(b)
    raise PresetError(f"bias must be 'keep', 'zero', 'positive' or 'negative', got {mode!r}")


@dataclass
class Term:
    """One summand of an affine rule: input a_k (a graph node or 'ones'), weight W_k, bias b_k, coefficient c_k."""

    input: object
    weight: torch.Tensor
    bias: torch.Tensor | None
    coefficient: float = 1.0


def affine_rule(ctx, groups: list[list[Term]], epsilon: float, stabilizer: str, masks=None):
    """R_in = Σ_groups Σ_terms c_k a_k ⊙ layerᵀ(mask_g ⊙ R / stab(Σ_terms layer(a_k; W_k, b_k)); W_k)."""
    total = None
    for gi, terms in enumerate(groups):
        z = None
        for t in terms:
            zk = ctx.affine(t.input, t.weight, t.bias)
            z = zk if z is None else ctx.call(torch.add, z, zk)
        s = ctx.call(torch.div, ctx.R, stabilize(ctx, z, epsilon, stabilizer))
        if masks is not None:
            s = ctx.call(torch.mul, s, masks[gi])
        for t in terms:
            back = ctx.affine_transpose(s, t.weight)
            if not (isinstance(t.input, str) and t.input == "ones"):
                back = ctx.call(torch.mul, t.input, back)
            if t.coefficient != 1.0:
                back = ctx.call(torch.mul, back, t.coefficient)
            total = back if total is None else ctx.call(torch.add, total, back)
    return [total]


def input_of(ctx, input: str):
    if input == "ones":  # ones where the input carries values; zeros where it is padding (explicit F.pad)
        support = ctx.input_support()
        return "ones" if support is None else support
    if input == "activation":
        return ctx.a
    raise PresetError(f"input must be 'activation' or 'ones', got {input!r}")


def signed_parts(ctx, a, weight, bias, bias_pos: str, bias_neg: str):
    """z⁺-style terms: (a⁺, W⁺) and (a⁻, W⁻); the a⁻ term is dropped where the input is known non-negative."""
    if isinstance(a, (str, torch.Tensor)) or ctx.nonnegative:
        return [Term(a, positive(weight), bias_mode(ctx.bias, bias_pos))]
    a_pos = ctx.call(torch.clamp, a, min=0)
    a_neg = ctx.call(torch.clamp, a, max=0)
    return [Term(a_pos, positive(weight), bias_mode(ctx.bias, bias_pos)),
            Term(a_neg, negative(weight), bias_mode(ctx.bias, bias_neg))]


