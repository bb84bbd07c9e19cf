"""Faithfulness evaluation: the insertion/deletion protocol of Otsuki et al. (ECCV 2024) for graphlrp and baselines.

`data` reads image sets, `metrics` holds the protocol itself, `methods` the registry of attribution methods,
`runner` ties them together for `graphlrp evaluate`, `plots` and `report` write what a run produced.
Submodules import torch and the baseline libraries, so this package file stays light.
"""
from ..errors import GraphLRPError


class EvaluationError(GraphLRPError):
    """An evaluation cannot run as asked: unreadable image set, unknown method name, images that do not fit."""
