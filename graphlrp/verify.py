"""Stage 5 — verify: every compile checks its own explainer before handing it over (a certificate, not a test).

The explainer runs once on the example (its first sample) and on a perturbed copy of it, and must:
  * reproduce the model's forward (logits within FORWARD_TOLERANCE, max |a - b| / max |b|): a trace that baked in
    a value-dependent path, or a rewrite that changed the forward, fails here;
  * return finite relevance;
  * split exactly at every merge (R = Σ R_i) where the split is exact by construction (ratio, symmetric);
  * conserve, |ΣR_in / R_out − 1| ≤ CONSERVATION_TOLERANCE per sample, when its preset declares
    `conserving = true`;
  * for any other preset, not lose or multiply the relevance: ΣR_in / R_out within VANISHING_BOUNDS (relevance
    that vanishes is an explanation of nothing, e.g. ε absorbing features that reach the head at 1e-14).

It also measures how far relevance of both signs grows, Σ|R| / |R_out| at the input (the map's own mass) and at
its peak over the relevance pass; past MASS_WARNING the sum holds only to float32's rounding of that mass and the
map shows mostly relevance that cancels, so the compile warns and says where.

A failure is a `ConservationError` naming the first node in relevance order where the sum departs: the
conservation trace (`Rewriter(trace_nodes=True)`: the total relevance arriving at every node and handed on by it)
locates it. The measured figures (`Certificate`) go into the compile summary, `Explainer.certificate`, the
`ExportReport` and the ONNX metadata.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch

from . import ops
from .conservation import CONSERVATION_TOLERANCE, departures
from .errors import ConservationError, NonFiniteRelevanceError, NotConservedError, VanishingRelevanceError
from .graph import describe_node
from .memory import release_freed_memory
from .rewrite import Rewriter

FORWARD_TOLERANCE = 1e-4
MERGE_TOLERANCE = 1e-5  # Σ(R − Σ R_i) at a merge, relative to Σ|R| there (float32 rounding: ~1e-7)
VANISHING_BOUNDS = (0.5, 2.0)
PERTURBATION = 0.1  # the second sample: the example plus this fraction of its std in Gaussian noise
LEAKS_REPORTED = 5
MASS_WARNING = 1e4  # Σ|R| / |R_out| from which float32 rounding (6e-8 of Σ|R|) nears the 1e-3 conservation limit


@dataclass
class Leak:
    """Relevance one node of the relevance pass did not hand on (positive) or created (negative), as a fraction
    of the relevance put on the output."""

    node: str
    op: str
    rule: str
    where: str
    fraction: float


@dataclass
class Certificate:
    """What the compile measured on its own explainer (per sample: the example, then its perturbed copy)."""

    conserving: bool  # the preset promises conservation, so the ratio was held to CONSERVATION_TOLERANCE
    ratio: list  # ΣR_in / R_out per sample (nan where the output relevance is 0)
    forward_error: float  # explainer logits vs the model's
    merge_gap: float | None  # max |Σ(R − Σ R_i)| / Σ|R| over exact merges (None: no exact merge)
    leaks: list = field(default_factory=list)  # the largest per-node leaks, largest first
    vanished: str = ""  # where relevance vanished, when that was allowed (compile(allow_vanishing=True))
    seconds: float = 0.0
    input_mass: float = float("nan")  # Σ|R_in| / |R_out|: 1 where the map has one sign, more where signs cancel
    peak_mass: float = float("nan")  # the largest Σ|R| / |R_out| at any node of the relevance pass
    peak_mass_at: str = ""  # that node, described
    grown: str = ""  # the warning given where peak_mass passes MASS_WARNING

    @property
    def worst_ratio_error(self) -> float:
        finite = [abs(r - 1) for r in self.ratio if not math.isnan(r)]
        return max(finite) if finite else float("nan")

    def summary(self) -> str:
        """One line for the compile summary."""
        ratios = ", ".join(f"{r:.6g}" for r in self.ratio)
        text = (f"forward {self.forward_error:.1e}, ΣR_in/R_out {ratios}"
                + (f" (conserving: limit |ratio − 1| ≤ {CONSERVATION_TOLERANCE:g})" if self.conserving else "")
                + (f", merges exact to {self.merge_gap:.1e}" if self.merge_gap is not None else ""))
        if self.leaks and not self.conserving:
            top = self.leaks[0]
            text += f"; largest leak {top.fraction:+.2%} at {top.node} ({top.op}, rule {top.rule})"
        if math.isfinite(self.input_mass):
            text += f"; Σ|R| / |R_out| {self.input_mass:.3g} at the input, {self.peak_mass:.3g} at most"
        return text

    def to_dict(self) -> dict:
        data = asdict(self)
        data["ratio"] = [None if math.isnan(r) else r for r in self.ratio]
        for key in ("input_mass", "peak_mass"):  # JSON has no NaN
            data[key] = None if math.isnan(data[key]) else data[key]
        return data


def example_pair(example: torch.Tensor) -> torch.Tensor:
    """The example's first sample and a perturbed copy (a fixed seed: the same check on every run)."""
    x = example[:1].detach()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype)
    scale = float(x.double().std()) if x.numel() > 1 else 1.0
    return torch.cat([x, x + PERTURBATION * (scale if scale > 0 else 1.0) * noise])


