"""Stage 2 — analyze: find every merge (an add of two input-dependent tensors) and its branches.

The traced graph becomes a networkx DiGraph of input-dependent tensor nodes. For each merge the fork is the
lowest common ancestor of the two operands; each branch is what lies between the fork and one operand. The
shorter branch is the skip: `identity` when it is empty, `projection` when it holds a conv/linear (conv+BN,
or pool+conv as in ResNet-D), `other` otherwise (e.g. strided slice + zero channel padding, CIFAR option A).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import torch.fx as fx

from . import ops
from .trace import Traced, source_line

IDENTITY, PROJECTION, OTHER = "identity", "projection", "other"


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


    @property
    def skip_length(self) -> int:
        return len(self.skip_nodes)

    @property
    def main_length(self) -> int:
        return len(self.main_nodes)


def dataflow_graph(traced: Traced) -> nx.DiGraph:
    """Input-dependent tensor nodes and the edges between them, in the order fx lists them."""
    g = nx.DiGraph()
    for node in traced.graph.nodes:
        if node.meta.get("dynamic") and "shape" in node.meta:
            g.add_node(node.name, node=node)
            for arg in node.all_input_nodes:
                if arg.name in g:
                    g.add_edge(arg.name, node.name)
    return g


def _branch(g: nx.DiGraph, fork: str, operand: str) -> list[str]:
    """Nodes strictly after `fork` up to and including `operand`, in topological order."""
    if operand == fork:
        return []
    between = (nx.descendants(g, fork) & nx.ancestors(g, operand)) | {operand}
    return [n for n in nx.topological_sort(g.subgraph(between))]


def _has_parametric_layer(traced: Traced, names: list[str], g: nx.DiGraph) -> bool:
    for name in names:
        op = ops.describe(g.nodes[name]["node"], traced)
        if op is not None and op.kind in (ops.CONV, ops.LINEAR):
            return True
    return False


def find_merges(traced: Traced) -> list[Merge]:
    """Every merge of the traced model, in forward order."""
    g = dataflow_graph(traced)
    merges = []
    for node in traced.graph.nodes:
        if node.name not in g:
            continue
        op = ops.describe(node, traced)
        if op is None or op.kind != ops.MERGE:
            continue
        a, b = (arg.name for arg in op.inputs)
        fork = nx.lowest_common_ancestor(g, a, b)
        if fork is None:  # two unrelated inputs cannot happen with one placeholder; keep the add as a plain merge
            fork = a
        branches = [_branch(g, fork, a), _branch(g, fork, b)]
        # the skip is the shorter branch; on a tie the second operand (`x + shortcut`, `out += identity`)
        skip = 0 if len(branches[0]) < len(branches[1]) else 1
        skip_nodes, main_nodes = branches[skip], branches[1 - skip]
        if not skip_nodes:
            kind = IDENTITY
        elif _has_parametric_layer(traced, skip_nodes, g):
            kind = PROJECTION
        else:
            kind = OTHER
        merge = Merge(node.name, kind, fork, skip, skip_nodes, main_nodes, source_line(node))
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
    rows = [("#", "add", "skip", "fork", "skip len", "main len")]
    for i, m in enumerate(merges):
        rows.append((str(i), m.node, m.skip_kind, m.fork, str(m.skip_length), str(m.main_length)))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    counts = {k: sum(m.skip_kind == k for m in merges) for k in (IDENTITY, PROJECTION, OTHER)}
    lines.append(f"{len(merges)} merges: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return "\n".join(lines)
