"""Cheap, exact forms for the explainer's ops: how a transposed convolution is emitted, and the peephole passes
run on the finished explainer graph. Nothing here changes what a rule computes — only how (float rounding aside).

Transposed convolutions (the backward half of every conv rule):

* stride 1: a convolution with the flipped, channel-transposed kernel (onnxruntime runs Conv in its blocked NCHWc
  kernels, about 20% faster per FLOP than ConvTranspose on CPU);
* stride > 1: conv_transpose2d. The sub-pixel (polyphase) form — s² stride-1 convolutions with sub-kernels,
  interleaved by a pixel shuffle — measured 1.0–1.4× slower than ConvTranspose in onnxruntime 1.32 on CPU for
  ResNet-50's strided 3×3 and 1×1 convolutions, and 3.7× slower for the 7×7 stem (three output channels), so it
  is not used;
* a weight whose output channels are all equal (the flat rule's ones) sums the relevance over channels first, so
  the transposed conv has one input channel instead of C.

Graph passes (`optimize_graph`), each a local rewrite justified by a sign analysis of the graph:

* abs(x), clamp(x, min≤0) and relu(x) of a value known to be ≥ 0 are x;
* where(x ≥ 0, a, b) with x known ≥ 0 is a (the signed stabiliser of a z⁺ denominator);
* z + c, z a convolution or linear layer used only there and c a constant scalar, becomes one layer with bias + c
  (the additive stabiliser ε folded into the z⁺ convolution);
* where(x ≥ 0, x + ε, x − ε) becomes x + where(x ≥ 0, ε, −ε) (the signed stabiliser in three passes, not four);
* the same add, sub, mul or div of the same operands, written twice (a split rule recomputing the merge's sum h
  that the forward already holds), is computed once;
* R / stab(h), with relu(h) in the graph and R zero wherever relu(h) is 0 (R a product with relu(h), or sums of
  such products: what every rule downstream of the ReLU hands back), is R / (relu(h) + ε): where h ≤ 0 both are
  0 / (nonzero); the ε-rule's signed stabiliser on a merge costs one add instead of an add, a comparison, a
  select and another add;
* the remaining signed shifts where(x ≥ 0, ε, −ε) are written without `Where` (onnxruntime's Where with scalar
  branches is a slow, unvectorised broadcast, 3-4× an Add on the same tensor): (x ≥ 0)·2ε − ε, bit-identical
  (2ε − ε = ε and 0 − ε = −ε exactly in floating point);
* dead nodes are dropped.

Memory (`recompute_large_values`): a forward value of at least RECOMPUTE_NUMEL elements per sample that the
relevance pass reads again much later (SAM's global attention weights at 1024 px: 12 × 4096² per image and block)
is computed a second time from its small inputs (q, k, the position terms) where the relevance pass needs it,
instead of being held from the forward to the relevance pass. The same ops on the same operands: the same values.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from .derived import derive
from .graph import drop_dead_nodes


def flipped_kernel(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The conv weight whose stride-1 convolution equals conv_transpose2d with `weight`."""
    cout, cin_g, kh, kw = weight.shape
    w = weight.view(groups, cout // groups, cin_g, kh, kw).transpose(1, 2)
    return w.reshape(groups * cin_g, cout // groups, kh, kw).flip(-1, -2).contiguous()


def conv_output_padding(in_hw, out_hw, kernel, geometry) -> tuple:
    """output_padding that makes conv_transpose2d return exactly the conv's input size."""
    res = []
    for i in range(2):
        full = (out_hw[i] - 1) * geometry["stride"][i] - 2 * geometry["padding"][i] + \
            geometry["dilation"][i] * (kernel[i] - 1) + 1
        res.append(in_hw[i] - full)
    return tuple(res)


def _rows_equal(weight: torch.Tensor) -> bool:
    return torch.equal(weight[1], weight[0]) and torch.equal(weight, weight[:1].expand_as(weight))


def conv_transpose(em, s, weight: torch.Tensor, stride, padding, dilation, groups: int, in_hw, out_hw):
    """Emit conv_transpose2d(s, weight) for a conv with this geometry, shaped like the conv's input (in_hw)."""
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    if groups == 1 and len(weight) > 1 and _rows_equal(weight):
        s = em.call(torch.sum, s, 1, True)  # equal output channels: Σ_o W_o sᵒ = W_0 Σ_o sᵒ
        weight = weight[:1]
    kernel = tuple(weight.shape[-2:])
    pad_t = tuple(d * (k - 1) - p for d, k, p in zip(dilation, kernel, padding))
    if stride == (1, 1) and all(v >= 0 for v in pad_t):
        return em.call(F.conv2d, s, derive(flipped_kernel, weight, groups), None, 1, pad_t, dilation, groups)
    geometry = dict(stride=stride, padding=padding, dilation=dilation)
    out_pad = conv_output_padding(in_hw, out_hw, kernel, geometry)
    return em.call(F.conv_transpose2d, s, weight, None, stride, padding, out_pad, groups, dilation)


# ------------------------------------------------------------------------------------------ graph passes
_NONNEG_ALWAYS = {torch.relu, F.relu, torch.abs, torch.exp, torch.softmax, F.softmax, torch.sigmoid, torch.eq,
                  torch.ne, torch.gt, torch.ge, torch.lt, torch.le, torch.argmax, operator.eq, operator.gt,
                  operator.ge, operator.lt, operator.le}
# ops that are ≥ 0 when every tensor operand is ≥ 0 and every number operand is ≥ 0
_NONNEG_IF_INPUTS = {torch.add, torch.mul, torch.div, operator.add, operator.mul, operator.truediv, torch.sum,
                     torch.mean, torch.flatten, torch.reshape, torch.Tensor.expand, torch.Tensor.to, torch.narrow,
                     torch.stack, torch.cat, torch.unsqueeze, torch.squeeze, torch.permute, torch.zeros_like,
                     operator.getitem, F.avg_pool2d, F.adaptive_avg_pool2d, F.max_pool2d, F.conv2d, F.linear,
                     F.conv_transpose2d, F.pixel_shuffle, F.pad, torch.scatter_add, torch.where, torch.split}


def _number_ok(v) -> bool:
    return v >= 0 if isinstance(v, (int, float)) and not isinstance(v, bool) else True


def nonnegative_nodes(graph: fx.Graph, owner: torch.nn.Module, seeds) -> set:
    """Nodes of `graph` (its attributes and modules held by `owner`) whose value is ≥ 0 for every input: `seeds`
    (forward values the rewrite knows to be ≥ 0), constants that are, and what the ops above make of them."""
    known = set(seeds)
    constants: dict = {}

    def nonneg(a) -> bool:
        if not isinstance(a, fx.Node):
            return _number_ok(a)
        if a.op == "get_attr":  # looked at only where an op asks (weights are large)
            if a not in constants:
                value = _attr(owner, a.target)
                constants[a] = isinstance(value, torch.Tensor) and (value.dtype == torch.bool or
                                                                    bool((value >= 0).all()))
            return constants[a]
        return a in known

    for node in graph.nodes:
        if node in known or node.op == "get_attr":
            continue
        if node.op == "call_module":
            ok = isinstance(owner.get_submodule(node.target), torch.nn.ReLU)
        elif node.op == "call_method":
            ok = node.target == "relu"
        elif node.op == "call_function" and node.target in _NONNEG_ALWAYS:
            ok = True
        elif node.op == "call_function" and node.target is torch.clamp:
            low = node.kwargs.get("min", node.args[1] if len(node.args) > 1 else None)
            ok = (low is not None and _number_ok(low)) or (nonneg(node.args[0]) and node.kwargs.get("max") is None)
        elif node.op == "call_function" and node.target in (F.conv2d, F.conv_transpose2d, F.linear):
            names = ("input", "weight", "bias")  # the rest is geometry; any of them may be given by keyword
            operands = [node.args[i] if len(node.args) > i else node.kwargs.get(k) for i, k in enumerate(names)]
            ok = operands[0] is not None and operands[1] is not None and all(a is None or nonneg(a) for a in operands)
        elif node.op == "call_function" and node.target in _NONNEG_IF_INPUTS:
            operands = list(node.args) + list(node.kwargs.values())
            if node.target is torch.where:
                operands = operands[1:]  # the condition's sign does not matter
            flat = []
            fx.node.map_aggregate(operands, flat.append)
            ok = all(nonneg(a) for a in flat if not isinstance(a, (torch.dtype, str, bool, type(None))))
        else:
            ok = False
        if ok:
            known.add(node)
    known.update(a for a, ok in constants.items() if ok)
    return known


def _attr(gm: torch.nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _is_ge_zero(node, known: set) -> bool:
    """`node` is (x >= 0) with x known ≥ 0, i.e. always true."""
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target in (torch.ge, operator.ge)
            and node.args[0] in known and len(node.args) > 1 and isinstance(node.args[1], (int, float))
            and node.args[1] <= 0)


def _same_value(node: fx.Node, known: set):
    """The operand `node` merely passes on, given the sign facts in `known`; None if it computes something."""
    if node.op != "call_function" or not node.args:
        return None
    x = node.args[0]
    if node.target in (torch.abs, torch.relu, F.relu) and x in known:
        return x
    if node.target is torch.clamp and x in known and len(node.args) == 1 and set(node.kwargs) == {"min"} \
            and isinstance(node.kwargs["min"], (int, float)) and node.kwargs["min"] <= 0:
        return x
    if node.target is torch.where and _is_ge_zero(x, known) and isinstance(node.args[1], fx.Node):
        return node.args[1]
    return None


def optimize_graph(gm: fx.GraphModule, nonnegative_seeds=()) -> dict:
    """Run the exact peephole passes on an explainer GraphModule in place, then lint and recompile it; returns how
    often each one fired."""
    fired = optimize_in_place(gm.graph, gm, nonnegative_seeds)
    gm.graph.lint()
    gm.recompile()
    return fired


def optimize_in_place(graph: fx.Graph, owner: torch.nn.Module, nonnegative_seeds=()) -> dict:
    """The peephole passes on `graph`, whose attributes `owner` holds (new folded biases are registered there),
    without generating code: the rewrite runs them before it makes the one GraphModule (code generation is most
    of the cost of a pass over a 100k-node graph)."""
    known = nonnegative_nodes(graph, owner, nonnegative_seeds)
    fired = {"sign": 0, "bias": 0, "signed": 0}
    for node in list(graph.nodes):
        same = _same_value(node, known)
        if same is not None:
            node.replace_all_uses_with(same)
            fired["sign"] += 1
    drop_dead_nodes(graph)
    for node in list(graph.nodes):
        fired["bias"] += _fold_constant_add(graph, owner, node)
    for node in list(graph.nodes):
        fired["signed"] += _signed_shift(graph, node)
    fired["cse"] = _merge_repeated_arithmetic(graph)
    zero_where: dict = {}
    fired["relu_stabiliser"] = sum(_relu_stabiliser(graph, node, zero_where) for node in list(graph.nodes))
    drop_dead_nodes(graph)
    fired["where_free"] = sum(_where_free_shift(graph, node) for node in list(graph.nodes))
    drop_dead_nodes(graph)
    _drop_unused_buffers(graph, owner)
    return fired


def _fold_constant_add(graph: fx.Graph, owner: torch.nn.Module, node: fx.Node) -> bool:
    """add(layer(x; W, b), c) → layer(x; W, b + c), for a conv/linear whose output has no other use."""
    if node.op != "call_function" or node.target not in (torch.add, operator.add) or len(node.args) != 2 \
            or node.kwargs:
        return False
    layer, c = node.args
    if not isinstance(layer, fx.Node) or not isinstance(c, (int, float)) or isinstance(c, bool):
        return False
    if layer.op != "call_function" or layer.target not in (F.conv2d, F.linear) or len(layer.users) != 1 \
            or layer.kwargs or len(layer.args) < 2 or layer.args[1].op != "get_attr":
        return False
    bias_node = layer.args[2] if len(layer.args) > 2 else None
    if bias_node is not None and bias_node.op != "get_attr":
        return False
    weight = _attr(owner, layer.args[1].target)
    bias = _attr(owner, bias_node.target) if bias_node is not None else torch.zeros(weight.shape[0])
    name = f"_lrp_{layer.name}_bias"
    owner.register_buffer(name, (bias + c).detach().clone().contiguous(), persistent=True)
    with graph.inserting_before(layer):
        new_bias = graph.get_attr(name)
    layer.args = (*layer.args[:2], new_bias, *layer.args[3:])
    node.replace_all_uses_with(layer)
    graph.erase_node(node)
    return True


def _signed_shift(graph: fx.Graph, node: fx.Node) -> bool:
    """where(x >= 0, x + c, x - c) → x + where(x >= 0, c, -c): the signed stabiliser in three passes over x, not
    four (the shift is a scalar choice; adding it is exactly what the two branches did)."""
    if node.op != "call_function" or node.target is not torch.where or len(node.args) != 3 or node.kwargs:
        return False
    cond, up, down = node.args
    if not all(isinstance(n, fx.Node) and n.op == "call_function" for n in (cond, up, down)):
        return False
    if cond.target is not torch.ge or up.target is not torch.add or down.target is not torch.sub:
        return False
    x = cond.args[0]
    if cond.args[1:] != (0.0,) and cond.args[1:] != (0,) or up.args[0] is not x or down.args[0] is not x:
        return False
    c = up.args[1] if len(up.args) == 2 else None
    if not isinstance(c, float) or down.args[1:] != (c,) or up.kwargs or down.kwargs:
        return False
    with graph.inserting_before(node):
        shift = graph.call_function(torch.where, (cond, c, -c))
        out = graph.call_function(torch.add, (x, shift))
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return True


_ARITH = {torch.add: torch.add, operator.add: torch.add, torch.sub: torch.sub, operator.sub: torch.sub,
          torch.mul: torch.mul, operator.mul: torch.mul, torch.div: torch.div, operator.truediv: torch.div}


def _merge_repeated_arithmetic(graph: fx.Graph) -> int:
    """Compute each add/sub/mul/div of the same two operands once (operator and torch spellings alike): every
    earlier node is available to later ones in an fx graph, so the later copy is replaced by the first."""
    seen, merged = {}, 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _ARITH or len(node.args) != 2 or node.kwargs:
            continue
        if not all(isinstance(a, fx.Node) or (isinstance(a, (int, float)) and not isinstance(a, bool))
                   for a in node.args):
            continue
        key = (_ARITH[node.target], tuple((type(a), a) for a in node.args))
        if key in seen:
            node.replace_all_uses_with(seen[key])
            graph.erase_node(node)
            merged += 1
        else:
            seen[key] = node
    return merged


def _is_relu(node) -> bool:
    if not isinstance(node, fx.Node) or not node.args:
        return False
    if node.op == "call_module":
        return isinstance(node.graph.owning_module.get_submodule(node.target), torch.nn.ReLU)
    return (node.op == "call_function" and node.target in (torch.relu, F.relu) and not node.kwargs) or \
        (node.op == "call_method" and node.target == "relu")


def _zero_where(node, r: fx.Node, memo: dict, depth: int = 0) -> bool:
    """`node` is exactly 0 wherever relu output `r` is 0 (a product with r, or sums and quotients of such)."""
    if node is r:
        return True
    if not isinstance(node, fx.Node) or node.op != "call_function" or depth > 64:
        return False
    key = (node, r)
    if key not in memo:
        memo[key] = False  # guards against revisiting while the answer is computed
        target = _ARITH.get(node.target)
        args = node.args
        if target is None or len(args) != 2 or node.kwargs:
            ok = False
        elif target is torch.mul:
            ok = _zero_where(args[0], r, memo, depth + 1) or _zero_where(args[1], r, memo, depth + 1)
        elif target is torch.div:
            ok = _zero_where(args[0], r, memo, depth + 1)
        else:  # add, sub
            ok = _zero_where(args[0], r, memo, depth + 1) and _zero_where(args[1], r, memo, depth + 1)
        memo[key] = ok
    return memo[key]


def _shift_of(node):
    """(x, c) if `node` is where(x >= 0, c, -c) with c > 0 a float, else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is torch.where
            and len(node.args) == 3 and not node.kwargs):
        return None
    cond, c, minus = node.args
    if not (isinstance(cond, fx.Node) and cond.op == "call_function" and cond.target is torch.ge
            and len(cond.args) == 2 and cond.args[1] in (0, 0.0) and not cond.kwargs):
        return None
    if not isinstance(c, float) or not isinstance(minus, float) or minus != -c or c <= 0:
        return None
    return cond.args[0], c


def _relu_stabiliser(graph: fx.Graph, node: fx.Node, memo: dict) -> bool:
    """div(R, x + where(x >= 0, c, -c)) → div(R, relu(x) + c) where R is 0 wherever relu(x) is 0."""
    if node.op != "call_function" or node.target not in (torch.div, operator.truediv) or len(node.args) != 2 \
            or node.kwargs:
        return False
    R, den = node.args
    if not (isinstance(den, fx.Node) and den.op == "call_function" and _ARITH.get(den.target) is torch.add
            and len(den.args) == 2 and not den.kwargs):
        return False
    x, shift = den.args
    found = _shift_of(shift)
    if found is None or found[0] is not x or not isinstance(x, fx.Node):
        return False
    relus = [u for u in x.users if _is_relu(u) and u.args[0] is x]
    r = next((u for u in relus if _zero_where(R, u, memo)), None)
    if r is None:
        return False
    with graph.inserting_before(node):
        stab = graph.call_function(torch.add, (r, found[1]))
    node.args = (R, stab)
    return True


def _where_free_shift(graph: fx.Graph, node: fx.Node) -> bool:
    """where(x >= 0, c, -c) → (x >= 0)·2c − c, in x's dtype: the same values without a select."""
    found = _shift_of(node)
    if found is None:
        return False
    cond, c = node.args[0], found[1]
    with graph.inserting_before(node):
        mask = graph.call_method("type_as", (cond, found[0]))
        out = graph.call_function(torch.sub, (graph.call_function(torch.mul, (mask, 2.0 * c)), c))
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return True


def _drop_unused_buffers(graph: fx.Graph, owner: torch.nn.Module) -> None:
    used = {n.target for n in graph.nodes if n.op == "get_attr"}
    for name in [n for n, _ in owner.named_buffers(recurse=False) if n.startswith("_lrp_") and n not in used]:
        delattr(owner, name)


RECOMPUTE_NUMEL = 1 << 23  # per sample: 32 MB in float32
RECOMPUTE_GAP = 20  # nodes between the forward use and the relevance pass's: closer uses share the stored value
RECOMPUTE_CHAIN = 16  # at most this many ops computed again per value


def recompute_large_values(graph: fx.Graph, numel: dict) -> int:
    """Where a large value (`numel`: node -> elements per sample, for the nodes whose size is known) is read again
    RECOMPUTE_GAP nodes or more after its first reader, the later readers get a copy of the pure ops that made it,
    from inputs under RECOMPUTE_NUMEL, inserted before the first of them. The value itself is then freed after its
    forward reader. Returns how many values were recomputed (the caller generates the code)."""
    position = {n: i for i, n in enumerate(graph.nodes)}
    done = 0
    for node in list(graph.nodes):
        if numel.get(node, 0) < RECOMPUTE_NUMEL:
            continue
        readers = sorted(node.users, key=position.__getitem__)
        late = [u for u in readers if position[u] - position[readers[0]] >= RECOMPUTE_GAP]
        chain = _pure_chain(node, numel)
        if not late or chain is None:
            continue
        copies: dict = {}
        with graph.inserting_before(late[0]):
            for c in chain:
                copies[c] = graph.node_copy(c, lambda a: copies.get(a, a))
        for reader in late:
            reader.replace_input_with(node, copies[node])
        position = {n: i for i, n in enumerate(graph.nodes)}
        done += 1
    return done


def _pure_chain(node: fx.Node, numel: dict):
    """The ops that make `node` from values under RECOMPUTE_NUMEL, in graph order; None where one is not a pure
    function (a module call, an in-place method) or there are more than RECOMPUTE_CHAIN."""
    chain, stack, seen = [], [node], {node}
    while stack:
        n = stack.pop()
        if n.op not in ("call_function", "call_method") or (n.op == "call_method" and n.target.endswith("_")) \
                or getattr(n.target, "__name__", "").endswith("_"):
            return None
        chain.append(n)
        if len(chain) > RECOMPUTE_CHAIN:
            return None
        for a in n.all_input_nodes:
            if a not in seen and numel.get(a, 0) >= RECOMPUTE_NUMEL:
                seen.add(a)
                stack.append(a)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(chain, key=order.__getitem__)