def _model_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's own forward in inference mode (the explainer's BN and dropout are in inference mode too), one
    sample at a time like the explainer's run below: kernels chosen for another batch size round differently, and
    an ill-conditioned model (an FRN over a 1×1 map: x / √(x² + ε)) turns that into a different output. Every
    submodule's mode is restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            outs = [model(x[i:i + 1]) for i in range(x.shape[0])]
    finally:
        for m, mode in modes:
            m.training = mode
    return torch.cat([out[0] if isinstance(out, (tuple, list)) else out for out in outs])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


class _NodeTrace:
    """The conservation trace, read in relevance order: per node, the relevance arriving and what it hands on."""

    def __init__(self, sums: dict, traced, plan, output_total: float):
        nodes = {n.name: n for n in traced.graph.nodes}
        self.traced = traced
        self.rows = []  # (node, total in, total out), in relevance order
        arriving, shares = {}, {}
        for key, value in sums.items():
            if key.startswith("node:"):
                name, _, share = key[len("node:"):].partition(">")
                if share:
                    shares[name] = shares.get(name, 0.0) + float(value)
                else:
                    arriving[name] = float(value)
        for name, total in arriving.items():
            node = nodes.get(name)
            if node is not None and node.op != "placeholder":
                self.rows.append((node, total, shares.get(name, 0.0)))
        self.masses = {key[len("mass:"):]: float(value) for key, value in sums.items() if key.startswith("mass:")}
        self.plan, self.scale = plan, max(output_total, 1e-30)

    def kind(self, node) -> str:
        """The node's op kind (what the rule saw), or its fx target where no describer knows it."""
        try:
            op = ops.describe(node, self.traced)
        except Exception:  # noqa: BLE001 - a describer that cannot say: name the fx target instead
            op = None
        return op.kind if op is not None else str(node.target)

    def rule(self, node) -> str:
        assignment = self.plan.rules.get(node.name)
        return assignment.rule if assignment else "structural"

    def describe(self, node) -> str:
        return f"{describe_node(node)} (op {self.kind(node)}, rule {self.rule(node)})"

    def leak(self, node, arriving: float, handed_on: float) -> Leak:
        return Leak(node.name, self.kind(node), self.rule(node), describe_node(node),
                    (arriving - handed_on) / self.scale)

    def largest(self, n: int = LEAKS_REPORTED) -> list:
        leaks = [self.leak(*row) for row in self.rows]
        leaks = [lk for lk in leaks if math.isfinite(lk.fraction) and lk.fraction != 0]
        return sorted(leaks, key=lambda lk: -abs(lk.fraction))[:n]

    def first_nonfinite(self):
        for node, arriving, handed_on in self.rows:
            if math.isfinite(arriving) and not math.isfinite(handed_on):
                return node, arriving, handed_on
        return None

    def first_growth(self, factor: float):
        """(node, Σ|R| / |R_out|) of the first node in relevance order whose Σ|R| exceeds `factor` × |R_out|."""
        for node, _arriving, _handed_on in self.rows:
            mass = self.masses.get(node.name, 0.0) / self.scale
            if mass > factor:
                return node, mass
        return None

    def first_departure(self, low: float, high: float):
        """The first node after which the relevance still in flight (the output's, less every leak so far) leaves
        [low, high] of the output's."""
        alive = 1.0
        for node, arriving, handed_on in self.rows:
            alive -= (arriving - handed_on) / self.scale
            if not low <= alive <= high:
                return node, arriving, handed_on, alive
        return None


