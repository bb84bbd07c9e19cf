"""Pass-through: elementwise layers, identities, constant adds and scales, gates, normalisations."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from ..errors import PresetError, UnsupportedOpError
from ..graph import describe_node
from .base import AFFINE, Term, affine_rule, bias_mode, negative, positive, rule, stabilize, input_of, signed_parts  # noqa: F401


# ------------------------------------------------------------------------------------------ pass-through
@rule("pass", (ops.CONV, ops.LINEAR, ops.BATCHNORM, ops.ACTIVATION, ops.IDENTITY, ops.BIAS_ADD, ops.SCALE, ops.GATE,
               ops.MAXPOOL, ops.AVGPOOL, ops.NORM))
def pass_rule(ctx):
    """pass-through: R_in = R (elementwise layers; x + constant; the gated operand of a gate; normalisations with
    the normaliser held constant). Where the input broadcasts, relevance is summed back to its shape."""
    if ctx.op.kind in (ops.MAXPOOL, ops.AVGPOOL, ops.CONV, ops.LINEAR) and ctx.op.in_shape != ctx.op.out_shape:
        raise UnsupportedOpError(f"{describe_node(ctx.op.node)}: 'pass' needs equal input and output shapes")
    return [ctx.to_input_shape(ctx.R, 0)]
