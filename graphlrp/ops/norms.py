"""Normalisations other than batch norm: layer norm (also channels-first LayerNorm2d, which traces to a permute
around `F.layer_norm`), group norm, instance norm, local response norm, L2 normalisation.

All are NORM ops (rule category `normalization`). The default rule is the identity rule of AttnLRP (Achtibat et
al., ICML 2024): with the normaliser held constant the op is an elementwise affine map, through which relevance
passes; the affine weight and bias are a scale and a shift. Spelled-out normalisers (EvoNorm, FRN) reach the
same rule through `elementwise`: a divisor or a broadcast multiplier computed from the input is held constant.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import NORM, Op, describes


@describes(modules=[nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm,
                    getattr(nn, "RMSNorm", nn.LayerNorm)],
           functions=[F.layer_norm, torch.layer_norm, F.group_norm, torch.group_norm, F.instance_norm,
                      torch.instance_norm, F.local_response_norm, F.normalize, "F.rms_norm", "torch.rms_norm"])
def _norm(node, traced):
    return Op(NORM, node, (node.args[0],))