def _per_sample(module, x: torch.Tensor, target: torch.Tensor):
    """(logits, relevance, sums) of `module` run on one sample at a time and concatenated: the explainer treats
    samples independently, and the relevance pass keeps every forward value it needs (SAM's global attention at
    1024 px: 0.8 GB per block and image), so the check's peak memory is that of one image, not of the pair."""
    parts = []
    with torch.no_grad():
        for i in range(x.shape[0]):
            parts.append(module(x[i:i + 1], target[i:i + 1]))
            release_freed_memory()  # the next sample starts from the live memory, not this one's freed heap
    logits, relevance = (torch.cat([p[k] for p in parts]) for k in (0, 1))
    sums = {name: torch.cat([p[2][name] for p in parts]) if parts[0][2][name].dim()  # per sample [N]
            else sum(p[2][name] for p in parts)  # a node's sum over the batch
            for name in parts[0][2]}
    return logits, relevance, sums


def _tracer(explainer):
    """The explainer's relevance pass rebuilt with the conservation trace (ΣR per node), sharing its rule
    weights (the constant pool), not copies."""
    return Rewriter(explainer._traced, explainer.merges, explainer.plan, trace_nodes=True,
                    constant_pool=explainer.constant_pool).build()


def _sample_trace(explainer, x: torch.Tensor, target: torch.Tensor, i: int) -> _NodeTrace:
    """The conservation trace of sample i of `x`: where a per-call check failed, it names the node."""
    with torch.no_grad():
        _, _, sums = _tracer(explainer)(x[i:i + 1], target[i:i + 1])
    return _NodeTrace(sums, explainer._traced, explainer.plan, float(sums["output"].double().abs().sum()))


