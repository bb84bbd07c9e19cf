"""The vision-transformer acceptance figures in one table: forward, conservation, residual splits and ONNX parity.

    python tools/transformer_report.py                       # every model and preset, writes results/transformers.md
    python tools/transformer_report.py --models swin_t --presets attnlrp --out /tmp/swin

Models at 224² with random weights (seed 0): torchvision vit_b_16, swin_t, maxvit_t and timm
vit_tiny_patch16_224, deit_tiny_patch16_224, swin_tiny_patch4_window7_224. torchvision zero-initialises the ViT head
(every logit 0, so ΣR_in / R_out would be 0/0); here it is drawn randomly. One batch of 4 images with mixed targets
(predicted, class 3, predicted, class 7); per preset:

- forward: max |logits − model(x)| / max |model(x)|;
- ΣR_in / R_out: the smallest and largest of the four samples (relevance starts at the target logit);
- split gap: max over residual adds of |R_skip + R_main − R| / max |R| (R = R_s + R_m at every add);
- onnxruntime vs PyTorch, batch 1 and batch 4: max |R_ort − R_torch| / max |R_torch| of the exported file (written
  without its own parity check, so that every figure is reported);
- float32 vs float64: the same graph run in float64 is the exact value both float32 runtimes approximate; the
  distance of PyTorch's and onnxruntime's float32 relevance from it at batch 4 (the export's criterion where the
  float32 runs themselves differ by more than 1e-4).

With `lxt` installed, the same float32-vs-float64 distance of LXT itself (torchvision vit_b_16, its efficient-mode
CP-LRP with Zennit's ε = 1e-6, `tools/benchmark.py`'s LXTAttributor) on the same four images: how well-conditioned
the rules are in float32 whatever implements them.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["vit_b_16", "swin_t", "maxvit_t", "timm:vit_tiny_patch16_224", "timm:deit_tiny_patch16_224",
          "timm:swin_tiny_patch4_window7_224"]
PRESETS = ["attnlrp", "cp-lrp", "cp-lrp-conserving"]

sys.path.insert(0, str(ROOT / "tools"))
from benchmark import LXTAttributor, build_model  # noqa: E402 - the benchmark's model builder and LXT runner


def build(name: str):
    """timm:NAME with timm's initialisation, or a torchvision name as the benchmark builds it (seed 0, the ViT
    head drawn randomly)."""
    import torch

    if name.startswith("timm:"):
        import timm

        torch.manual_seed(0)
        return timm.create_model(name[5:], pretrained=False).eval()
    return build_model(name)


def rel(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def row(name: str, model, preset: str, x, target, tmp: str) -> dict:
    import onnxruntime as ort
    import torch

    import graphlrp

    t0 = time.perf_counter()
    explainer = graphlrp.compile(model, x[:1], rules=preset)
    logits, relevance, taps = explainer.explain_with_taps(x, target)
    with torch.no_grad():
        reference = model(x)
    ratio = (taps["input"] / taps["output"]).tolist()
    merges = [k[:-2] for k in taps if k.startswith("merge:") and k.endswith(".R")]
    gap = max((rel(taps[m + ".R_skip"] + taps[m + ".R_main"], taps[m + ".R"]) for m in merges), default=float("nan"))
    path = os.path.join(tmp, f"{name.replace(':', '_')}-{preset}.onnx")
    explainer.export_onnx(path, check=False)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    ort_rel = {}
    for batch in (1, 4):
        ort_rel[batch] = session.run(["relevance"], {"input": x[:batch].numpy(), "target": target[:batch].numpy()})[0]
    _, torch_b1 = explainer(x[:1], target[:1])
    with torch.no_grad():
        _, exact = copy.deepcopy(explainer.graph_module).double()(x.double(), target)
    return {"model": name, "preset": preset, "forward": rel(logits, reference),
            "ratio": (min(ratio), max(ratio)), "gap": gap, "merges": len(merges),
            "ort_b1": rel(ort_rel[1], torch_b1), "ort_b4": rel(ort_rel[4], relevance),
            "torch_f64": rel(relevance, exact), "ort_f64": rel(ort_rel[4], exact),
            "seconds": time.perf_counter() - t0}


def lxt_conditioning(x, target) -> str:
    """LXT's cp-lrp relevance of vit_b_16 in float32 against its own float64 run, per image."""
    import copy

    import torch

    model = build("vit_b_16")
    with torch.no_grad():
        target = torch.where(target < 0, model(x).argmax(-1), target)
    single = LXTAttributor(model)(x, target)
    double = LXTAttributor(copy.deepcopy(model).double())(x.double(), target)
    per_image = ", ".join(f"{rel(single[i], double[i]):.1e}" for i in range(len(x)))
    return (f"LXT itself (vit_b_16, efficient-mode CP-LRP, float32 vs float64, per image, targets "
            f"{target.tolist()}): {per_image}.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "results" / "transformers"), help="output path without suffix")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 224, 224, generator=g)
    target = torch.tensor([-1, 3, -1, 7])
    tmp = tempfile.mkdtemp(prefix="graphlrp-transformers-")
    rows = []
    for name in args.models.split(","):
        model = build(name)
        for preset in args.presets.split(","):
            try:
                r = row(name, model, preset, x, target, tmp)
            except Exception as e:  # noqa: BLE001 - a failure is a row of the report, not the end of it
                r = {"model": name, "preset": preset, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"}
            rows.append(r)
            print(r, flush=True)
            for f in Path(tmp).glob("*.onnx*"):
                f.unlink()
    lxt_line = ""
    if "vit_b_16" in args.models.split(","):
        try:
            lxt_line = lxt_conditioning(x, target)
        except ImportError as e:
            lxt_line = f"LXT reference skipped: {e}."
        print(lxt_line, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import graphlrp  # noqa: F401 - for the version line
    from importlib import metadata

    versions = ", ".join(f"{k} {metadata.version(k)}" for k in ("graphlrp", "torch", "torchvision", "timm",
                                                                "onnxruntime"))
    lines = ["# Vision transformers: forward, conservation, residual splits, ONNX parity", "",
             "Command: `" + " ".join(["python tools/transformer_report.py",
                                      *(argv if argv is not None else sys.argv[1:])]) + "`", "",
             f"Python {platform.python_version()}; {versions}; {args.threads} threads.", "",
             __doc__.split("\n\n", 2)[2].strip(), "",
             "| model | preset | forward | ΣR_in / R_out | split gap (adds) | ort vs torch, batch 1 | batch 4 | "
             "torch vs float64 | ort vs float64 | s |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['preset']} | error: {r['error']} | | | | | | | |")
            continue
        lo, hi = r["ratio"]
        lines.append(f"| {r['model']} | {r['preset']} | {r['forward']:.1e} | {lo:.6f} … {hi:.6f} | "
                     f"{r['gap']:.1e} ({r['merges']}) | {r['ort_b1']:.1e} | {r['ort_b4']:.1e} | "
                     f"{r['torch_f64']:.1e} | {r['ort_f64']:.1e} | {r['seconds']:.0f} |")
    if lxt_line:
        lines += ["", lxt_line]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
