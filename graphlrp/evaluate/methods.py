"""Attribution methods compared by `graphlrp evaluate`, one small function each, registered by decorator.

A method function takes the run's `Context` and yields `attribute(x, target) -> attributions` for a batch of
normalised images and target classes; code after the `yield` undoes whatever it attached to the model (hooks,
canonizers), so methods never see each other's changes. Methods with the same `source` share one computation and
differ only in post-processing (the paper quantizes its own maps to 8 heat levels; `-raw` rows do not).
A method that cannot run on the model or the installed libraries raises `Unavailable`; the run reports it as
skipped and goes on. Baselines come from maintained libraries (Captum, Zennit, pytorch-grad-cam), not rewrites.
"""
from __future__ import annotations

import contextlib
import functools
import types
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

Attribute = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Unavailable(Exception):
    """The method cannot run here (missing library or preset, unsupported model); the message says why."""


@dataclass
class Context:
    """What the methods of one run share: the model, an example input, and a place for notes on the output."""

    model: torch.nn.Module
    example: torch.Tensor  # [1, C, H, W], normalised
    batch_size: int = 64
    cam_layer: str | None = None
    box: tuple[torch.Tensor, torch.Tensor] | None = None  # per channel: a black and a white pixel, normalised
    notes: dict[str, list[str]] = field(default_factory=dict)

    def note(self, source: str, text: str) -> None:
        self.notes.setdefault(source, []).append(text)


@dataclass(frozen=True)
class Method:
    name: str
    run: Callable[[Context], contextlib.AbstractContextManager[Attribute]]
    source: str
    quantize: bool
    description: str


METHODS: dict[str, Method] = {}


def register(name: str, description: str, source: str | None = None, quantize: bool = False):
    """Decorator: add a generator function `fn(ctx)` that yields an `Attribute` under `name`."""
    def deco(fn: Callable[[Context], Iterator[Attribute]]):
        METHODS[name] = Method(name, contextlib.contextmanager(fn), source or name, quantize, description)
        return fn
    return deco


# Named sets of methods, usable wherever a method name is. `default` is the paper's Table 1 (its method, ours-iv,
# and its five baselines) plus graphlrp's conserving preset; `table2` the paper's four splitting variants.
METHOD_SETS: dict[str, tuple[str, ...]] = {
    "default": ("ours-iv", "gradcam", "scorecam", "ig", "guided-bp", "lrp-epsilon", "graphlrp-otsuki2024-conserving"),
    "table2": ("ours-i", "ours-ii", "ours-iii", "ours-iv"),
}


def resolve(spec: str) -> list[str]:
    """'all', a set name (default, table2) or a comma-separated list of set and method names -> method names in the
    order given (a set expands in place, repeats dropped); unknown names are rejected with the list of known ones."""
    from . import EvaluationError

    names: list[str] = []
    tokens = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [t for t in tokens if t not in METHODS and t not in METHOD_SETS and t != "all"]
    if unknown or not tokens:
        raise EvaluationError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; available: all, "
                              f"{', '.join(METHOD_SETS)}, {', '.join(METHODS)}")
    for token in tokens:
        expanded = list(METHODS) if token == "all" else METHOD_SETS.get(token, (token,))
        names += [n for n in expanded if n not in names]
    return names


QUANTIZE_MODES = ("ours", "all", "none")


