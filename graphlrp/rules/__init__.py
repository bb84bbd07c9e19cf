"""LRP rules: one small registered function per rule (`@rule(name, kinds)`), grouped by op family.

`base` holds the registry, parameter checks and the shared modifiers; `affine` the conv/linear rules (Zennit's
pattern: input, weight and bias modifiers), `elementwise` pass-through, `pooling` the pool and reduction rules,
`merges` the relevance splits, `structure` the exact adjoints of ops that only move values, `attention` the
softmax, product, LayerNorm, position-embedding and class-token rules of vision transformers. Adding a rule means
adding one decorated function to its family.
"""
from .base import *  # noqa: F401,F403
from .base import (AFFINE, NONNEGATIVE_PARAMS, PARAM_CHOICES, RULES, RuleSpec, Term, affine_rule, bias_mode,  # noqa: F401
                   check_params, get_rule, negative, positive, rule, stabilize)
from . import affine, elementwise, pooling, merges, structure, attention  # noqa: E402,F401  (registration)
from .affine import *  # noqa: F401,F403,E402
from .elementwise import pass_rule  # noqa: F401,E402
from .merges import SPLITS, split_rule  # noqa: F401,E402
from .pooling import z_pool_rule, winner_take_all_rule  # noqa: F401,E402
from .structure import STRUCTURAL, move_map, move_relevance, structural_relevance  # noqa: F401,E402
