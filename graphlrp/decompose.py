"""Attention decomposed, and recurrent layers unrolled, at compile time into the ops that carry LRP rules.

`nn.MultiheadAttention` (a leaf module to torch.fx) and `F.scaled_dot_product_attention` (one fused kernel) hide
the parts that AttnLRP and CP-LRP give different rules: the projections (linear layers), the scores Q·Kᵀ and the
weighted values A·V (products of two input-dependent tensors), and the softmax. This pass rewrites each of them in
the traced graph as those parts, written with `F.linear`, `reshape`, `einsum` and `softmax`, so the ordinary
describers and rules apply. The forward value is unchanged (up to float rounding of a different kernel).

`nn.LSTM`, `nn.GRU` and `nn.RNN` (leaf modules as well) are unrolled over their time steps, which are fixed at compile
time: each step becomes a linear layer over [x_t, h_{t-1}], sigmoid gates, tanh candidates, products and sums.
The gates are recognised as gates (a [0, 1] gate times a tanh signal gates the signal), so relevance follows the
signal path and the gates are held constant, as in Arras et al. (2017, "Explaining recurrent neural network
predictions in sentiment analysis"); the linear layers and the sums get the preset's rules.
Both directions of a bidirectional layer, and independent layers of one configuration, are unrolled side by side
(`side_by_side`, `grouped_linear`): a step of all of them is one node per gate.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .errors import UnsupportedOpError
from .graph import SIZE_ONLY, describe_node
from .ops.layers import grouped_linear


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _attention(graph: fx.Graph, q, k, v, scale: float, mask, equation_scores: str, equation_values: str):
    """softmax(scale·Q·Kᵀ + mask)·V as separate nodes; returns (output, attention weights)."""
    q = graph.call_function(operator.mul, (q, scale))
    scores = graph.call_function(torch.einsum, (equation_scores, q, k))
    if mask is not None:
        scores = graph.call_function(operator.add, (scores, mask))
    weights = graph.call_function(torch.softmax, (scores, -1))
    return graph.call_function(torch.einsum, (equation_values, weights, v)), weights


def _additive_mask(gm: fx.GraphModule, node: fx.Node, mask, is_causal: bool, shape_q, shape_k):
    """An attention mask as a tensor added to the scores: float masks as they are, boolean masks (True = attend)
    as 0 / -inf, `is_causal` as a lower-triangular 0 / -inf constant. A float mask may depend on the input (SAM's
    decomposed relative-position bias, computed from Q): it is then a second signal added to the scores, which
    the rules treat like any other sum (with the softmax held constant, CP-LRP, it receives nothing)."""
    graph = gm.graph
    if isinstance(mask, fx.Node):
        if mask.meta.get("dynamic") and mask.meta.get("dtype") == torch.bool:
            raise UnsupportedOpError(f"{describe_node(node)}: a boolean attention mask that depends on the input")
        if mask.meta.get("dtype") == torch.bool:
            mask = graph.call_function(torch.where, (mask, 0.0, float("-inf")))
    elif mask is not None:
        raise UnsupportedOpError(f"{describe_node(node)}: attention mask {type(mask).__name__}")
    if is_causal:
        L, S = shape_q[-2], shape_k[-2]
        causal = torch.zeros(L, S).masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), float("-inf"))
        name = f"_lrp_causal_{node.name}"
        gm.register_buffer(name, causal)
        causal_node = graph.get_attr(name)
        mask = causal_node if mask is None else graph.call_function(operator.add, (mask, causal_node))
    return mask


def _sdpa(gm: fx.GraphModule, node: fx.Node) -> None:
    q, k, v = (_arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    mask = _arg(node, 3, "attn_mask")
    dropout = _arg(node, 4, "dropout_p", 0.0)
    is_causal = _arg(node, 5, "is_causal", False)
    scale = _arg(node, 6, "scale")
    if not (isinstance(dropout, (int, float)) and dropout == 0):
        raise UnsupportedOpError(f"{describe_node(node)}: attention dropout {dropout!r} (the explainer runs in eval "
                                 "mode; pass dropout_p=0.0 outside training)")
    if not isinstance(is_causal, bool) or not (scale is None or isinstance(scale, (int, float))):
        raise UnsupportedOpError(f"{describe_node(node)}: is_causal and scale must be compile-time constants")
    shape_q, shape_k = q.meta["shape"], k.meta["shape"]
    gqa = _arg(node, 7, "enable_gqa", False)
    if not isinstance(gqa, bool):
        raise UnsupportedOpError(f"{describe_node(node)}: enable_gqa must be a compile-time constant")
    scale = 1.0 / math.sqrt(shape_q[-1]) if scale is None else float(scale)
    if shape_k[-2] != v.meta["shape"][-2]:
        raise UnsupportedOpError(f"{describe_node(node)}: keys and values of different lengths")
    with gm.graph.inserting_before(node):
        k, v = (_heads_as_query(gm.graph, node, t, tuple(shape_q[:-2]), gqa) for t in (k, v))
        mask = _additive_mask(gm, node, mask, is_causal, shape_q, shape_k)
        out, _ = _attention(gm.graph, q, k, v, scale, mask, "...ld,...sd->...ls", "...ls,...sd->...ld")
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)


def _heads_as_query(graph: fx.Graph, node: fx.Node, t: fx.Node, lead_q: tuple, gqa: bool) -> fx.Node:
    """Keys or values with the query's leading (batch, head) dims, written as moves whose relevance adjoint sums
    the copies: broadcast dims (multi-query attention: one key head for all query heads, MobileNetV5) expanded,
    and with `enable_gqa` each of G key heads repeated H/G times (`repeat_interleave` on the head dim, as
    PyTorch's grouped-query attention does)."""
    shape = tuple(t.meta["shape"])
    lead, tail = shape[:-2], shape[-2:]
    if lead == lead_q:
        return t
    where = f"{describe_node(node)}: attention over shapes {lead_q + tail}, {shape}"
    if len(lead) != len(lead_q):
        raise UnsupportedOpError(f"{where}: queries and keys of different ranks")
    if gqa and lead[:-1] == lead_q[:-1] and lead[-1] and lead_q[-1] % lead[-1] == 0:
        g = lead_q[-1] // lead[-1]
        t = graph.call_function(torch.unsqueeze, (t, -3))
        t = graph.call_method("expand", (t, *([-1] * len(lead)), g, -1, -1))
        return graph.call_method("reshape", (t, -1, *lead_q[1:], *tail))
    if any(a != b and a != 1 for a, b in zip(lead, lead_q)):
        raise UnsupportedOpError(f"{where} (heads that neither match nor broadcast; grouped-query attention needs "
                                 "enable_gqa=True)")
    return graph.call_method("expand", (t, *[-1 if a == b else b for a, b in zip(lead, lead_q)], -1, -1))


def _mha(gm: fx.GraphModule, node: fx.Node, m: nn.MultiheadAttention) -> None:
    query, key, value = (_arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    need_weights = _arg(node, 4, "need_weights", True)
    average = _arg(node, 6, "average_attn_weights", True)
    if not m.batch_first:
        raise UnsupportedOpError(f"{describe_node(node)}: nn.MultiheadAttention with batch_first=False")
    if m.bias_k is not None or m.add_zero_attn:
        raise UnsupportedOpError(f"{describe_node(node)}: nn.MultiheadAttention with add_bias_kv or add_zero_attn")
    for i, name in ((3, "key_padding_mask"), (5, "attn_mask")):
        if _arg(node, i, name) is not None:
            raise UnsupportedOpError(f"{describe_node(node)}: nn.MultiheadAttention with {name}")
    if _arg(node, 7, "is_causal", False):
        raise UnsupportedOpError(f"{describe_node(node)}: nn.MultiheadAttention with is_causal")
    E, H = m.embed_dim, m.num_heads
    d = E // H
    if m._qkv_same_embed_dim:
        weights = m.in_proj_weight.detach().chunk(3)
    else:
        weights = (m.q_proj_weight.detach(), m.k_proj_weight.detach(), m.v_proj_weight.detach())
    biases = m.in_proj_bias.detach().chunk(3) if m.in_proj_bias is not None else (None,) * 3
    prefix = f"_lrp_{node.name}"
    graph = gm.graph
    existing = set(graph.nodes)

    def constant(name, t):
        if t is None:
            return None
        gm.register_buffer(f"{prefix}_{name}", t.clone())
        return graph.get_attr(f"{prefix}_{name}")

    L, S = query.meta["shape"][1], key.meta["shape"][1]
    projections = []
    with graph.inserting_before(node):
        heads = []
        for name, x, w, b, n in (("q", query, weights[0], biases[0], L), ("k", key, weights[1], biases[1], S),
                                 ("v", value, weights[2], biases[2], S)):
            y = graph.call_function(F.linear, (x, constant(f"{name}_weight", w), constant(f"{name}_bias", b)))
            projections.append(y)
            heads.append(graph.call_method("reshape", (y, (-1, n, H, d))))
        out, attn = _attention(graph, *heads, 1.0 / math.sqrt(d), None, "nlhd,nshd->nhls", "nhls,nshd->nlhd")
        out = graph.call_method("reshape", (out, (-1, L, E)))
        out_proj = m.out_proj
        out = graph.call_function(F.linear, (out, constant("out_weight", out_proj.weight.detach()),
                                             constant("out_bias", None if out_proj.bias is None
                                                      else out_proj.bias.detach())))
        projections.append(out)
    # the parts belong to the attention module: overrides that name it ("*.self_attention") reach its projections
    # ("<mha>.in_proj" for the q/k/v projections, "<mha>.out_proj", "<mha>" for the rest)
    stack = _own_new_nodes(graph, node, m, existing)
    for proj in projections:
        path = f"{node.target}.out_proj" if proj is projections[-1] else f"{node.target}.in_proj"
        proj.meta["nn_module_stack"] = {**stack, path: (path, nn.Linear)}
    def weights(user):
        if not need_weights:
            raise UnsupportedOpError(f"{describe_node(user)}: reads attention weights with need_weights=False")
        with graph.inserting_before(user):
            return graph.call_method("mean", (attn, 1)) if average else attn

    _replace_output_tuple(graph, node, out, "nn.MultiheadAttention", weights)


def _replace_output_tuple(graph: fx.Graph, node: fx.Node, out: fx.Node, kind: str, other) -> None:
    """A leaf module's call replaced by its decomposition: reads of element 0 of its output tuple read `out`,
    a read of another element that is used reads `other(user)` (which raises where it has no value), and the
    call goes."""
    for user in list(node.users):
        if user.op != "call_function" or user.target is not operator.getitem:
            raise UnsupportedOpError(f"{describe_node(user)}: uses {kind}'s output tuple as a whole")
        if user.args[1] == 0:
            user.replace_all_uses_with(out)
        elif user.users:
            user.replace_all_uses_with(other(user))
        graph.erase_node(user)
    graph.erase_node(node)


def _own_new_nodes(graph: fx.Graph, node, module, existing: set) -> dict:
    """The nodes written in place of a leaf module belong to it (overrides that name the module reach them): each
    gets the module's nn_module_stack. Returns that stack. Nodes written for several modules at once (recurrent
    layers unrolled side by side) belong to each of them: an override naming any of them reaches them all."""
    nodes, modules = (node, module) if isinstance(node, list) else ([node], [module])
    stack = dict(nodes[0].meta.get("nn_module_stack") or {})
    for n, m in zip(nodes, modules):
        stack[n.target] = (n.target, type(m))
    for part in graph.nodes:
        if part not in existing:
            part.meta["nn_module_stack"] = stack
    return stack


def decompose_attention(gm: fx.GraphModule) -> int:
    """Rewrite every attention in `gm` (shapes from a first value propagation) into its parts, unroll every
    recurrent layer, and make the broadcast of a product of two signals explicit; returns how many."""
    count = 0
    recurrent = [n for n in gm.graph.nodes
                 if n.op == "call_module" and isinstance(gm.get_submodule(n.target), (nn.LSTM, nn.GRU, nn.RNN))]
    for group in side_by_side(gm, recurrent) if recurrent else []:
        _unroll(gm, group, gm.get_submodule(group[0].target))
        count += len(group)
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.MultiheadAttention):
            _mha(gm, node, gm.get_submodule(node.target))
            count += 1
        elif node.op == "call_function" and node.target is F.scaled_dot_product_attention:
            _sdpa(gm, node)
            count += 1
        elif node.op == "call_function" and node.meta.get("dynamic") and is_wrapped_function(node.target):
            from .ops import value
            from .graph import Traced

            inline_wrapped(gm, node, lambda a: value(a, Traced(gm, None)))
            count += 1
        elif _broadcast_product(node):
            _expand_operands(gm.graph, node)
            count += 1
    if count:
        gm.recompile()
    return count


def _broadcast_product(node: fx.Node) -> bool:
    """A matmul of tensors of one rank, at least one input-dependent, whose batch dimensions broadcast (timm's
    lambda layer: q [B, heads, M, 1, K] @ position_lam [B, 1, M, K, V], and the constant relative-position
    embedding [B, M, K, M] @ v [B, 1, M, V])."""
    if not ((node.op == "call_function" and node.target in (torch.matmul, operator.matmul))
            or (node.op == "call_method" and node.target == "matmul")) or len(node.args) != 2:
        return False
    a, b = node.args
    if not (all(isinstance(t, fx.Node) and t.meta.get("shape") for t in (a, b))
            and any(t.meta.get("dynamic") for t in (a, b))):
        return False
    sa, sb = tuple(a.meta["shape"]), tuple(b.meta["shape"])
    return (len(sa) == len(sb) >= 3 and sa[:-2] != sb[:-2]
            and all(x == y or 1 in (x, y) for x, y in zip(sa[:-2], sb[:-2])))


def _expand_operands(graph: fx.Graph, node: fx.Node) -> None:
    """The broadcast made explicit: each operand expanded to the common batch dimensions, so the product's rule
    sees equal batch dimensions and the expand's rule sums an operand's relevance over the copies it was read as
    (-1 keeps a dimension, the batch dimension included, so the graph runs at any batch size)."""
    a, b = node.args
    batch = [max(x, y) for x, y in zip(a.meta["shape"][:-2], b.meta["shape"][:-2])]
    operands = []
    with graph.inserting_before(node):
        for t in (a, b):
            own = list(t.meta["shape"][:-2])
            if own == batch:
                operands.append(t)
                continue
            sizes = [n if d != n else -1 for d, n in zip(own, batch)] + [-1, -1]
            expanded = graph.call_method("expand", (t, *sizes))
            # the product's source line and module: an error or an override that names them reaches the expand too
            expanded.meta.update({k: node.meta[k] for k in ("stack_trace", "nn_module_stack") if k in node.meta})
            operands.append(expanded)
    node.args = tuple(operands)


# ------------------------------------------------------------------------------------------------ recurrent layers
def _unroll(gm: fx.GraphModule, nodes: list, m: nn.RNNBase) -> None:
    """nn.LSTM / nn.GRU / nn.RNN over a batch of sequences, unrolled step by step (see the module docstring).

    `nodes` are calls of recurrent layers of one configuration on inputs of one shape that read no output of one
    another (`side_by_side`); `m` is the first one's module. Each (call, direction) is a lane. One lane is unrolled
    with F.linear. Several run side by side in one unroll: their sequences stacked [N, T, lanes, C] (a reverse
    direction reads its sequence flipped), each step one `grouped_linear` per gate, so the graph has a node per
    step rather than per step and lane (Sequencer2D-L: 2,816 steps became 704). The value, and each unit's rule,
    are those of the lanes unrolled one by one."""
    modules = [gm.get_submodule(n.target) for n in nodes]
    kind = type(m).__name__
    inputs = []
    for node in nodes:
        x, hx = _arg(node, 0, "input"), _arg(node, 1, "hx")
        if hx is not None:
            raise UnsupportedOpError(f"{describe_node(node)}: {kind} with a given initial state (only the zero state)")
        if getattr(m, "proj_size", 0):
            raise UnsupportedOpError(f"{describe_node(node)}: {kind} with proj_size")
        if not isinstance(x, fx.Node) or len(x.meta.get("shape", ())) != 3:
            raise UnsupportedOpError(f"{describe_node(node)}: {kind} on an unbatched or packed sequence")
        inputs.append(x)
    graph, prefix, existing = gm.graph, f"_lrp_{nodes[0].name}", set(gm.graph.nodes)
    call = graph.call_function
    directions = 2 if m.bidirectional else 1
    lanes = len(nodes) * directions
    affine = F.linear if lanes == 1 else grouped_linear

    constants: dict = {}

    def constant(name, make):  # one buffer and one node per weight, read by every time step
        if name not in constants:
            if not hasattr(gm, f"{prefix}_{name}"):
                gm.register_buffer(f"{prefix}_{name}", make().detach().clone())
            constants[name] = graph.get_attr(f"{prefix}_{name}")
        return constants[name]

    joins: dict = {}  # (x_t, h) -> their concatenation: one per step, read by every gate's linear layer

    def linear(inputs, weights, bias, name):  # one linear layer over the concatenated inputs of a step
        if len(inputs) == 1:
            joined = inputs[0]
        else:
            joined = joins.get(tuple(inputs))
            if joined is None:
                joined = joins[tuple(inputs)] = call(torch.cat, (list(inputs), -1))
        w = constant(name, lambda: weights[0] if len(weights) == 1 else torch.cat(weights, -1))
        return call(affine, (joined, w, None if bias is None else constant(name + "_b", lambda: bias)))

    def lane_weights(layer, name):  # per gate, the lanes' weights stacked ([lanes, H, C]; [H, C] for one lane)
        per_lane = [getattr(mod, name + f"_l{layer}" + ("_reverse" if d else "")).chunk(gates)
                    for mod in modules for d in range(directions)]
        return [parts[0] if lanes == 1 else torch.stack(parts) for parts in zip(*per_lane)]

    x = inputs[0]
    steps = x.meta["shape"][1 if m.batch_first else 0]
    gates = {"LSTM": 4, "GRU": 3}.get(kind, 1)
    with graph.inserting_before(nodes[0]):
        seqs = [x if m.batch_first else call(torch.transpose, (x, 0, 1)) for x in inputs]
        for layer in range(m.num_layers):
            w_ih, w_hh = lane_weights(layer, "weight_ih"), lane_weights(layer, "weight_hh")
            b_ih = lane_weights(layer, "bias_ih") if m.bias else (None,) * gates
            b_hh = lane_weights(layer, "bias_hh") if m.bias else (None,) * gates
            name = f"l{layer}"
            if lanes == 1:
                sequence = seqs[0]
            else:  # [N, T, lanes, C]: lane (call i, direction d) at 2i + d, a reverse direction's sequence flipped
                sequence = call(torch.stack, ([s if d == 0 else call(torch.flip, (s, (1,)))
                                               for s in seqs for d in range(directions)], 2))
            h = c = None
            hs = []
            for t in range(steps):
                x_t = call(operator.getitem, (sequence, (slice(None), t)))
                h, c = _cell(kind, m, call, linear, constant, x_t, h, c, w_ih, w_hh, b_ih, b_hh, name)
                hs.append(graph.call_method("reshape", (h, (-1, 1, m.hidden_size) if lanes == 1
                                                        else (-1, 1, lanes, m.hidden_size))))
            out = call(torch.cat, (hs, 1))
            if lanes == 1:
                seqs = [out]
                continue
            per_lane = [call(operator.getitem, (out, (slice(None), slice(None), k))) for k in range(lanes)]
            per_lane = [y if k % directions == 0 else call(torch.flip, (y, (1,))) for k, y in enumerate(per_lane)]
            seqs = [per_lane[i * directions] if directions == 1
                    else call(torch.cat, (per_lane[i * directions:(i + 1) * directions], -1))
                    for i in range(len(nodes))]
        outs = [seq if m.batch_first else call(torch.transpose, (seq, 0, 1)) for seq in seqs]
    _own_new_nodes(graph, nodes, modules, existing)
    def final_state(user):
        raise UnsupportedOpError(f"{describe_node(user)}: reads {kind}'s final state (only its outputs have a rule)")

    for node, out in zip(nodes, outs):
        _replace_output_tuple(graph, node, out, kind, final_state)


def _recurrent_key(gm: fx.GraphModule, node: fx.Node):
    """What recurrent layers must share to run side by side: kind, sizes, options and input shape."""
    m = gm.get_submodule(node.target)
    x = _arg(node, 0, "input")
    shape = tuple(x.meta.get("shape", ())) if isinstance(x, fx.Node) else None
    return (type(m), m.input_size, m.hidden_size, m.num_layers, m.bias, m.batch_first, m.bidirectional,
            getattr(m, "nonlinearity", None), getattr(m, "proj_size", 0), m.weight_ih_l0.dtype, shape,
            isinstance(x, fx.Node) and x.meta.get("batch_dim", 0) == 0, _arg(node, 1, "hx") is None)


def _movable(ancestors: set, members: list) -> bool:
    """Whether a recurrent call whose input needs `ancestors` (those after the group's first member) can join the
    group: it reads no member's output, and moving those nodes before the first member changes no value (none
    of them writes in place)."""
    def in_place(n):
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
        return n.op in ("call_method", "call_function") and name.endswith("_") and not name.endswith("__")

    return not any(m in ancestors for m in members) and not any(in_place(n) for n in ancestors)


def side_by_side(gm: fx.GraphModule, nodes: list) -> list:
    """The recurrent-layer calls `nodes` (in graph order) in groups that can be unrolled as one: equal
    `_recurrent_key`, and none reading another's output (Sequencer2D's vertical and horizontal LSTMs of a block).
    Each later member's input is computed before the first member (those of its ancestors that come after the
    first member are moved there, in order; none of them depends on it), so the joint unroll goes there."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}

    def ancestors_after(node, first):  # ancestors of `node` placed after `first` in the graph
        seen, stack = set(), [node]
        while stack:
            n = stack.pop()
            for a in n.all_input_nodes:
                if a not in seen and order[a] > order[first]:
                    seen.add(a)
                    stack.append(a)
        return seen

    groups: list = []
    for node in nodes:
        key = _recurrent_key(gm, node)
        home = None
        if key[-1] and key[-2] and key[-3] is not None:
            home = next((g for g in groups if g[0] == key and _movable(ancestors_after(node, g[1][0]), g[1])), None)
        if home is None:
            groups.append((key, [node]))
        else:
            home[1].append(node)
    for _, members in groups:
        first = members[0]
        order.update({n: i for i, n in enumerate(gm.graph.nodes)})  # earlier groups' moves changed it
        for later in members[1:]:
            for n in sorted(ancestors_after(later, first) - {later}, key=order.__getitem__):
                first.prepend(n)
    return [members for _, members in groups]


def _cell(kind, m, call, linear, constant_of, x_t, h, c, w_ih, w_hh, b_ih, b_hh, name):
    """One time step: (h_t, c_t) from x_t and the previous state (None at the first step: the zero state, whose
    terms are left out)."""
    def pre(k, with_hidden=True):  # W_ih[k]·x_t + W_hh[k]·h + b_ih[k] + b_hh[k], one linear layer
        bias = None if b_ih[k] is None else b_ih[k] + b_hh[k]
        if h is None or not with_hidden:
            return linear([x_t], [w_ih[k]], bias, f"{name}_{k}_x")
        return linear([x_t, h], [w_ih[k], w_hh[k]], bias, f"{name}_{k}_xh")

    if kind == "LSTM":  # gates i, f, o; candidate g
        i, g, o = (call(torch.sigmoid, (pre(0),)), call(torch.tanh, (pre(2),)), call(torch.sigmoid, (pre(3),)))
        c_new = call(operator.mul, (i, g))
        if c is not None:
            c_new = call(operator.add, (call(operator.mul, (call(torch.sigmoid, (pre(1),)), c)), c_new))
        return call(operator.mul, (o, call(torch.tanh, (c_new,)))), c_new
    if kind == "GRU":  # gates r, z; candidate n = tanh(W_in·x + b_in + r·(W_hn·h + b_hn))
        r, z = call(torch.sigmoid, (pre(0),)), call(torch.sigmoid, (pre(1),))
        if h is None:  # the zero state: W_hn·h + b_hn is b_hn, a constant the reset gate scales
            hidden = None if b_hh[2] is None else constant_of(f"{name}_2h_b", lambda: b_hh[2])
        else:
            hidden = linear([h], [w_hh[2]], b_hh[2], f"{name}_2h")
        n = linear([x_t], [w_ih[2]], b_ih[2], f"{name}_2x")
        if hidden is not None:
            n = call(operator.add, (n, call(operator.mul, (r, hidden))))
        h_new = call(operator.mul, (call(operator.sub, (1.0, z)), call(torch.tanh, (n,))))
        return (h_new if h is None else call(operator.add, (h_new, call(operator.mul, (z, h))))), None
    activation = torch.tanh if m.nonlinearity == "tanh" else torch.relu
    return call(activation, (pre(0),)), None


# ------------------------------------------------------------------------------------------------ wrapped functions
_DUNDER = {"__add__": operator.add, "__radd__": operator.add, "__mul__": operator.mul, "__rmul__": operator.mul,
           "__sub__": operator.sub, "__truediv__": operator.truediv, "__matmul__": operator.matmul,
           "__getitem__": operator.getitem, "__neg__": operator.neg}


def is_wrapped_function(target) -> bool:
    """A function registered with torch.fx.wrap: fx keeps it as one opaque call (torchvision's Swin attention)."""
    from torch.fx import _symbolic_trace

    globals_ = getattr(target, "__globals__", None)
    return globals_ is not None and (id(globals_), getattr(target, "__name__", "")) in \
        _symbolic_trace._wrapped_fns_to_patch


class _Recorder(torch.overrides.TorchFunctionMode):
    """Runs a function on example tensors and records, as fx nodes, every torch call that touches a tensor
    derived from the function's input. Sizes and Python control flow resolve to the example's concrete values
    (the explainer is compiled for one input size); tensors computed from constants alone (a shifted-window mask)
    are computed now and enter the graph as constants."""

    def __init__(self, gm: fx.GraphModule, env: dict, constants: dict, where: fx.Node):
        super().__init__()
        self.gm, self.env, self.constants, self.where, self.keep = gm, env, constants, where, []

    def _arg(self, a):
        if isinstance(a, torch.Tensor):
            if id(a) in self.env:
                return self.env[id(a)]
            if id(a) in self.constants:
                return self.constants[id(a)]
            name = f"_lrp_const_{self.where.name}_{len(self.keep)}"
            self.gm.register_buffer(name, a.detach().clone())
            self.keep.append(a)
            return self.gm.graph.get_attr(name)
        if isinstance(a, (list, tuple)):
            return type(a)(self._arg(x) for x in a)
        if isinstance(a, dict):
            return {k: self._arg(v) for k, v in a.items()}
        return a

    def _touches_input(self, obj) -> bool:
        if isinstance(obj, torch.Tensor):
            return id(obj) in self.env
        if isinstance(obj, (list, tuple)):
            return any(self._touches_input(x) for x in obj)
        if isinstance(obj, dict):
            return any(self._touches_input(x) for x in obj.values())
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in SIZE_ONLY or not (self._touches_input(args) or self._touches_input(kwargs)):
            return out  # a constant: computed now
        if not isinstance(out, (torch.Tensor, tuple, list)) or (
                isinstance(out, (tuple, list)) and not any(isinstance(o, torch.Tensor) for o in out)):
            return out  # sizes, dims: concrete values
        if name.endswith("_") and not name.startswith("_") or name.startswith("__i") or name == "__setitem__":
            raise UnsupportedOpError(f"{describe_node(self.where)}: in-place {name} on an input-dependent tensor")
        graph = self.gm.graph
        fargs, fkwargs = self._arg(args), self._arg(kwargs)
        if name in _DUNDER:
            node = graph.call_function(_DUNDER[name], fargs, fkwargs)
        elif getattr(torch.Tensor, name, None) is func:
            node = graph.call_method(name, fargs, fkwargs)
        else:
            node = graph.call_function(func, fargs, fkwargs)
        if isinstance(out, torch.Tensor):
            self.env[id(out)] = node
            node.meta.update(shape=tuple(out.shape), dtype=out.dtype, dynamic=True)  # until value propagation
        else:
            node.meta["dynamic"] = True
            for i, o in enumerate(out):
                if isinstance(o, torch.Tensor):
                    item = graph.call_function(operator.getitem, (node, i))
                    item.meta.update(shape=tuple(o.shape), dtype=o.dtype, dynamic=True)
                    self.env[id(o)] = item
        self.keep.append(out)
        return out


def _record(gm: fx.GraphModule, node: fx.Node, value_of, batch: int):
    """Run node's function on examples with the given batch size under a _Recorder; (recorded nodes, output)."""
    env, constants, examples = {}, {}, []

    def example(a):
        if isinstance(a, fx.Node):
            if a.meta.get("dynamic"):
                shape = a.meta["shape"]
                t = torch.randn((shape[0] * batch, *shape[1:]), dtype=a.meta.get("dtype") or torch.get_default_dtype())
                env[id(t)] = a
            else:
                t = value_of(a)
                constants[id(t)] = a
            examples.append(t)
            return t
        if isinstance(a, (list, tuple)):
            return type(a)(example(x) for x in a)
        return a

    args = tuple(example(a) for a in node.args)
    kwargs = {k: example(v) for k, v in node.kwargs.items()}
    before = set(gm.graph.nodes)
    recorder = _Recorder(gm, env, constants, node)
    with gm.graph.inserting_before(node), torch.no_grad(), recorder:
        out = node.target(*args, **kwargs)
    if not isinstance(out, torch.Tensor) or id(out) not in env:
        raise UnsupportedOpError(f"{describe_node(node)}: its result does not depend on its input")
    return [n for n in gm.graph.nodes if n not in before], env[id(out)]


def _ints(args) -> list:
    flat = []
    fx.node.map_aggregate(args, lambda a: flat.append(a) if isinstance(a, int) and not isinstance(a, bool) else a)
    return flat


def inline_wrapped(gm: fx.GraphModule, node: fx.Node, value_of) -> None:
    """Replace a call of an fx-wrapped function by the torch ops it runs for this input size. It is recorded at
    batch 1 and 2: integer arguments that follow the batch size (view(B, ...), B·windows) become B·k computed
    from the input in the graph, so the explainer keeps a free batch size."""
    nodes, out = _record(gm, node, value_of, 1)
    probe, _ = _record(gm, node, value_of, 2)
    if len(probe) != len(nodes):
        raise UnsupportedOpError(f"{describe_node(node)}: runs different ops at another batch size")
    batch_size = None
    source = next(a for a in node.all_input_nodes if a.meta.get("dynamic"))
    for mine, other in zip(nodes, probe):
        ones, twos = _ints((mine.args, mine.kwargs)), _ints((other.args, other.kwargs))
        if ones == twos:
            continue
        if len(ones) != len(twos) or any(b not in (a, 2 * a) for a, b in zip(ones, twos)):
            raise UnsupportedOpError(f"{describe_node(node)}: a size that is not a multiple of the batch size")
        if batch_size is None:
            with gm.graph.inserting_before(nodes[0]):
                batch_size = gm.graph.call_method("size", (source, 0))
        scaled = iter([(a, b) for a, b in zip(ones, twos)])

        def replace(a):
            if isinstance(a, int) and not isinstance(a, bool):
                one, two = next(scaled)
                if two == 2 * one and one != two:
                    with gm.graph.inserting_before(mine):
                        return batch_size if one == 1 else gm.graph.call_function(operator.mul, (batch_size, one))
            return a

        mine.args = fx.node.map_aggregate(mine.args, replace)
        mine.kwargs = fx.node.map_aggregate(mine.kwargs, replace)
    for n in reversed(probe):
        gm.graph.erase_node(n)
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