def quantized(method: Method, mode: str) -> bool:
    """Whether `method`'s maps get the 8-level heat quantization under `--quantize mode`: `ours` is the paper's
    protocol (only the paper's own maps, the `ours-*` rows), `all` and `none` treat every method alike."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize mode must be one of {QUANTIZE_MODES}, got {mode!r}")
    return method.quantize if mode == "ours" else mode == "all"


# --- graphlrp ------------------------------------------------------------------------------------------------------

def _graphlrp(ctx: Context, rules: str, **options) -> Iterator[Attribute]:
    import graphlrp
    from graphlrp.errors import GraphLRPError

    try:
        explainer = graphlrp.compile(ctx.model, ctx.example, rules=rules, box=ctx.box, **options)
    except GraphLRPError as e:  # unknown preset, or a model the compiler cannot explain
        raise Unavailable(f"graphlrp could not compile the model with rules={rules!r}: {e}") from e
    yield lambda x, target: explainer(x, target)[1]


# The four relevance-splitting variants of the paper's Table 2, with the rules of its released code.
OURS = {"i": ("symmetric", False), "ii": ("symmetric", True), "iii": ("ratio", False), "iv": ("ratio", True)}
for _roman, (_split, _identity) in OURS.items():
    _source = f"graphlrp otsuki2024 split={_split} include_identity={_identity}"
    _run = functools.partial(_graphlrp, rules="otsuki2024", split=_split, include_identity=_identity)
    register(f"ours-{_roman}", f"{_source}, 8-level heat quantization", _source, quantize=True)(_run)
    register(f"ours-{_roman}-raw", f"{_source}, no quantization", _source)(_run)

OTHER_PRESETS = ("otsuki2024-conserving", "epsilon-plus-flat", "epsilon-gamma-box", "epsilon-alpha2-beta1")
for _preset in OTHER_PRESETS:
    register(f"graphlrp-{_preset}", f"graphlrp preset {_preset} (its default splitting), no quantization")(
        functools.partial(_graphlrp, rules=_preset))


# --- CAMs (pytorch-grad-cam) ---------------------------------------------------------------------------------------

def last_stage(model: torch.nn.Module, example: torch.Tensor, name: str | None = None) -> tuple[str, torch.nn.Module]:
    """The module CAMs look at: `name` if given, else the container that finishes last with a spatial (4-D, larger
    than 1×1) output — `layer4` of torchvision ResNets, `layer3` of CIFAR ResNets: the last residual stage."""
    modules = dict(model.named_modules())
    if name:
        if name not in modules:
            raise Unavailable(f"--cam-layer {name!r} is not a module of the model")
        return name, modules[name]
    finished: list[str] = []

    def hook(mod_name):
        def record(_module, _inputs, output):
            if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[-1] * output.shape[-2] > 1:
                finished.append(mod_name)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items() if n and any(True for _ in m.children())]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    if not finished:
        raise Unavailable("no module container with a spatial output to attach a CAM to; pass --cam-layer")
    return finished[-1], modules[finished[-1]]


def _cam(ctx: Context, source: str, cam_class, **attrs) -> Iterator[Attribute]:
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer_name, layer = last_stage(ctx.model, ctx.example, ctx.cam_layer)
    ctx.note(source, f"target layer `{layer_name}`")
    cam = cam_class(model=ctx.model, target_layers=[layer])
    for key, value in attrs.items():
        setattr(cam, key, value)
    try:
        yield lambda x, target: torch.from_numpy(
            cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in target]))
    finally:
        cam.activations_and_grads.release()


@register("gradcam", "Grad-CAM (pytorch-grad-cam) on the last residual stage, upsampled bilinearly")
def gradcam(ctx: Context) -> Iterator[Attribute]:
    from pytorch_grad_cam import GradCAM

    yield from _cam(ctx, "gradcam", GradCAM)


@register("scorecam", "Score-CAM (pytorch-grad-cam) on the last residual stage, upsampled bilinearly")
def scorecam(ctx: Context) -> Iterator[Attribute]:
    from unittest import mock

    import tqdm
    from pytorch_grad_cam import ScoreCAM, score_cam

    # Score-CAM opens a progress bar per image; silence those so the run's own bar stays readable
    quiet = types.SimpleNamespace(tqdm=functools.partial(tqdm.tqdm, disable=True))
    with mock.patch.object(score_cam, "tqdm", quiet):
        yield from _cam(ctx, "scorecam", ScoreCAM, batch_size=ctx.batch_size)


# --- Captum ----------------------------------------------------------------------------------------------------------

@register("ig", "Integrated Gradients (Captum), 50 steps from the all-zero normalised input")
def integrated_gradients(ctx: Context) -> Iterator[Attribute]:
    from captum.attr import IntegratedGradients

    ig = IntegratedGradients(ctx.model)
    yield lambda x, target: ig.attribute(x, target=target, n_steps=50, internal_batch_size=ctx.batch_size)


def with_relu_modules(model: torch.nn.Module) -> tuple[torch.nn.Module, int]:
    """A torch.fx copy of `model` whose functional ReLUs (F.relu, torch.relu, x.relu()) are `nn.ReLU` modules,
    and how many were replaced. Captum's GuidedBackprop hooks ReLU *modules* only; without this, a model written
    with F.relu (like the CIFAR ResNets) would silently get the plain gradient."""
    import torch.fx
    import torch.nn.functional as F

    gm = torch.fx.symbolic_trace(model)
    functional = {F.relu, torch.relu, torch.relu_}
    replaced = 0
    for node in list(gm.graph.nodes):
        if (node.op == "call_function" and node.target in functional) or \
                (node.op == "call_method" and node.target in ("relu", "relu_")):
            name = f"guided_relu_{replaced}"
            gm.add_submodule(name, torch.nn.ReLU())
            with gm.graph.inserting_after(node):
                new = gm.graph.call_module(name, (node.args[0],))
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            replaced += 1
    gm.recompile()
    return gm.eval(), replaced


@register("guided-bp", "Guided Backpropagation (Captum)")
def guided_backprop(ctx: Context) -> Iterator[Attribute]:
    from captum.attr import GuidedBackprop

    try:
        model, replaced = with_relu_modules(ctx.model)
    except Exception as e:  # untraceable model: Captum still guides its nn.ReLU modules
        model, replaced = ctx.model, 0
        ctx.note("guided-bp", f"torch.fx could not trace the model ({type(e).__name__}); functional ReLUs, if any, "
                              "pass the plain gradient")
    if replaced:
        ctx.note("guided-bp", f"{replaced} functional ReLUs turned into nn.ReLU modules so Captum guides them")
    gbp = GuidedBackprop(model)
    yield lambda x, target: gbp.attribute(x, target=target)


# --- Zennit ----------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _zennit(model: torch.nn.Module, composite) -> Iterator[Attribute]:
    """Zennit's rules are gradient hooks: relevance at the input is the modified gradient of the one-hot target."""
    from zennit.attribution import Gradient

    def one_hot(target):
        return lambda logits: torch.nn.functional.one_hot(target, logits.shape[-1]).to(logits.dtype)

    with Gradient(model=model, composite=composite) as attributor:
        yield lambda x, target: attributor(x, one_hot(target))[1]