def certify(explainer, model: torch.nn.Module, example: torch.Tensor, allow_vanishing: bool = False,
            float64_twin=None) -> Certificate:
    """Run the checks above on `explainer` (compiled from `model`); raise ConservationError on a wrong explainer.
    `float64_twin`: a function returning the same explainer compiled in float64 (unchecked); where a conserving
    preset departs, its ratio tells the user whether the rules leak or float32 cannot hold the map's sum."""
    start = time.perf_counter()
    traced, plan, preset = explainer._traced, explainer.plan, explainer.preset
    allow_vanishing = allow_vanishing or preset.on_vanishing == "warn"
    x = example_pair(example)
    target = torch.full((x.shape[0],), -1, dtype=torch.long)
    reference = _model_logits(model, x)
    tracer = _tracer(explainer)
    logits, relevance, sums = _per_sample(tracer, x, target)
    out = sums["output"].double()
    ratio = [float(r) for r in (sums["input"].double() / out).where(out != 0, torch.nan)]
    node_trace = _NodeTrace(sums, traced, plan, float(out.abs().sum()))
    cert = Certificate(conserving=preset.conserving, ratio=ratio, forward_error=float("nan"), merge_gap=None,
                       leaks=node_trace.largest())
    _measure_mass(cert, node_trace)
    name = f"preset {preset.name!r}"

    if tuple(reference.shape) != tuple(logits.shape):
        raise ConservationError(f"the explainer's logits have shape {tuple(logits.shape)} but the model's "
                                f"{tuple(reference.shape)}")
    cert.forward_error = _rel(logits, reference)
    if not cert.forward_error <= FORWARD_TOLERANCE:
        raise ConservationError(
            f"the explainer's forward does not reproduce the model: max relative difference "
            f"{cert.forward_error:.2e} > {FORWARD_TOLERANCE:g} on the example and a perturbed copy (a traced path "
            "that depends on the input's values, or a layer whose inference mode differs?)")
    if not bool(torch.isfinite(relevance).all()):
        found = node_trace.first_nonfinite()
        where = (f": the relevance first stops being finite at {node_trace.describe(found[0])}: ΣR arriving "
                 f"{found[1]:.4g}, handed on {found[2]:.4g}") if found else ""
        raise ConservationError(f"{name} returns non-finite relevance on this model{where}")
    merge_gap, merge = _merge_gap(node_trace, explainer, sums)
    cert.merge_gap = merge_gap
    if merge_gap is not None and not merge_gap <= MERGE_TOLERANCE:
        raise ConservationError(f"{name}: a merge does not split exactly at {node_trace.describe(merge)}: "
                                f"Σ(R − Σ_i R_i) = {merge_gap:.2e} of Σ|R| there (limit {MERGE_TOLERANCE:g})")
    cert.seconds = time.perf_counter() - start
    if all(math.isnan(r) for r in ratio):  # no relevance on the output: the explanation shows nothing
        message = (f"{name}: the relevance put on the output is 0 for every sample, so the explainer explains "
                   "nothing: the output does not depend on the input (a zero-initialised head, as timm and "
                   "torchvision initialise ViT and MLP-Mixer heads; train the model or load its weights)")
        return _vanished(cert, message, allow_vanishing)
    if preset.conserving:
        if not cert.worst_ratio_error <= CONSERVATION_TOLERANCE:
            found = node_trace.first_departure(1 - CONSERVATION_TOLERANCE, 1 + CONSERVATION_TOLERANCE)
            found = found or _largest_row(node_trace)
            raise ConservationError(
                f"{name} declares itself conserving, but on this model ΣR_in / R_out = "
                f"{', '.join(f'{r:.6g}' for r in ratio)} (limit |ratio − 1| ≤ {CONSERVATION_TOLERANCE:g})"
                f"{_departure(found, node_trace)}{_leak_list(cert.leaks)}"
                f"{_cancellation(node_trace, x, target, float64_twin)}")
        return _warn_if_grown(cert, name)
    low, high = VANISHING_BOUNDS
    if all(math.isnan(r) or low <= r <= high for r in ratio):
        return _warn_if_grown(cert, name)
    found = node_trace.first_departure(low, high) or _largest_row(node_trace)
    vanishes = "vanishes" if min(r for r in ratio if not math.isnan(r)) < low else "grows"
    message = (f"{name}: the relevance {vanishes} on this model, ΣR_in / R_out = "
               f"{', '.join(f'{r:.4g}' for r in ratio)} (outside [{low:g}, {high:g}])"
               f"{_departure(found, node_trace)}{_leak_list(cert.leaks)}; the explanation would show "
               f"{'almost nothing' if vanishes == 'vanishes' else 'relevance the prediction does not have'}. "
               "A conserving preset (otsuki2024-conserving, cp-lrp-conserving) keeps it; with random weights "
               "features can reach the head at ~1e-14, where any ε absorbs them")
    return _vanished(cert, message, allow_vanishing)


def _measure_mass(cert: Certificate, node_trace: _NodeTrace) -> None:
    """Σ|R| / |R_out| (over the example pair) at the input and at its largest node: how much of the map is
    relevance of both signs that cancels."""
    placeholders = {n.name for n in node_trace.traced.graph.nodes if n.op == "placeholder"}
    masses = {name: value / node_trace.scale for name, value in node_trace.masses.items()}
    inputs = [masses[name] for name in placeholders if name in masses]
    if not inputs or node_trace.scale <= 1e-30:
        return
    cert.input_mass = sum(inputs)
    peak = max(masses, key=masses.get)
    cert.peak_mass = masses[peak]
    node = next((n for n in node_trace.traced.graph.nodes if n.name == peak), None)
    cert.peak_mass_at = node_trace.describe(node) if node is not None else peak


def _warn_if_grown(cert: Certificate, name: str) -> Certificate:
    """Relevance of both signs grown past MASS_WARNING × the output's: the map's values hold only to float32's
    rounding of that mass (and where the map itself is that large, it shows mostly relevance that cancels). A
    warning, kept in the certificate; float64 computes such a map exactly."""
    if not cert.peak_mass > MASS_WARNING:
        return cert
    in_map = (f"; the map itself holds {cert.input_mass:.2g}× the output's relevance, mostly of both signs that "
              "cancel" if cert.input_mass > MASS_WARNING else "")
    cert.grown = (f"{name}: relevance of both signs grows to {cert.peak_mass:.2g}× the output's in the relevance "
                  f"arriving at {cert.peak_mass_at}, so in float32 the map's values hold only to "
                  f"~{cert.peak_mass * 6e-8:.0e} of the output{in_map}. Compile in float64 (model.double() and a "
                  "float64 example) for exact values")
    warnings.warn(cert.grown, stacklevel=3)
    return cert


