"""The public entry points: `compile` (trace → analyze → rewrite) and `inspect`, and the `Explainer` they return."""
from __future__ import annotations

import copy
import itertools

import torch
import torch.fx as fx

from . import ops
from .analyze import Merge, find_merges, merge_table
from .canonize import fold_batchnorm
from . import preprocessing as prep
from .errors import CompileError, GraphLRPError, InputError, PresetError
from .labels import check_labels
from .memory import release_freed_memory
from .presets import CATEGORY_KINDS, Preset, RuleChoice, load_preset, parse_preset
from .rewrite import DERIVED_WEIGHTS, Assignment, Plan, Rewriter
from .rules import SPLITS
from .trace import Traced, trace
from .verify import Certificate, certify, raise_nonfinite, raise_not_conserved



def inspect(model: torch.nn.Module, example_input: torch.Tensor) -> list[Merge]:
    """The merge report: one `Merge` per residual add (node, skip_kind, skip_nodes, main_nodes, fork)."""
    return find_merges(trace(model, example_input))


def _category(op: ops.Op, first_layers: set, score_biases: set = frozenset()) -> str:
    if op.kind in (ops.CONV, ops.LINEAR) and op.node.name in first_layers:
        return "first_layer"
    if op.kind == ops.BIAS_ADD and op.node.name in score_biases:
        return "attention_bias"
    for category, kinds in CATEGORY_KINDS.items():
        if category not in ("first_layer", "attention_bias") and op.kind in kinds:
            return category
    return ""


_SCORE_PATH = (ops.BIAS_ADD, ops.SCALE, ops.IDENTITY, ops.MOVE, ops.RESHAPE, ops.SLICE)


def _score_biases(traced: Traced) -> set:
    """Constant adds whose result reaches a softmax through moves, scales and further constant adds only: biases of
    attention scores (Swin's relative position bias and shift mask), not position embeddings of tokens."""
    found = set()
    for node in traced.graph.nodes:
        if node.op == "output" or not node.meta.get("dynamic"):
            continue
        op = ops.describe(node, traced)
        if op is None or op.kind != ops.BIAS_ADD:
            continue
        frontier, seen = [node], set()
        while frontier:
            n = frontier.pop()
            for user in n.users:
                if user in seen or user.op == "output":
                    continue
                seen.add(user)
                used = ops.describe(user, traced)
                if used is not None and used.kind == ops.SOFTMAX:
                    found.add(node.name)
                elif used is not None and used.kind in _SCORE_PATH:
                    frontier.append(user)
    return found


def _first_layers(traced: Traced) -> set:
    """Conv/linear nodes with no conv/linear between them and the input."""
    behind: dict = {}
    first = set()
    for node in traced.graph.nodes:
        if node.op == "placeholder":
            behind[node] = False
            continue
        upstream = any(behind.get(a, False) for a in node.all_input_nodes)
        op = ops.describe(node, traced) if node.meta.get("dynamic") and node.op != "output" else None
        is_affine = op is not None and op.kind in (ops.CONV, ops.LINEAR)
        if is_affine and not upstream:
            first.add(node.name)
        behind[node] = upstream or is_affine
    return first