def _canonizer_note(ctx: Context, source: str, composite) -> None:
    """Say what Zennit's ResNetCanonizer did: it only recognises torchvision's BasicBlock/Bottleneck classes."""
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer

    merged = sum(isinstance(h, SequentialMergeBatchNorm) for h in composite.handles)
    blocks = sum(isinstance(h, (ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer)) for h in composite.handles)
    if blocks:
        ctx.note(source, f"ResNetCanonizer merged {merged} BatchNorms and gave {blocks} residual blocks a Sum module")
    else:
        ctx.note(source, f"ResNetCanonizer merged {merged} BatchNorms but found no torchvision BasicBlock/Bottleneck: "
                         "the skip additions stay autograd additions, which hand the full relevance to both branches "
                         "(no split, not conserving), and functional pooling spreads relevance by its gradient")


# ε = 0.25, the value of Montavon et al.'s LRP overview (2019), fixed before any result was seen; Zennit's default
# 1e-6 is LRP-0 in practice, whose maps are dominated by near-zero denominators.
EPSILON = 0.25


@register("lrp-epsilon", "ε-LRP (Zennit: Epsilon rule, ε=0.25, on every conv/linear layer, ResNetCanonizer)")
def lrp_epsilon(ctx: Context) -> Iterator[Attribute]:
    from zennit.composites import LayerMapComposite, layer_map_base
    from zennit.rules import Epsilon
    from zennit.torchvision import ResNetCanonizer
    from zennit.types import Linear

    composite = LayerMapComposite(layer_map=layer_map_base() + [(Linear, Epsilon(epsilon=EPSILON))],
                                  canonizers=[ResNetCanonizer()])
    with _zennit(ctx.model, composite) as attribute:
        _canonizer_note(ctx, "lrp-epsilon", composite)
        yield attribute


@register("zennit-epsilon-plus-flat", "Zennit EpsilonPlusFlat composite with its ResNetCanonizer")
def zennit_epsilon_plus_flat(ctx: Context) -> Iterator[Attribute]:
    from zennit.composites import EpsilonPlusFlat
    from zennit.torchvision import ResNetCanonizer

    composite = EpsilonPlusFlat(canonizers=[ResNetCanonizer()])
    with _zennit(ctx.model, composite) as attribute:
        _canonizer_note(ctx, "zennit-epsilon-plus-flat", composite)
        yield attribute
