"""Conservation of one call, checked per sample by the PyTorch explainer and by the runtime alike (numpy only: the
runtime installs no torch).

A preset that declares `conserving = true` promises ΣR_in = R_out per sample, R_out being the target's logit or
probability. The compile's certificate checks that on its example; an explainer whose rules hold there can still
meet an input where float32 arithmetic breaks the promise (a unit whose contributions cancel, an ε that absorbs).
That input gets an error, not a map, like one whose relevance is not finite."""
from __future__ import annotations

import numpy as np

CONSERVATION_TOLERANCE = 1e-3  # |ΣR_in − R_out| relative to the prediction's output: the conserving presets' promise


def output_relevance(logits: np.ndarray, target: np.ndarray, kind: str) -> np.ndarray:
    """R_out per sample (float64): the target's logit (kind "logit") or probability ("probability"); a target
    of -1 means the predicted class."""
    logits = np.asarray(logits, np.float64)
    target = np.asarray(target).reshape(-1)
    chosen = np.where(target < 0, logits.argmax(axis=1), target)
    if kind == "probability":
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        logits = shifted / shifted.sum(axis=1, keepdims=True)
    return logits[np.arange(len(logits)), chosen]


def departures(logits, relevance_sums, target, kind: str) -> dict[int, float]:
    """{sample: ΣR_in / R_out} for the samples that do not conserve: |ΣR_in − R_out| above CONSERVATION_TOLERANCE
    times the larger of |R_out| and the predicted class's |R_out|. For the predicted class that is the ratio
    |ΣR_in / R_out − 1| ≤ 1e-3 the certificate checks; a chosen class whose logit is ~0 is held to 1e-3 of the
    prediction's scale (its map carries relevance of both signs that sums to ~0). The relevance's own magnitude
    excuses nothing: a map whose relevance grew to 10⁶× the output in both signs rounds its sum far from R_out,
    and does not add up to the prediction. Samples whose relevance is not finite are left to the finiteness
    check."""
    r_out = output_relevance(logits, target, kind)
    scale = np.maximum(np.abs(r_out), np.abs(output_relevance(logits, np.full(len(r_out), -1), kind)))
    r_in = np.asarray(relevance_sums, np.float64).reshape(-1)
    gap = np.abs(r_in - r_out)
    with np.errstate(all="ignore"):
        bad = np.isfinite(r_in) & (gap > CONSERVATION_TOLERANCE * scale)
        ratio = r_in / r_out
    return {int(i): float(ratio[i]) for i in np.flatnonzero(bad)}


def array_departures(logits, relevance, target, kind: str) -> dict[int, float]:
    """`departures` for numpy arrays: logits [N, K], relevance [N, ...], target [N]."""
    flat = np.asarray(relevance, np.float64).reshape(len(logits), -1)
    return departures(logits, flat.sum(axis=1), target, kind)
