"""What each traced node *is*, in LRP terms: `describe(node, traced) -> Op`.

The registry and the generic fallbacks are in `base`; describers are grouped by op family: `layers` (conv,
linear, batch norm), `elementwise` (activations, identities, gates and scales), `merges` (sums of input-dependent
tensors), `pooling` (pools and reductions), `norms` (layer/group/instance norms), `structure` (ops that only
move values) and `attention` (softmax, products of two signals). Adding a spelling means adding one describer to its family.
"""
from .base import *  # noqa: F401,F403
from .base import (AVGPOOL, BATCHNORM, BIAS_ADD, CAT, CONST_CAT, MATMUL, SOFTMAX, CONV, GATE, IDENTITY, LINEAR, MAXPOOL, MERGE, MOVE, NORM,  # noqa: F401
                   PAD, PRODUCT, MAX_REDUCE, REDUCE, RESHAPE, SCALE, SLICE, UNSUPPORTED, ACTIVATION, Op, arg, describe, describes,
                   dynamic_tensor_inputs, evaluate_constant, is_dynamic_tensor, is_tensor, pair, value)
from . import layers, elementwise, merges, pooling, norms, structure, attention  # noqa: E402,F401  (registration)
from .layers import grouped_linear, grouped_linear_transposed  # noqa: E402,F401  (written by decompose, lowered by fx_to_onnx)

_arg, _pair, _evaluate_constant = arg, pair, evaluate_constant  # older private names