CANCELLING = 100.0  # Σ|R| / |R_out| from which relevance of both signs cancels enough for float32 to show
FLOAT64_HOLDS = 1e12  # Σ|R| / |R_out| beyond which float64's own rounding (~1e-16 of Σ|R|) nears 1e-3 of R_out


def _cancellation(node_trace: _NodeTrace, x: torch.Tensor, target: torch.Tensor, float64_twin) -> str:
    """Why a conserving preset departs. Where Σ|R| stays within CANCELLING × |R_out|, float32 rounding cannot
    reach 1e-3 and a rule leaks. Where relevance of both signs grew past it, the same explainer in float64 tells:
    within 1e-3 there, the rules conserve and float32 rounding of a sum of ±Σ|R| values is what departs."""
    growth = node_trace.first_growth(CANCELLING)
    if growth is None:
        return (f". Σ|R| stays within {CANCELLING:g}× |R_out| at every node, so float32 rounding cannot explain "
                "the departure: a rule leaks")
    node, _ = growth
    peak = max(node_trace.masses.values()) / node_trace.scale
    givers = ", ".join(f"{user.name!r} ({node_trace.kind(user)}, rule {node_trace.rule(user)})" for user in node.users
                       if user.op != "output")
    text = (f". Relevance of both signs cancels: Σ|R| grows past {CANCELLING:g}× |R_out| in the relevance "
            f"{'handed by ' + givers + ' ' if givers else ''}to {node_trace.describe(node)}, and reaches {peak:.2g}×")
    if float64_twin is None:
        return text
    try:
        twin = float64_twin()
        if twin is None:
            return f"{text} (the float64 check that tells a leak from rounding is skipped for a model this large)"
        with torch.no_grad():
            _, _, twin_sums = _per_sample(_tracer(twin), x.double(), target)
        out = twin_sums["output"].double()
        ratio = [float(r) for r in (twin_sums["input"].double() / out).where(out != 0, torch.nan)]
    except Exception:  # noqa: BLE001 - the float64 twin is a diagnosis; without it the error stands as it is
        return text
    finite = [abs(r - 1) for r in ratio if math.isfinite(r)]
    shown = ", ".join(f"{r:.6g}" for r in ratio)
    if finite and max(finite) <= CONSERVATION_TOLERANCE:
        return (f"{text}. In float64 the same explainer conserves (ΣR_in / R_out = {shown}): its rules hold, and "
                "float32 cannot round sums of values this large to the output. The rules amplify relevance of both "
                "signs on this model; compile it in float64 (model.double() and a float64 example) for an exact "
                "map, or use otsuki2024-conserving (z⁺: relevance of one sign)")
    if peak > FLOAT64_HOLDS:
        return (f"{text}. In float64 it departs too (ΣR_in / R_out = {shown}): relevance {peak:.1g}× the output is "
                "beyond what float64 sums to 1e-3 either. The rules amplify relevance of both signs without bound "
                "here (an ε-rule with biases left out divides by a bias-free z that can be ~0 where the unit's "
                "input with its bias or batch-norm shift is not); otsuki2024-conserving (z⁺: relevance of one "
                "sign) conserves on such models")
    return f"{text}. In float64 it departs too (ΣR_in / R_out = {shown}): a rule leaks"


def _vanished(cert: Certificate, message: str, allowed: bool) -> Certificate:
    """Vanishing relevance: an error, or (allowed) a warning the certificate keeps."""
    if not allowed:
        raise VanishingRelevanceError(message)
    cert.vanished = message
    warnings.warn(message, stacklevel=4)
    return cert


def _largest_row(node_trace: _NodeTrace):
    rows = [r for r in node_trace.rows if math.isfinite(r[1] - r[2])]
    if not rows:
        return None
    node, arriving, handed_on = max(rows, key=lambda r: abs(r[1] - r[2]))
    return node, arriving, handed_on, float("nan")


def _departure(found, node_trace: _NodeTrace) -> str:
    if found is None:
        return ""
    node, arriving, handed_on, _alive = found
    return (f". The sum departs first at {node_trace.describe(node)}: ΣR {arriving:.6g} arriving, "
            f"{handed_on:.6g} handed on")


