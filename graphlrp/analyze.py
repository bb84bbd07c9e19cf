"""Stage 2 — analyze: find every merge (an add of two input-dependent tensors) and its branches.

The traced graph becomes a networkx DiGraph of input-dependent tensor nodes. For each merge the fork is the
lowest common ancestor of the two operands; each branch is what lies between the fork and one operand. The
shorter branch is the skip: `identity` when it is empty, `projection` when it holds a conv/linear (conv+BN,
or pool+conv as in ResNet-D), `other` otherwise (e.g. strided slice + zero channel padding, CIFAR option A).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import networkx as nx
import torch.fx as fx

from . import ops
from .graph import Traced, source_line

IDENTITY, PROJECTION, OTHER, BRANCHES = "identity", "projection", "other", "branch-dim"


@dataclass
class Merge:
    """One residual add. `node` is the add's name; `skip_operand` is 0 or 1 (which argument is the skip)."""

    node: str
    skip_kind: str
    fork: str
    skip_operand: int
    skip_nodes: list[str] = field(default_factory=list)
    main_nodes: list[str] = field(default_factory=list)
    source: str = ""
    skip_support: object = None  # for `other` skips: 1 where the skip carries input, 0 where it is structural zero
    arity: int = 2  # operands (an add chain) or slices (a sum over a branch dim)
    kind: str = "add"  # "add" (k operands) or "sum" (over a branch dim: ResNeSt/SK radix, stack(...).sum(0))

    @property
    def skip_length(self) -> int:
        return len(self.skip_nodes)

    @property
    def main_length(self) -> int:
        return len(self.main_nodes)


def dataflow_graph(traced: Traced) -> nx.DiGraph:
    """Input-dependent tensor nodes and the edges between them, in the order fx lists them (a topological order,
    kept as each node's `order`)."""
    g = nx.DiGraph()
    for node in traced.graph.nodes:
        if node.meta.get("dynamic") and "shape" in node.meta:
            g.add_node(node.name, node=node, order=len(g))
            for arg in node.all_input_nodes:
                if arg.name in g:
                    g.add_edge(arg.name, node.name)
    return g


def lowest_common_ancestor(g: nx.DiGraph, a: str, b: str) -> str | None:
    """The latest node, in forward order, that is an ancestor of both `a` and `b` (or one of them): a lowest common
    ancestor. Found by walking back from both in decreasing forward order, which visits only the nodes after it;
    networkx's general algorithm visits every ancestor of both, which made each merge of an unrolled LSTM (a
    thousand steps in Sequencer) cost a pass over the whole graph."""
    order = g.nodes
    reach = {a: 1}
    reach[b] = reach.get(b, 0) | 2
    heap = [(-order[n]["order"], n) for n in reach]
    heapq.heapify(heap)
    while heap:
        _, n = heapq.heappop(heap)
        if reach[n] == 3:
            return n
        for p in g.predecessors(n):
            if p not in reach:
                reach[p] = 0
                heapq.heappush(heap, (-order[p]["order"], p))
            reach[p] |= reach[n]
    return None


def _branch(g: nx.DiGraph, fork: str, operand: str) -> list[str]:
    """Nodes strictly after `fork` up to and including `operand`, in forward (topological) order."""
    if operand == fork:
        return []
    after = g.nodes[fork]["order"]
    upstream, stack = set(), [operand]  # ancestors of the operand that come after the fork
    while stack:
        n = stack.pop()
        if n not in upstream:
            upstream.add(n)
            stack.extend(p for p in g.predecessors(n) if g.nodes[p]["order"] > after)
    between, stack = set(), [s for s in g.successors(fork) if s in upstream]  # ... that the fork reaches
    while stack:
        n = stack.pop()
        if n not in between:
            between.add(n)
            stack.extend(s for s in g.successors(n) if s in upstream)
    return sorted(between | {operand}, key=lambda n: g.nodes[n]["order"])


def _has_parametric_layer(traced: Traced, names: list[str], g: nx.DiGraph) -> bool:
    for name in names:
        op = ops.describe(g.nodes[name]["node"], traced)
        if op is not None and op.kind in (ops.CONV, ops.LINEAR):
            return True
    return False


