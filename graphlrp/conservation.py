"""Conservation of one call, checked per sample by the PyTorch explainer and by the runtime alike (numpy only: the
runtime installs no torch).

A preset that declares `conserving = true` promises ΣR_in = R_out per sample, R_out being the target's logit or
probability. The compile's certificate checks that on its example; an explainer whose rules hold there can still
meet an input where float32 arithmetic breaks the promise (a unit whose contributions cancel, an ε that absorbs).
That input gets an error, not a map, like one whose relevance is not finite."""
from __future__ import annotations

import numpy as np

CONSERVATION_TOLERANCE = 1e-3  # |ΣR_in − R_out| relative to R_out: the conserving presets' promise
# float32 rounding of the relevance pass scales with Σ|R_in| (relevance of both signs cancelling): a chosen class
# whose R_out is ~0 may depart by this fraction of Σ|R_in|, up to 1e-3 of the predicted class's R_out
ROUNDING_FLOOR = 1e-6


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


def departures(logits, relevance_sums, relevance_magnitudes, target, kind: str) -> dict[int, float]:
    """{sample: ΣR_in / R_out} for the samples that do not conserve: |ΣR_in − R_out| above the larger of
    CONSERVATION_TOLERANCE·|R_out| and a rounding allowance, ROUNDING_FLOOR·Σ|R_in| capped at
    CONSERVATION_TOLERANCE times the predicted class's |R_out|. For the predicted class that is the certificate's
    |ΣR_in / R_out − 1| ≤ 1e-3 whatever Σ|R_in| is: a map whose relevance grew to 10⁶× the output in both signs
    rounds its sum percents away and does not add up to the prediction. A chosen class whose logit is ~0 (its
    map's relevance of both signs sums to ~0) may depart by float32 rounding of Σ|R_in|, never by more than 1e-3
    of the prediction. `relevance_sums` and `relevance_magnitudes` are ΣR_in and Σ|R_in| per sample. Samples
    whose relevance is not finite are left to the finiteness check."""
    r_out = output_relevance(logits, target, kind)
    predicted = np.abs(output_relevance(logits, np.full(len(r_out), -1), kind))
    r_in = np.asarray(relevance_sums, np.float64).reshape(-1)
    magnitude = np.asarray(relevance_magnitudes, np.float64).reshape(-1)
    rounding = np.minimum(ROUNDING_FLOOR * magnitude, CONSERVATION_TOLERANCE * predicted)
    gap = np.abs(r_in - r_out)
    with np.errstate(all="ignore"):
        bad = np.isfinite(r_in) & (gap > np.maximum(CONSERVATION_TOLERANCE * np.abs(r_out), rounding))
        ratio = r_in / r_out
    return {int(i): float(ratio[i]) for i in np.flatnonzero(bad)}


def array_departures(logits, relevance, target, kind: str) -> dict[int, float]:
    """`departures` for numpy arrays: logits [N, K], relevance [N, ...], target [N]."""
    flat = np.asarray(relevance, np.float64).reshape(len(logits), -1)
    return departures(logits, flat.sum(axis=1), np.abs(flat).sum(axis=1), target, kind)