def _leak_list(leaks: list) -> str:
    if not leaks:
        return ""
    return ". Largest leaks: " + "; ".join(f"{lk.node} ({lk.op}, {lk.rule}) {lk.fraction:+.2e}" for lk in leaks[:3])


def _merge_gap(node_trace: _NodeTrace, explainer, sums: dict):
    """The largest |Σ(R − Σ_i R_i)| over the merges whose split is exact by construction (ratio, symmetric), as a
    fraction of Σ|R| at that merge (elementwise R = Σ R_i holds to float rounding, which scales with Σ|R| where
    relevance of both signs cancels), and the merge where it is; (None, None) where there is none."""
    if explainer.plan.split == "signed":
        return None, None
    names = {m.node for m in explainer.merges}
    rows = [(abs(arriving - handed_on) / max(float(sums[f"mass:{node.name}"]), 1e-30), node)
            for node, arriving, handed_on in node_trace.rows if node.name in names]
    if not rows:
        return None, None
    gap, node = max(rows, key=lambda r: r[0] if math.isfinite(r[0]) else math.inf)
    return gap, node


def raise_nonfinite(explainer, x: torch.Tensor, target: torch.Tensor, relevance: torch.Tensor) -> None:
    """Raise NonFiniteRelevanceError where `relevance` (the explainer's on `x`) is NaN or infinite for a sample; the
    conservation trace of the first such sample names the node where it stops being finite. A rule can divide by
    a denominator that rounds to exactly 0 on one input and not on the example (`otsuki2024`'s z + ε with a kept
    negative bias): an error, never a NaN map handed over as an explanation."""
    bad = [i for i, ok in enumerate(torch.isfinite(relevance).flatten(1).all(1).tolist()) if not ok]
    if not bad:
        return
    node_trace = _sample_trace(explainer, x, target, bad[0])
    found = node_trace.first_nonfinite()
    where = (f"; it first stops being finite at {node_trace.describe(found[0])}: ΣR arriving {found[1]:.4g}, "
             f"handed on {found[2]:.4g}") if found else ""
    raise NonFiniteRelevanceError(
        f"preset {explainer.preset.name!r}: the relevance is not finite for sample(s) {bad} of {len(relevance)}"
        f"{where} (the explainer passed its check on the compile example; the preset "
        "otsuki2024-conserving (z⁺ with dead units spread), divides only where its denominator is not 0)")


def raise_not_conserved(explainer, x: torch.Tensor, target: torch.Tensor, logits: torch.Tensor,
                        relevance: torch.Tensor) -> None:
    """Raise NotConservedError where the explainer of a conserving preset does not conserve on a sample of `x`
    (`graphlrp.conservation.departures`); the conservation trace of the first such sample names the node where
    the sum departs. The certificate checked two inputs; float32 can break the promise on a third (a unit whose
    contributions cancel to rounding), and a map that does not add up must not pass as the preset's."""
    if not explainer.preset.conserving:
        return
    flat = relevance.detach().flatten(1)
    sums = flat.sum(1, dtype=torch.float64)  # no float64 copy of the map: two reductions
    magnitudes = torch.linalg.vector_norm(flat, 1, dim=1, dtype=torch.float64)
    bad = departures(logits.detach().double().cpu().numpy(), sums.cpu().numpy(), magnitudes.cpu().numpy(),
                     target.cpu().numpy(), explainer.info["output_relevance"])
    if not bad:
        return
    node_trace = _sample_trace(explainer, x, target, min(bad))
    found = node_trace.first_departure(1 - CONSERVATION_TOLERANCE, 1 + CONSERVATION_TOLERANCE)
    found = found or _largest_row(node_trace)
    ratios = ", ".join(f"sample {k}: {v:.6g}" for k, v in sorted(bad.items()))
    raise NotConservedError(
        f"preset {explainer.preset.name!r} declares itself conserving, but on this input ΣR_in / R_out = {ratios} "
        f"(limit |ratio − 1| ≤ {CONSERVATION_TOLERANCE:g}; it conserved on the compile example)"
        f"{_departure(found, node_trace)}{_leak_list(node_trace.largest())}"
        f"{_cancellation(node_trace, x, target, None)}. The map would not add up to the prediction, so none is "
        "returned")
