"""Coverage: compile a list of models with one preset and report, per model, whether the explainer reproduces the
forward and conserves relevance (`graphlrp coverage`, written to results/coverage.md).

Random weights (BatchNorm statistics set away from the identity, so BN is not trivially exact), small inputs,
batch 2. Per model: merges by kind, |logits − model| / max|model|, max over samples of |ΣR_input / p(ŷ) − 1|,
optionally the onnxruntime parity of the exported explainer, and for a failure the error's type and first line.
"""
from __future__ import annotations

import fnmatch
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn as nn

# the ResNet family and the main modern CNN families; each entry is a pattern over timm.list_models()
TIMM_DEFAULT = ["resnet*", "resnext*", "seresnet*", "seresnext*", "ecaresnet*", "skresnet*", "skresnext*", "resnest*",
                "res2net*", "res2next*", "cspresnet*", "cspresnext*", "resnetv2*", "resnetrs*", "regnet*",
                "nf_resnet*", "efficientnet_b*", "tf_efficientnet_b*", "mobilenetv2*", "mobilenetv3*", "mixnet*",
                "convnext*", "rexnet*", "ghostnet*", "dla*", "dpn*", "repvgg*", "hrnet*", "*vovnet*", "lcnet*",
                "gernet*", "cs3*", "xception*", "selecsls*", "fbnet*", "tinynet*", "densenet*", "mnasnet*",
                "inception_v3", "vgg*"]
SIZES = {"inception_v3": 299, "googlenet": 96}
NOT_CNN = ("vit", "swin", "maxvit", "deit", "beit", "levit", "mobilevit", "coat", "cait")


@dataclass
class Result:
    source: str
    name: str
    size: int
    status: str = "ok"  # ok | fail | model-error | skipped
    merges: dict = field(default_factory=dict)
    forward_diff: float | None = None
    conservation: float | None = None
    onnx_parity: float | None = None
    seconds: float = 0.0
    error: str = ""


def torchvision_models() -> list[str]:
    import torchvision
    names = torchvision.models.list_models(module=torchvision.models)
    return [n for n in names if not any(n.startswith(p) for p in NOT_CNN)]


def timm_models(patterns) -> list[str]:
    import timm
    names = timm.list_models()
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    return [n for n in chosen if not any(n.startswith(p) for p in NOT_CNN)]


def known_params(source: str, name: str) -> float | None:
    """Parameters in millions where known without building the model (torchvision's weight metadata)."""
    if source != "torchvision":
        return None
    try:
        import torchvision
        return torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"] / 1e6
    except Exception:
        return None


def build(source: str, name: str) -> nn.Module:
    if source == "torchvision":
        import torchvision
        kw = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
        return torchvision.models.get_model(name, weights=None, **kw)
    import timm
    return timm.create_model(name, pretrained=False)


def settle_batchnorm(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def check(model: nn.Module, size: int, rules: str = "otsuki2024-conserving", onnx_path: str | None = None,
          source: str = "", name: str = "") -> Result:
    """Compile `model` at `size`² and measure it (see the module docstring)."""
    import graphlrp
    from .errors import GraphLRPError

    res = Result(source, name or type(model).__name__, size)
    t = time.time()
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    try:
        with torch.no_grad():
            ref = model(x)
    except Exception as e:
        res.status, res.error = "model-error", f"{type(e).__name__}: {_first_line(e)}"
        return res
    try:
        explainer = graphlrp.compile(model, x[:1], rules=rules)
        logits, rel = explainer(x)
        p = logits.softmax(-1).max(-1).values
        res.forward_diff = rel_diff(logits, ref)
        res.conservation = (rel.flatten(1).sum(1).double() / p.double() - 1).abs().max().item()
        res.merges = dict(Counter(m.skip_kind for m in explainer.merges))
        if onnx_path:
            report = explainer.export_onnx(onnx_path)
            res.onnx_parity = float(report.max_rel_diff)
        ok = res.forward_diff <= 1e-4 and res.conservation <= 1e-3
        res.status = "ok" if ok else "fail"
        if not ok:
            res.error = "tolerance: forward diff or conservation above bound"
    except GraphLRPError as e:
        res.status, res.error = "fail", f"{type(e).__name__}: {_first_line(e)}"
    except Exception as e:  # compile() lets none through; anything else is measured code failing
        res.status = "fail"
        res.error = f"{type(e).__name__}: {_first_line(e)} [{traceback.extract_tb(e.__traceback__)[-1].name}]"
    res.seconds = time.time() - t
    return res


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [""])[0][:200]


def markdown(results: list[Result], command: str, rules: str, planned: int | None = None) -> str:
    count = lambda source, status: sum(r.source == source and r.status == status for r in results)  # noqa: E731
    lines = ["# Coverage", "",
             f"`{command}` — preset `{rules}`, random weights, batch 2, torch {torch.__version__}.", "",
             *([f"**Partial run: {len(results)} of {planned} planned models reached** (the report is rewritten after "
                "each model; this run stopped before the end).", ""] if planned and len(results) < planned else []),
             "| source | models | ok | failing | skipped |", "|---|---:|---:|---:|---:|"]
    for s in dict.fromkeys(r.source for r in results):
        lines.append(f"| {s} | {sum(r.source == s for r in results)} | {count(s, 'ok')} | "
                     f"{count(s, 'fail') + count(s, 'model-error')} | {count(s, 'skipped')} |")
    lines += ["", "ok: logits within 1e-4 (relative) of the model's and |ΣR_input / p(ŷ) − 1| ≤ 1e-3 for every sample.",
              "merges: identity / projection / other skips of adds, branch-dim sums (ResNeSt, SK).", "",
              "| source | model | input | status | merges | forward diff | abs(ΣR/p − 1) | ONNX parity | s | error |",
              "|---|---|---:|---|---|---:|---:|---:|---:|---|"]
    fmt = lambda v: "" if v is None else f"{v:.1e}"  # noqa: E731
    for r in results:
        merges = ", ".join(f"{v} {k}" for k, v in sorted(r.merges.items())) or ("0" if r.status == "ok" else "")
        err = r.error.replace("|", "\\|")
        lines.append(f"| {r.source} | {r.name} | {r.size} | {r.status} | {merges} | {fmt(r.forward_diff)} | "
                     f"{fmt(r.conservation)} | {fmt(r.onnx_parity)} | {r.seconds:.1f} | {err} |")
    return "\n".join(lines) + "\n"
