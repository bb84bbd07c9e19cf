"""One evaluation run: every method's maps for all images, their insertion/deletion curves, the conservation sums
of the paper's variant, and what the report needs to say how the numbers came about.

Maps are computed method by method over all images (each method attaches its hooks once), then the curves image by
image for all methods together, so that a masked image shared by several methods (or by several steps of one
quantized map) goes through the model once.
"""
from __future__ import annotations

import importlib.metadata
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from . import EvaluationError
from . import methods as registry
from .data import ImageSet
from .metrics import InsertionDeletion, auc, curve_length, pixel_maps
from .metrics import quantize as heat_quantize

LIBRARIES = ("graphlrp", "torch", "torchvision", "captum", "zennit", "grad-cam", "onnxruntime", "numpy")
MASK_BUDGET = 2 ** 26  # booleans of masks held at once while the curves of a chunk of images are computed


@dataclass
class MethodResult:
    name: str
    description: str
    insertion: np.ndarray  # [n] AUC per image
    deletion: np.ndarray
    insertion_curves: np.ndarray  # [n, K]
    deletion_curves: np.ndarray
    quantized: bool = False  # whether the maps got the 8-level heat quantization

    @property
    def id(self) -> np.ndarray:
        return self.insertion - self.deletion


@dataclass
class Evaluation:
    model: str
    data: str
    n: int
    accuracy: float
    step: int
    points: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    results: dict[str, MethodResult] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)
    heatmaps: dict = field(default_factory=dict)  # images, titles, maps {method: [k, H, W]}
    conservation: dict[str, np.ndarray] | None = None  # "p" and ΣR at the tapped places, one value per image
    versions: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    model_calls: int = 0
    command: str = ""
    quantize: str = "ours"  # which maps were quantized: ours (the paper's protocol), all, none
    paper_results: dict[str, MethodResult] = field(default_factory=dict)  # the paper's protocol, where it differs
    engine: str = "local"
    workers: int = 1


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