def _module_path(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


# a category a CNN preset need not name: a softmax under a gate (split attention, SK) or under attention pooling
# (a matmul's default `constant_weights`) takes no relevance; the rewrite names any that does
OPTIONAL_CATEGORIES = {"softmax"}


def make_plan(traced: Traced, preset: Preset, split: str, include_identity: bool, box) -> Plan:
    first = _first_layers(traced)
    score_biases = _score_biases(traced)
    assignments = {}
    for node in traced.graph.nodes:
        if not node.meta.get("dynamic") or node.op in ("placeholder", "output"):
            continue
        op = ops.describe(node, traced)
        if op is None:
            continue  # only an error if relevance reaches it (the rewrite says so, naming the node)
        category = _category(op, first, score_biases)
        if not category:
            continue
        names = (_module_path(node), node.name, str(node.meta.get("folded_from", ("",))[0]))
        choice = preset.rule_for(category, op.kind, names)
        if choice is None:
            if category in OPTIONAL_CATEGORIES:
                continue  # a softmax in a gate (split attention) takes no relevance; the rewrite names any that does
            raise PresetError(f"preset {preset.name!r} has no rule for {category} layers (node {node.name})")
        assignments[node.name] = Assignment(choice.rule, dict(choice.params))
    low, high = box
    return Plan(assignments, split, include_identity, preset.output, low, high)


class Explainer(torch.nn.Module):
    """A compiled LRP explainer: `logits, relevance = explainer(x[, target])`.

    Stateless: the graph holds the model's forward ops and the relevance pass as explicit tensor ops with constant
    rule weights; repeated calls give identical results. `graph_module` / `code` show the compiled graph.
    """

    def __init__(self, graph_module: fx.GraphModule, traced: Traced, merges: list[Merge], plan: Plan,
                 preset: Preset, info: dict):
        super().__init__()
        self.graph_module = graph_module
        self.merges = merges
        self.preset = preset
        self.plan = plan
        self.info = info
        self._traced = traced
        self._tap_module = None
        # the rule weights of graph_module by fingerprint: the taps module and the self-check's conservation trace,
        # built later from the same trace, hold these very tensors instead of copies (`rewrite.Emitter.pool`)
        self.constant_pool: dict = {}
        self.labels: list[str] | None = None
        self.certificate: Certificate | None = None  # what compile measured on this explainer (graphlrp.verify)
        self.eval()

    @property
    def preprocessing(self) -> "prep.Preprocessing":
        """How images become this explainer's input (written into the ONNX metadata)."""
        return prep.Preprocessing.from_dict(self.info["preprocessing"], self.info["input_size"])

    @property
    def num_classes(self) -> int | None:
        output = next(n for n in self._traced.graph.nodes if n.op == "output")
        shape = getattr(output.args[0], "meta", {}).get("shape") if isinstance(output.args[0], fx.Node) else None
        return int(shape[-1]) if shape else None

    def train(self, mode: bool = True):
        """An explainer is always in inference mode (BN uses running statistics); `train()` keeps it so."""
        return super().train(False)

    @property
    def code(self) -> str:
        return self.graph_module.code

    def _target(self, x: torch.Tensor, target) -> torch.Tensor:
        """The call's inputs checked (InputError, as `graphlrp.load(...).prepare` raises in onnxruntime) and its
        target as int64 [N]: the graph would broadcast a wrong-length target and explain nothing for an unknown
        class without a word."""
        self._check_input(x)
        n = x.shape[0]
        if target is None:
            return torch.full((n,), -1, dtype=torch.long, device=x.device)
        given = torch.as_tensor(target)
        if given.is_floating_point() or given.is_complex() or given.dtype == torch.bool or given.dim() > 1 \
                or (given.dim() == 1 and len(given) != n):
            raise InputError(f"target must be an integer class or {n} of them (one per sample), got {target!r}")
        target = given.to(dtype=torch.long, device=x.device)
        if target.dim() == 0:
            target = target.expand(n)
        classes = self.num_classes
        bad = target[(target < -1) | (target >= classes)] if classes else target[target < -1]
        if len(bad):
            raise InputError(f"unknown target class {int(bad[0])}: this explainer has {classes} classes "
                             f"(0..{(classes or 0) - 1}); use -1 for the predicted class")
        return target

    def _check_input(self, x) -> None:
        size = [int(d) for d in self.info["input_size"]]
        if not isinstance(x, torch.Tensor):
            raise InputError(f"input must be a torch.Tensor [N, {', '.join(map(str, size))}], got {type(x).__name__}")
        if x.dim() != len(size) + 1 or list(x.shape[1:]) != size:
            raise InputError(f"input has shape {list(x.shape)}; this explainer takes [N, {', '.join(map(str, size))}] "
                             "(its rules are specialised to the compile example's size: compile again for another)")
        if not x.is_floating_point():
            return  # token ids: the graph's own embedding says what it takes
        held = next((t for t in itertools.chain(self.graph_module.parameters(), self.graph_module.buffers())
                     if t.is_floating_point()), None)
        # the example's dtype (a float32 model may be compiled with a float64 example), or the weights' (an
        # explainer moved to float64 after its compile)
        example = next(n for n in self._traced.graph.nodes if n.op == "placeholder").meta.get("dtype")
        takes = [d for d in (example, None if held is None else held.dtype) if d is not None]
        if takes and x.dtype not in takes:
            raise InputError(f"input is {x.dtype}; this explainer computes in {takes[0]}: pass x.to({takes[0]})")
        if held is not None and x.device != held.device:
            raise InputError(f"input is on {x.device}, this explainer on {held.device}: move one of them")
        if not bool(torch.isfinite(x).all()):
            raise InputError("input contains NaN or infinite values")

    def forward(self, x: torch.Tensor, target=None):
        """(logits, relevance). Every call checks its relevance (one sum per sample): relevance that is NaN or
        infinite for a sample raises NonFiniteRelevanceError, and with a conserving preset a sample whose ΣR_in
        departs from R_out by more than 1e-3 raises NotConservedError; each names the node where it happens.
        Inputs that do not fit (shape, dtype, device, NaN, an unknown or wrong-length target) raise InputError."""
        target = self._target(x, target)
        with torch.no_grad():
            logits, relevance = self.graph_module(x, target)
        if not bool(torch.isfinite(relevance).all()):
            raise_nonfinite(self, x, target, relevance)
        raise_not_conserved(self, x, target, logits, relevance)
        return logits, relevance

    def explain_with_taps(self, x: torch.Tensor, target=None):
        """(logits, relevance, taps): taps maps names to per-sample relevance sums [N] in the same call —
        "output", "input", "block_input:i" (input of residual block i, forward order), and for every merge
        "merge:<add>.R", ".R_skip", ".R_main"."""
        if self._tap_module is None:
            self._tap_module = Rewriter(self._traced, self.merges, self.plan, taps=True,
                                        constant_pool=self.constant_pool).build().eval()
        with torch.no_grad():
            return self._tap_module(x, self._target(x, target))

    def merge_report(self) -> str:
        return merge_table(self.merges)

    def export_onnx(self, path, opset: int = 17, check: bool = True, metadata: dict | None = None,
                    verbose: bool = False, precision: str = "fp32", **preprocessing):
        """Write one ONNX model (inputs `input`, `target`; outputs `logits`, `relevance`); then onnx.checker and
        an onnxruntime parity check against this explainer. Returns the parity report. The batch size is dynamic;
        the image size is the compile size (the rules are specialised to it: transposed-convolution padding,
        pooling divisors), so compile once per input size. Keyword arguments `resize`, `crop_pct`,
        `interpolation`, `mean`, `std`, `labels` override the recorded preprocessing and class names.
        precision="fp16" writes every weight and tensor in float16 (input and outputs stay float32): half the
        file, for GPUs; the report's `fp16` states its distance to this float32 explainer and its conservation."""
        from .export import export_onnx

        return export_onnx(self, path, opset=opset, check=check, metadata=metadata, verbose=verbose,
                           precision=precision, **preprocessing)


FLOAT64_TWIN_MAX_BYTES = 4 * 2**30  # the float64 diagnosis of a departure (verify) for models up to 512 M parameters


def compile(model: torch.nn.Module, example_input: torch.Tensor, rules="otsuki2024", split: str | None = None,
            include_identity: bool | None = None, overrides: dict | None = None, box=None,
            model_name: str | None = None, preprocessing=None, resize: int | None = None,
            crop_pct: float | None = None, interpolation: str | None = None, mean=None, std=None,
            labels=None, verify: bool = True, allow_vanishing: bool = False,
            derived_weights: str = "auto") -> Explainer:
    """Compile `model` into an explainer. `rules`: preset name, TOML path, or dict; `split` and `include_identity`
    default to the preset's; `overrides`: {glob: rule} per-layer choices on top of the preset (like Zennit name
    maps); `box`: (low, high) input bounds for the zbox rule (default: [0, 1] pixels under the model's mean/std).

    How images become inputs is recorded with the explainer and written into its ONNX metadata: `preprocessing`
    (a `graphlrp.preprocessing.Preprocessing` or its dict) or else what the model says (timm's `pretrained_cfg`,
    attributes `input_size`/`mean`/`std`/`crop_pct`/`interpolation`), or else the usual crop ratio at the
    example's size; `resize`, `crop_pct`, `interpolation`, `mean`, `std` override parts of it; `labels` are
    class names (default: the model's `labels` attribute).

    Before it returns, the explainer checks itself (`graphlrp.verify`, `verify=True`): on the example's first
    sample and a perturbed copy, its forward must reproduce the model's, its relevance be finite, every exact merge
    split R = Σ R_i, and a preset with `conserving = true` conserve to 1e-3; relevance of another preset must not
    vanish (ΣR_in / R_out in [0.5, 2]; `allow_vanishing=True`, or the preset's `on_vanishing = "warn"`, makes
    that a warning). A failure is a `ConservationError` naming the node where the sum departs; the figures are in
    `explainer.certificate`. `verify=False` skips the check.

    `derived_weights`: the rule weights made from the model's (W⁺ and W⁻ of z⁺, |W| of the ε rule's guard) are
    "held" as buffers (fastest per call; up to 3x the model's weights in memory), "computed" from W in every call
    (the model's weights once; what an explainer built to be exported needs, as `graphlrp compile` builds it), or
    "auto": held up to `rewrite.DERIVED_WEIGHTS_HELD_UP_TO` bytes of model weights. The results, and the ONNX
    file, are the same either way."""
    preset = load_preset(rules)
    if overrides:
        extra = parse_preset({"overrides": overrides}, "overrides")
        # the compile() argument wins over the preset's own [overrides] (first matching pattern wins)
        merged = {**extra.overrides, **{k: v for k, v in preset.overrides.items() if k not in extra.overrides}}
        # the preset's promise of conservation was made for its own rules, not for the layers overridden here
        preset = Preset(**{**preset.__dict__, "overrides": merged, "conserving": False})
    split = split or preset.split
    if split not in SPLITS:
        raise PresetError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if derived_weights not in DERIVED_WEIGHTS:
        raise CompileError(f"derived_weights must be one of {', '.join(DERIVED_WEIGHTS)}, got {derived_weights!r}")
    if split == "signed" and preset.conserving:  # x·R/(Σx + ε): not exact where the terms cancel
        preset = Preset(**{**preset.__dict__, "conserving": False})
    include_identity = preset.include_identity if include_identity is None else bool(include_identity)
    image_prep = resolve_preprocessing(model, example_input, preprocessing, resize=resize, crop_pct=crop_pct,
                                       interpolation=interpolation, mean=mean, std=std)
    if box is None:
        m, s = torch.tensor(image_prep.mean), torch.tensor(image_prep.std)
        box = ((0 - m) / s, (1 - m) / s)
    try:
        traced = trace(model, example_input)
        folded = fold_batchnorm(traced) if preset.batchnorm == "fold" else None
        merges = find_merges(traced)
        plan = make_plan(traced, preset, split, include_identity, box)
        plan.derived_weights = derived_weights
        rewriter = Rewriter(traced, merges, plan)
        gm = rewriter.build()
    except GraphLRPError:
        raise
    except Exception as e:  # nothing but graphlrp's own errors leaves compile()
        raise CompileError(f"compiling {type(model).__name__} failed: {type(e).__name__}: {e}") from e
    info = {"preset": preset.name, "split": split, "include_identity": include_identity,
            "source_model": model_name or type(model).__name__,
            "input_size": list(example_input.shape[1:]), "output_relevance": preset.output,
            "batchnorm": preset.batchnorm, "preprocessing": image_prep.to_dict()}
    if folded is not None:
        info["batchnorm_folded"] = folded  # {"into_producer": n, "into_consumer": n, "kept": n}
    explainer = Explainer(gm, traced, merges, plan, preset, info)
    explainer.constant_pool = rewriter.constant_pool
    explainer.labels = check_labels(labels if labels is not None else getattr(model, "labels", None),
                                    explainer.num_classes, strict=labels is not None)
    if verify:
        try:
            def float64_twin():  # the same compile in float64: tells a rule's leak from float32's rounding
                if sum(p.numel() for p in model.parameters()) * 8 > FLOAT64_TWIN_MAX_BYTES:
                    return None  # a model this large in float64 could take the memory the user has left
                twin = copy.deepcopy(model).double()
                return compile(twin, example_input.double(), rules=preset, split=split,
                               include_identity=include_identity, box=box, verify=False)

            explainer.certificate = certify(explainer, model, example_input, allow_vanishing=allow_vanishing,
                                            float64_twin=float64_twin)
        except GraphLRPError:
            raise
        except Exception as e:  # nothing but graphlrp's own errors leaves compile()
            raise CompileError(f"checking the explainer of {type(model).__name__} failed: "
                               f"{type(e).__name__}: {e}") from e
        explainer.info["certificate"] = explainer.certificate.to_dict()
    release_freed_memory()  # the trace's and the check's values: gigabytes for a large model, not held on to
    return explainer


def resolve_preprocessing(model, example_input: torch.Tensor, given=None, **overrides) -> "prep.Preprocessing":
    """The preprocessing for `model` at the example's size: `given`, else the model's word, else the default."""
    channels, size = int(example_input.shape[1]), tuple(int(v) for v in example_input.shape[-2:])
    if isinstance(given, dict):
        given = prep.Preprocessing.from_dict(given, size)
    chosen = given or prep.from_model(model, channels) or prep.default(size, channels)
    chosen = chosen.at_size(size).with_overrides(**overrides)
    if len(chosen.mean) != channels:
        raise prep.PreprocessingError(f"the model takes {channels} channels but the preprocessing normalises "
                                      f"{len(chosen.mean)} (mean {list(chosen.mean)}); pass mean/std for each")
    return chosen


__all__ = ["compile", "inspect", "Explainer", "RuleChoice"]