def relevance_path(traced: Traced) -> set:
    """The nodes relevance reaches from the logits: each op passes it to its relevance inputs only (a gate's
    branch, a normaliser's statistics receive none)."""
    output = next(n for n in traced.graph.nodes if n.op == "output").args[0]
    seen, stack = set(), [output]
    while stack:
        node = stack.pop()
        if node in seen or not isinstance(node, fx.Node):
            continue
        seen.add(node)
        op = ops.describe(node, traced)
        if op is not None:
            stack.extend(i for i in op.inputs if isinstance(i, fx.Node))
    return seen


def find_merges(traced: Traced) -> list[Merge]:
    """Every merge on the relevance path, in forward order: adds (and add chains, as one k-ary merge) of
    input-dependent tensors, and sums over a branch dim."""
    g = dataflow_graph(traced)
    path = relevance_path(traced)
    described = {}
    for node in traced.graph.nodes:
        if node.name in g and node in path:
            op = ops.describe(node, traced)
            if op is not None and op.kind == ops.MERGE:
                described[node] = op
    absorbed = {n for op in described.values() for n in op.params.get("absorbed", ())}
    merges = []
    for node, op in described.items():
        if node in absorbed:
            continue
        if "dims" in op.params:  # a sum over a branch dim: no fork or skip, k slices
            merges.append(Merge(node.name, BRANCHES, op.inputs[0].name, -1, [], [], source_line(node),
                                arity=op.params["arity"], kind="sum"))
            continue
        names = [arg.name for arg in op.inputs]
        fork = names[0]
        for other in names[1:]:
            fork = lowest_common_ancestor(g, fork, other) or fork
        branches = [_branch(g, fork, n) for n in names]
        # the skip is the shortest branch; on a tie the last operand (`x + shortcut`, `out += identity`)
        lengths = [len(b) for b in branches]
        skip = max(i for i, n in enumerate(lengths) if n == min(lengths))
        skip_nodes = branches[skip]
        main_nodes = [n for i, b in enumerate(branches) if i != skip for n in b if n not in skip_nodes]
        if not skip_nodes:
            kind = IDENTITY
        elif _has_parametric_layer(traced, skip_nodes, g):
            kind = PROJECTION
        else:
            kind = OTHER
        merge = Merge(node.name, kind, fork, skip, skip_nodes, main_nodes, source_line(node), arity=len(names))
        if kind == OTHER:
            merge.skip_support = _structural_support(traced, g, fork, skip_nodes)
        merges.append(merge)
    return merges


def _structural_support(traced: Traced, g: nx.DiGraph, fork: str, skip_nodes: list[str]):
    """Which positions of a parameter-free skip carry its input at all: run the skip branch on ones. Zero-padded
    channels of a CIFAR option-A shortcut come out 0 — a split must not send relevance there, where it would be lost."""
    import torch

    fork_node = g.nodes[fork]["node"]
    env = {fork_node: torch.ones((1, *fork_node.meta["shape"][1:]))}
    interp = torch.fx.Interpreter(traced.graph_module)
    for name in skip_nodes:
        node = g.nodes[name]["node"]
        args = torch.fx.node.map_arg(node.args, lambda n: env.get(n, n.meta.get("value")))
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: env.get(n, n.meta.get("value")))
        try:
            with torch.no_grad():
                env[node] = getattr(interp, node.op)(node.target, args, kwargs)
        except Exception:  # a skip that cannot run on ones gets no special treatment
            return None
    out = env[g.nodes[skip_nodes[-1]]["node"]]
    return (out != 0).float() if isinstance(out, torch.Tensor) else None


def merge_table(merges: list[Merge]) -> str:
    """A readable report: one row per merge."""
    rows = [("#", "merge", "k", "skip", "fork", "skip len", "main len")]
    for i, m in enumerate(merges):
        rows.append((str(i), m.node, str(m.arity), m.skip_kind, m.fork, str(m.skip_length), str(m.main_length)))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    counts = {k: sum(m.skip_kind == k for m in merges) for k in (IDENTITY, PROJECTION, OTHER, BRANCHES)}
    lines.append(f"{len(merges)} merges: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return "\n".join(lines)