class LocalEngine:
    """Runs maps and curves in this process. The Ray engine (graphlrp.engines.ray) has the same two methods and
    splits the same work over a cluster; both call `source_maps` and `InsertionDeletion.curves`, so they agree."""

    name = "local"
    workers = 1

    def maps(self, ctx, x, pred, methods: dict[str, "registry.Method"], size) -> dict[str, "MapsOutcome"]:
        """source -> its maps over all images, or why it could not run."""
        out = {}
        for source, method in methods.items():
            t = time.perf_counter()
            try:
                out[source] = MapsOutcome(source_maps(ctx, method, x, pred, size), None, time.perf_counter() - t)
            except registry.Unavailable as e:
                out[source] = MapsOutcome(None, str(e), 0.0)
        return out

    def curves(self, model, data: ImageSet, maps: dict[str, torch.Tensor], ev: "Evaluation", batch_size: int,
               example: torch.Tensor) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        h, w = data.images.shape[-2:]
        evaluator = InsertionDeletion(model, example, ev.mean, ev.std, ev.step, batch_size=batch_size)
        chunk = max(1, MASK_BUDGET // (len(maps) * 2 * ev.points * h * w))
        parts = []
        with tqdm(total=len(data), desc="insertion/deletion", unit="image") as bar:
            for i in range(0, len(data), chunk):
                part = slice(i, i + chunk)
                parts.append(evaluator.curves(data.images[part], data.labels[part],
                                              {n: m[part] for n, m in maps.items()}))
                bar.update(len(data.images[part]))
                bar.set_postfix(model_calls=evaluator.model_calls)
        ev.model_calls += evaluator.model_calls
        ev.notes.setdefault("insertion/deletion", []).append(f"model calls for the curves ran on {evaluator.backend}")
        return join_curves(parts)


@dataclass
class MapsOutcome:
    maps: torch.Tensor | None  # [N, H, W] pixel maps, before any quantization
    unavailable: str | None  # why the method could not run, else None
    seconds: float


def source_maps(ctx, method: "registry.Method", x: torch.Tensor, pred: torch.Tensor, size) -> torch.Tensor:
    """One method's pixel maps for `x`, `ctx.batch_size` images per call. Raises `Unavailable`."""
    with method.run(ctx) as attribute:
        parts = []
        for i in tqdm(range(0, len(x), ctx.batch_size), desc=f"maps {method.source}", unit="batch", leave=False):
            parts.append(pixel_maps(attribute(x[i:i + ctx.batch_size].clone(), pred[i:i + ctx.batch_size]), size))
    return torch.cat(parts)


def join_curves(parts: list[dict[str, tuple[np.ndarray, np.ndarray]]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Curves of consecutive image chunks -> curves of all images, per map."""
    return {name: (np.concatenate([p[name][0] for p in parts]), np.concatenate([p[name][1] for p in parts]))
            for name in (parts[0] if parts else {})}


def evaluate(model: torch.nn.Module, data: ImageSet, method_names: list[str], *, model_name: str, mean, std,
             step: int, batch_size: int = 64, cam_layer: str | None = None, heatmap_images: int = 4,
             command: str = "", quantize: str = "ours", engine=None) -> Evaluation:
    """Run the protocol for `method_names` on all of `data`. Explanations target the predicted class (as the
    paper's code does); curves record the probability of the labelled class. `quantize` picks which maps get the
    8-level heat quantization (`ours`: the paper's protocol; `all`/`none`: like for like); when that differs from
    the paper's protocol, the paper's numbers are computed too (`Evaluation.paper_results`), from the same maps.
    `engine`: where maps and curves are computed (default: this process)."""
    engine = engine or LocalEngine()
    start, cpu_start = time.perf_counter(), time.process_time()
    model.eval()
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    x = (data.images - mean_t) / std_t
    with torch.inference_mode():
        logits = torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    pred = logits.argmax(1)
    if int(data.labels.max()) >= logits.shape[-1] or int(data.labels.min()) < 0:
        raise EvaluationError(f"labels must lie in 0..{logits.shape[-1] - 1} for this model, found "
                              f"{int(data.labels.min())}..{int(data.labels.max())}")
    h, w = data.images.shape[-2:]
    ev = Evaluation(model=model_name, data=data.source, n=len(data), accuracy=float((pred == data.labels).float().mean()),
                    step=step, points=curve_length(h * w, step), mean=tuple(mean), std=tuple(std),
                    versions=library_versions(), command=command, quantize=quantize, engine=engine.name,
                    workers=engine.workers)
    box = ((0 - mean_t) / std_t).flatten(), ((1 - mean_t) / std_t).flatten()
    ctx = registry.Context(model, x[:1], batch_size=batch_size, cam_layer=cam_layer, box=box)

    maps, paper_maps = _method_maps(engine, ctx, x, pred, method_names, (h, w), ev)
    ev.notes = ctx.notes
    t = time.perf_counter()
    if maps:
        curves = engine.curves(model, data, {**maps, **{PAPER + n: m for n, m in paper_maps.items()}}, ev,
                               batch_size=max(batch_size, 256), example=x[:8])
        for key, (c_ins, c_del) in curves.items():
            name = key.removeprefix(PAPER)
            method = registry.METHODS[name]
            q = registry.quantized(method, "ours" if key != name else quantize)
            here = "quantized to 8 heat levels" if q else "not quantized"
            description = method.description if q == method.quantize else \
                f"{method.description}; here {here} (--quantize {quantize})"
            result = MethodResult(name, description, auc(c_ins), auc(c_del), c_ins, c_del, quantized=q)
            (ev.results if key == name else ev.paper_results)[name] = result
        _note_twins(ev)
    ev.seconds["insertion/deletion curves"] = time.perf_counter() - t
    ev.conservation = _conservation(ctx, x, pred, logits, ev)
    ev.heatmaps = _heatmap_sample(data, pred, maps, heatmap_images)
    ev.seconds["total"] = time.perf_counter() - start
    ev.seconds["total CPU time, all threads"] = time.process_time() - cpu_start
    return ev


PAPER = "paper protocol: "  # key prefix of the maps post-processed as the paper does, where that differs


def _method_maps(engine, ctx, x, pred, names, size, ev: Evaluation):
    """name -> [N, H, W] pixel maps as `ev.quantize` processes them, and name -> maps as the paper's protocol does
    for the names where that differs. Methods sharing a source are computed once; unavailable ones are skipped."""
    sources = {}
    for name in names:
        sources.setdefault(registry.METHODS[name].source, registry.METHODS[name])
    outcomes = engine.maps(ctx, x, pred, sources, size)
    for source, outcome in outcomes.items():
        if outcome.unavailable:
            tqdm.write(f"skipping {source}: {outcome.unavailable}")
        else:
            ev.seconds[f"maps: {source}"] = outcome.seconds
    maps, paper = {}, {}
    for name in names:
        method = registry.METHODS[name]
        outcome = outcomes[method.source]
        if outcome.unavailable:
            ev.skipped[name] = outcome.unavailable
            continue
        q = registry.quantized(method, ev.quantize)
        maps[name] = heat_quantize(outcome.maps) if q else outcome.maps
        if registry.quantized(method, "ours") != q:
            paper[name] = outcome.maps if q else heat_quantize(outcome.maps)
    return maps, paper


def _note_twins(ev: Evaluation) -> None:
    names = list(ev.results)
    for i, a in enumerate(names):
        twin = next((b for b in names[:i] if np.array_equal(ev.results[a].insertion_curves,
                                                             ev.results[b].insertion_curves)
                     and np.array_equal(ev.results[a].deletion_curves, ev.results[b].deletion_curves)), None)
        if twin:
            ev.notes.setdefault(a, []).append(f"identical curves to `{twin}` on every image (same pixel ranking)")


def _conservation(ctx, x, pred, logits, ev: Evaluation) -> dict[str, np.ndarray] | None:
    """ΣR at the input, the first and the last residual block's input for the paper's variant (ratio split,
    identity included), next to p(ŷ): the data of the paper's Fig. 5."""
    import graphlrp
    from graphlrp.errors import GraphLRPError

    try:
        explainer = graphlrp.compile(ctx.model, ctx.example, rules="otsuki2024", split="ratio", include_identity=True,
                                     box=ctx.box)
    except GraphLRPError as e:
        ev.notes.setdefault("conservation", []).append(f"not computed: {e}")
        return None
    t = time.perf_counter()
    taps: dict[str, list] = {}
    for i in range(0, len(x), ctx.batch_size):
        _, _, part = explainer.explain_with_taps(x[i:i + ctx.batch_size], pred[i:i + ctx.batch_size])
        for key, value in part.items():
            taps.setdefault(key, []).append(value)
    taps = {k: torch.cat(v).double().numpy() for k, v in taps.items()}
    blocks = sorted((k for k in taps if k.startswith("block_input:")), key=lambda k: int(k.split(":")[1]))
    out = {"p": logits.softmax(-1).max(-1).values.double().numpy(), "input": taps["input"]}
    if blocks:
        out["first block input"], out["last block input"] = taps[blocks[0]], taps[blocks[-1]]
    ev.seconds["conservation taps"] = time.perf_counter() - t
    return out


def _heatmap_sample(data: ImageSet, pred, maps, k: int) -> dict:
    """The first `k` correctly classified images of distinct classes, topped up with the first others if there are
    not enough: a fixed rule, not a choice of nice examples."""
    correct = [i for i in range(len(data)) if int(pred[i]) == int(data.labels[i])]
    chosen, seen = [], set()
    for i in correct:
        if int(data.labels[i]) not in seen:
            chosen.append(i)
            seen.add(int(data.labels[i]))
    chosen = (chosen + [i for i in range(len(data)) if i not in chosen])[:k]
    names = data.classes or []
    titles = [names[int(data.labels[i])] if int(data.labels[i]) < len(names) else f"class {int(data.labels[i])}"
              for i in chosen]
    return {"images": data.images[chosen], "titles": titles, "maps": {n: m[chosen] for n, m in maps.items()}}
