"""Side-by-side benchmark: graphlrp explainers vs the plain forward, Zennit and Captum, in one process and run.

    python tools/benchmark.py            # full run: resnet18 + resnet50, batch 1 and 8, both presets, memory at
                                         # batch 16, compile + export time of resnet50 and resnet152
    python tools/benchmark.py --quick    # short run for CI / acceptance: resnet50, batch 1, speed only
    python tools/benchmark.py --models vit_b_16 --compile-models vit_b_16 --out results/benchmark-vit
                                         # torchvision ViT-B/16: graphlrp cp-lrp / attnlrp vs LXT in PyTorch

Protocol: every method of one (model, batch) cell is set up first, warmed up, then timed in interleaved rounds
(forward, explainer, Zennit, ... , forward, explainer, ...) with time.perf_counter; the table reports the median of
the rounds per image and its ratio to the onnxruntime forward measured in the same rounds. onnxruntime uses
`--threads` intra-op threads (default 2) and its default graph optimisations; torch uses the same thread count.
Memory: peak resident set size of a fresh process that sets up one method and runs it once at batch 16.
Compile time: `graphlrp.compile` + `export_onnx` (with onnx.checker and the onnxruntime parity check) in a fresh
process. Writes results/benchmark.md and results/benchmark.csv (with --quick: results/benchmark-quick.*).

Transformers (`vit_b_16`, `swin_t`, ... by name) take `--transformer-presets` (default cp-lrp,attnlrp) and are compared
with LXT, the AttnLRP authors' package, run the way its documentation runs torchvision's ViT (its efficient-mode
monkey patches with Zennit's ε-rule on linear layers, relevance = input × gradient); Zennit and Captum have no
attention rules. torchvision zero-initialises the ViT head, so the benchmark gives it random weights (timings do not
depend on weights; the LXT agreement note does).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------ setup
def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib import metadata

    versions = {}
    for name in ("graphlrp", "torch", "torchvision", "onnx", "onnxruntime", "zennit", "captum", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "versions": versions,
            "load_average": os.getloadavg()}


TRANSFORMERS = ("vit_", "swin_", "maxvit_")


def is_transformer(arch: str) -> bool:
    return arch.startswith(TRANSFORMERS)


def build_model(arch: str):
    import torch
    import torchvision

    torch.manual_seed(0)  # random weights: timings do not depend on them
    model = getattr(torchvision.models, arch)().eval()
    head = getattr(getattr(model, "heads", None), "head", None)
    if isinstance(head, torch.nn.Linear):  # torchvision zero-initialises the ViT head: every logit would be 0
        torch.nn.init.normal_(head.weight, std=0.02)
    return model


def ort_session(path: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def op_profile(path: str, feed: dict, threads: int, runs: int = 5) -> dict:
    """onnxruntime's own profiler: kernel time per op type (ms per run: each node's median over `runs`, after
    PROFILE_WARMUP discarded runs). onnxruntime settles on its second run: the first runs allocate and plan the
    memory pattern, and their elementwise kernels write fresh pages (ResNet-50's Abs at batch 8: 8 ms on the
    first two runs, 1.3 ms after)."""
    import collections
    import json

    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="graphlrp-prof-"), "p")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    for _ in range(runs + PROFILE_WARMUP):
        session.run(None, feed)
    per_node, op_of = collections.defaultdict(list), {}
    for e in json.load(open(session.end_profiling())):
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node[e["name"]].append(e["dur"] / 1000)
            op_of[e["name"]] = e["args"]["op_name"]
    per_op = collections.defaultdict(float)
    for name, durations in per_node.items():
        per_op[op_of[name]] += float(np.median(durations[-runs:]))
    return dict(sorted(per_op.items(), key=lambda kv: -kv[1]))


def export_forward(model, path: str) -> None:
    import onnx
    import torch

    from graphlrp.export import forward_onnx

    onnx.save(forward_onnx(model, torch.randn(1, 3, 224, 224)), path)


def zennit_attributor(model):
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat
    from zennit.torchvision import ResNetCanonizer

    return Gradient(model=model, composite=EpsilonPlusFlat(canonizers=[ResNetCanonizer()]))


def zennit_run(attributor, model, x):
    import torch

    with torch.no_grad():
        logits = model(x)
    seed = torch.zeros_like(logits)
    idx = torch.arange(len(x))
    top = logits.argmax(-1)
    seed[idx, top] = logits[idx, top]
    return attributor(x, seed)[1]


class LXTAttributor:
    """LXT's recipe for torchvision's VisionTransformer: `lxt.efficient.monkey_patch(vision_transformer)` (identity
    rule at GELU, normaliser held constant in LayerNorm, queries and keys detached in nn.MultiheadAttention: CP-LRP)
    and `monkey_patch_zennit()` with Zennit's ε-rule on nn.Linear / nn.Conv2d; relevance = x ⊙ ∂logit/∂x. LXT's
    patches replace class attributes process-wide, so they are applied around each call only and every attribute
    is restored afterwards (the other methods of the same rounds run unpatched); Zennit binds its hook methods when
    it registers them, so the hooks are registered inside the patches, per call, as LXT's examples do."""

    def __init__(self, model, epsilon: float = 1e-6):
        import copy

        import torch.nn as nn
        from zennit.composites import LayerMapComposite
        from zennit.core import BasicHook
        from zennit.rules import Epsilon

        self.model = copy.deepcopy(model)  # Zennit's hooks stay on this copy only
        self.touched = [(cls, name) for cls in (nn.GELU, nn.LayerNorm, nn.MultiheadAttention)
                        for name in ("forward", "original_forward")]
        self.touched += [(BasicHook, "forward"), (BasicHook, "backward")]
        self.composite = LayerMapComposite([(nn.Conv2d, Epsilon(epsilon)), (nn.Linear, Epsilon(epsilon))])

    def __call__(self, x, target=None):
        from lxt.efficient import monkey_patch, monkey_patch_zennit
        from torchvision.models import vision_transformer

        saved = {key: key[0].__dict__[key[1]] for key in self.touched if key[1] in key[0].__dict__}
        monkey_patch(vision_transformer)
        monkey_patch_zennit()
        try:
            with self.composite.context(self.model) as hooked:
                x = x.detach().clone().requires_grad_(True)
                logits = hooked(x)
                target = logits.argmax(-1) if target is None else target
                logits.gather(1, target.view(-1, 1)).sum().backward()
            return (x * x.grad).detach()
        finally:
            for cls, name in self.touched:
                if (cls, name) in saved:
                    setattr(cls, name, saved[(cls, name)])
                elif name in cls.__dict__:
                    delattr(cls, name)


def lxt_agreement(lxt: LXTAttributor, explainer, x) -> str:
    """How far graphlrp's `cp-lrp` is from LXT on the same input and targets (max |difference| / max |LXT|)."""
    import torch

    with torch.no_grad():
        target = explainer(x)[0].argmax(-1)
        ours = explainer(x, target)[1]
    theirs = lxt(x, target)
    return f"graphlrp cp-lrp vs LXT relevance: {((ours - theirs).abs().max() / theirs.abs().max()).item():.1e}"


def captum_check(model, x) -> tuple[bool, str]:
    """Captum's LRP on this model: does it run, and does sum(R) equal the explained logit (within 5%)?"""
    import torch
    from captum.attr import LRP

    try:
        with torch.no_grad():
            logits = model(x)
        top = logits.argmax(-1)
        rel = LRP(model).attribute(x.clone(), target=top)
        ratio = (rel.flatten(1).sum(1) / logits[torch.arange(len(x)), top]).tolist()
    except Exception as e:  # noqa: BLE001 - any failure makes the method invalid for this model
        return False, f"error: {type(e).__name__}: {str(e)[:120]}"
    ok = all(abs(r - 1) <= 0.05 for r in ratio)
    return ok, "sum R / logit = " + ", ".join(f"{r:.3g}" for r in ratio)


# ------------------------------------------------------------------------------------------ speed
def speed_cell(batch: int, runners: dict, repeats: int, warmup: int) -> dict:
    """Median seconds per call of each runner, timed in interleaved rounds on the same input."""
    import numpy as np
    import torch

    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 3, 224, 224, generator=g)
    xn = x.numpy()
    tn = np.full((batch,), -1, dtype=np.int64)
    calls = {name: (lambda fn=fn: fn(x, xn, tn)) for name, fn in runners.items()}
    times: dict = {name: [] for name in calls}
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    for _ in range(repeats):
        for name, fn in calls.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def make_runners(arch: str, model, presets: list, tmp: str, threads: int, with_torch_compile: bool,
                 with_baselines: bool) -> tuple[dict, dict]:
    """name -> fn(x_torch, x_numpy, target_numpy); and notes (validity, setup times) per name."""
    import torch

    import graphlrp

    import onnx

    from graphlrp.export import count_macs

    runners, notes = {}, {"_macs": {}}
    plain = os.path.join(tmp, f"{arch}-forward.onnx")
    export_forward(model, plain)
    forward_macs = count_macs(onnx.load(plain))
    fwd = ort_session(plain, threads)
    runners["forward | onnxruntime"] = lambda x, xn, tn: fwd.run(None, {"input": xn})

    def torch_forward(x, xn, tn):
        with torch.no_grad():
            return model(x)

    runners["forward | torch eager"] = torch_forward
    for preset in presets:
        ex = graphlrp.compile(model, torch.randn(1, 3, 224, 224), rules=preset, model_name=arch)
        path = os.path.join(tmp, f"{arch}-{preset}.onnx")
        ex.export_onnx(path, check=False)
        notes["_macs"][f"graphlrp {preset}"] = count_macs(onnx.load(path)) / forward_macs
        sess = ort_session(path, threads)
        runners[f"graphlrp {preset} | onnxruntime"] = (
            lambda x, xn, tn, sess=sess: sess.run(None, {"input": xn, "target": tn}))
        runners[f"graphlrp {preset} | torch eager"] = lambda x, xn, tn, ex=ex: ex(x)
        notes.setdefault("_explainers", {})[preset] = ex
        if with_torch_compile:
            compiled = torch.compile(ex.graph_module)

            def run_compiled(x, xn, tn, compiled=compiled):
                with torch.no_grad():
                    return compiled(x, torch.from_numpy(tn))

            runners[f"graphlrp {preset} | torch.compile"] = run_compiled
    if with_baselines and is_transformer(arch):
        lxt = LXTAttributor(model)
        name = "LXT efficient (CP-LRP, Zennit ε on linear layers) | torch eager"
        runners[name] = lambda x, xn, tn: lxt(x)
        if "cp-lrp" in notes.get("_explainers", {}):
            notes[name] = lxt_agreement(lxt, notes["_explainers"]["cp-lrp"], torch.randn(2, 3, 224, 224))
    elif with_baselines:
        attributor = zennit_attributor(model)
        attributor.__enter__()  # hooks stay registered for the whole cell; closed by the caller via notes
        notes["_close"] = lambda: attributor.__exit__(None, None, None)
        runners["Zennit EpsilonPlusFlat+ResNetCanonizer | torch eager"] = (
            lambda x, xn, tn: zennit_run(attributor, model, x))
        ok, why = captum_check(build_model(arch), torch.randn(2, 3, 224, 224))
        notes["Captum LRP | torch eager"] = ("" if ok else "INVALID: does not conserve relevance on ResNets; ") + why
        from captum.attr import LRP

        captum_model = build_model(arch)
        lrp = LRP(captum_model)

        def captum_run(x, xn, tn):
            with torch.no_grad():
                top = captum_model(x).argmax(-1)
            return lrp.attribute(x.clone(), target=top)

        runners["Captum LRP | torch eager"] = captum_run
    return runners, notes


# ------------------------------------------------------------------------------------------ memory, compile time
CHILD_SNIPPET = r"""
import json, sys, time
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads({threads})
sys.path.insert(0, {tools!r})
import benchmark as b
kind, arch, preset, path, batch = {kind!r}, {arch!r}, {preset!r}, {path!r}, {batch}
def status_mb(key):  # VmRSS: resident now; VmHWM: peak of this process image (ru_maxrss would include the parent's)
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
rss_mb = lambda: status_mb("VmRSS")
x = torch.randn(batch, 3, 224, 224)
if kind == "compile":
    import graphlrp
    model = b.build_model(arch)
    t0 = time.perf_counter()
    ex = graphlrp.compile(model, x[:1], rules=preset, model_name=arch)
    t1 = time.perf_counter()
    rep = ex.export_onnx(path)
    t2 = time.perf_counter()
    print(json.dumps({{"compile_s": t1 - t0, "export_s": t2 - t1, "size_mb": rep.size_bytes / 2**20,
                      "parity": rep.max_rel_diff, "torch_f64": rep.float32_error_pytorch,
                      "ort_f64": rep.float32_error_onnxruntime}}))
    sys.exit(0)
if kind == "ort":
    import numpy as np
    sess = b.ort_session(path, {threads})
    feed = {{"input": x.numpy()}}
    if len(sess.get_inputs()) == 2:
        feed["target"] = np.full((batch,), -1, dtype=np.int64)
    before = rss_mb()
    sess.run(None, feed)
elif kind == "torch-forward":
    model = b.build_model(arch)
    before = rss_mb()
    with torch.no_grad():
        model(x)
elif kind == "torch-explainer":
    import graphlrp
    ex = graphlrp.compile(b.build_model(arch), x[:1], rules=preset)
    before = rss_mb()
    ex(x)
elif kind == "lxt":
    lxt = b.LXTAttributor(b.build_model(arch))
    before = rss_mb()
    lxt(x)
elif kind == "zennit":
    model = b.build_model(arch)
    with b.zennit_attributor(model) as attributor:
        before = rss_mb()
        b.zennit_run(attributor, model, x)
print(json.dumps({{"peak_mb": status_mb("VmHWM"), "before_mb": before}}))
"""


def child(kind: str, arch: str, preset: str, path: str, batch: int, threads: int, timeout: int = 1800) -> dict:
    code = CHILD_SNIPPET.format(root=str(ROOT), tools=str(ROOT / "tools"), kind=kind, arch=arch, preset=preset,
                                path=path, batch=batch, threads=threads)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ report
PROFILE_RUNS = 5
PROFILE_WARMUP = 2


def write_reports(out: Path, info: dict, speed_rows: list, memory_rows: list, profiles: dict, compile_rows: list,
                  notes: dict, args) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["section", "model", "batch", "method", "runtime", "ms_per_image", "ratio_to_ort_forward",
                    "macs_ratio_to_forward", "peak_rss_mb", "compile_s", "export_and_check_s", "note"])
        for r in speed_rows:
            w.writerow(["speed", r["model"], r["batch"], r["method"], r["runtime"], f"{r['ms']:.2f}",
                        f"{r['ratio']:.3f}", "" if r.get("macs") is None else f"{r['macs']:.3f}", "", "", "",
                        r["note"]])
        for r in memory_rows:
            w.writerow(["memory", r["model"], r["batch"], r["method"], r["runtime"], "", "", "",
                        "" if r.get("peak_mb") is None else f"{r['peak_mb']:.0f}", "", "", r.get("note", "")])
        for r in compile_rows:
            w.writerow(["compile", r["model"], "", r["method"], "", "", "", "", "",
                        f"{r.get('compile_s', float('nan')):.1f}", f"{r.get('export_s', float('nan')):.1f}",
                        r.get("error", "")])
    v = info["versions"]
    lines = [
        "# graphlrp benchmark", "",
        f"Command: `python tools/benchmark.py {' '.join(args.argv)}`".replace("  ", " "),
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores visible; Python {info['python']}; "
        + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        f"Threads: onnxruntime intra-op {args.threads} (default graph optimisations, CPUExecutionProvider), "
        f"torch.set_num_threads({args.threads}). Load average at start {info['load_average'][0]:.1f}, "
        f"at end {info['load_average_end'][0]:.1f} (the benchmark itself keeps {args.threads} threads busy; a "
        f"load well above {args.threads} means other jobs shared the machine — then compare ratios, which come "
        "from the same interleaved rounds, rather than absolute times).",
        "No GPU was available to this run: no CUDA (onnxruntime CUDA EP / torch CUDA) numbers.",
        "",
        f"Speed: median of {args.repeats} interleaved rounds after {args.warmup} warm-up round(s); ms per image; "
        "ratio = time / onnxruntime forward time of the same model and batch, measured in the same rounds. "
        "MACs × forward: multiply-accumulates of the exported graph's Conv/ConvTranspose/Gemm/MatMul nodes over the "
        "plain forward's (`graphlrp.export.count_macs`) — the work the runtime cannot avoid.",
        "",
    ]
    for (model, batch) in sorted({(r["model"], r["batch"]) for r in speed_rows}, key=lambda k: (k[0], k[1])):
        lines += [f"## {model}, batch {batch}", "",
                  "| method | runtime | ms / image | × onnxruntime forward | MACs × forward | note |",
                  "|---|---|---:|---:|---:|---|"]
        for r in [r for r in speed_rows if r["model"] == model and r["batch"] == batch]:
            macs = "" if r.get("macs") is None else f"{r['macs']:.2f}"
            lines.append(f"| {r['method']} | {r['runtime']} | {r['ms']:.1f} | {r['ratio']:.2f} | {macs} | "
                         f"{r['note']} |")
        base = next((r for r in speed_rows if r["model"] == model and r["batch"] == batch
                     and r["method"].startswith(("Zennit", "LXT"))), None)
        if base:
            for r in speed_rows:
                if r["model"] == model and r["batch"] == batch and r["method"].startswith("graphlrp") \
                        and r["runtime"] == "onnxruntime":
                    lines.append(f"\n{r['method']} (onnxruntime) is {base['ms'] / r['ms']:.1f}× faster per image "
                                 f"than {base['method'].split()[0]}.")
        lines.append("")
    for (model, batch), tables in sorted(profiles.items()):
        fwd_total = sum(tables["forward"].values())
        names = list(tables)
        lines += [f"## Where the time goes: {model}, batch {batch} (onnxruntime profiler)", "",
                  "Kernel time per op type in ms per run (onnxruntime's own profiler: each node's median over "
                  f"{PROFILE_RUNS} runs after {PROFILE_WARMUP} discarded warm-up runs), and its share as a "
                  "multiple of the forward's "
                  "total kernel time. Conv/ConvTranspose (CNNs) and MatMul/Einsum/Gemm (transformers) are the "
                  "multiply-accumulate floor; everything else is elementwise work (Where + GreaterOrEqual: the "
                  "ε-rule's signed stabiliser) and NCHWc layout reorders that onnxruntime inserts around ops it "
                  "cannot run in its blocked layout.", "",
                  "| op type | " + " | ".join(f"{n} (ms)" for n in names) + " | " +
                  " | ".join(f"{n} (× forward)" for n in names[1:]) + " |",
                  "|---|" + "---:|" * (2 * len(names) - 1)]
        ops_all = sorted({op for t in tables.values() for op in t},
                         key=lambda op: -max(t.get(op, 0) for t in tables.values()))
        small = [op for op in ops_all if max(t.get(op, 0) for t in tables.values()) < 0.5]
        rows = [(op, {n: tables[n].get(op, 0) for n in names}) for op in ops_all if op not in small]
        rows.append((f"other ({len(small)} op types)", {n: sum(tables[n].get(op, 0) for op in small) for n in names}))
        for op, ms in rows:
            cells = [f"{ms[n]:.1f}" for n in names] + [f"{ms[n] / fwd_total:.2f}" for n in names[1:]]
            lines.append(f"| {op} | " + " | ".join(cells) + " |")
        totals = [f"**{sum(tables[n].values()):.1f}**" for n in names]
        totals += [f"**{sum(tables[n].values()) / fwd_total:.2f}**" for n in names[1:]]
        lines += ["| total | " + " | ".join(totals) + " |", ""]
    if memory_rows:
        lines += ["## Peak memory, batch 16", "",
                  "Peak resident set size of a fresh process that sets the method up and runs it once "
                  "(includes the Python interpreter, libraries and weights).", "",
                  "| model | method | runtime | peak RSS (MB) | RSS before the run (MB) |", "|---|---|---|---:|---:|"]
        for r in memory_rows:
            peak = "error" if r.get("peak_mb") is None else f"{r['peak_mb']:.0f}"
            before = "" if r.get("before_mb") is None else f"{r['before_mb']:.0f}"
            lines.append(f"| {r['model']} | {r['method']} | {r['runtime']} | {peak} | {before} |")
        lines.append("")
    if compile_rows:
        lines += ["## Compile + export time", "",
                  "`graphlrp.compile` then `export_onnx` (fx → ONNX lowering, onnx.checker full check, onnxruntime "
                  "parity check), in a fresh process.", "",
                  "Parity: max |difference| / max |value| of onnxruntime against PyTorch on the export's check batch. "
                  "Where that exceeds 1e-4, the export measures both float32 runtimes against the same graph in "
                  "float64 and passes when onnxruntime is as close to it as PyTorch (the last two columns).", "",
                  "| model | preset | compile (s) | export + checks (s) | total (s) | file (MiB) | parity | "
                  "PyTorch vs float64 | onnxruntime vs float64 |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in compile_rows:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['method']} | error: {r['error']} | | | | | | |")
                continue
            f64 = [f"{r[k]:.1e}" if r.get(k) is not None else "" for k in ("torch_f64", "ort_f64")]
            lines.append(f"| {r['model']} | {r['method']} | {r['compile_s']:.1f} | {r['export_s']:.1f} | "
                         f"{r['compile_s'] + r['export_s']:.1f} | {r['size_mb']:.0f} | {r['parity']:.1e} | "
                         f"{f64[0]} | {f64[1]} |")
        lines.append("")
    if notes:
        lines += ["## Notes", ""] + [f"- {k}: {v}" for k, v in notes.items()] + [""]
    out.with_suffix(".md").write_text("\n".join(lines))


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="resnet50, batch 1, speed only (CI / acceptance)")
    p.add_argument("--models", default=None, help="comma-separated torchvision ResNets (default resnet18,resnet50)")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--presets", default="otsuki2024,epsilon-plus-flat", help="presets of the ResNets")
    p.add_argument("--transformer-presets", default="cp-lrp,attnlrp", help="presets of vit_*, swin_*, maxvit_*")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per cell (default 5, --quick 5)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-baselines", action="store_true", help="skip Zennit and Captum")
    p.add_argument("--torch-compile", action="store_true", help="also time torch.compile of the explainer graph")
    p.add_argument("--memory", dest="memory", action="store_true", default=None)
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--compile-time", dest="compile_time", action="store_true", default=None)
    p.add_argument("--no-compile-time", dest="compile_time", action="store_false")
    p.add_argument("--compile-models", default="resnet50,resnet152")
    p.add_argument("--profile", dest="profile", action="store_true", default=None,
                   help="onnxruntime op-type profile of resnet50 (default: on, except with --quick)")
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--no-speed", action="store_true", help="skip the speed table (e.g. to redo memory only)")
    p.add_argument("--out", default=None, help="output path without suffix (default results/benchmark[-quick])")
    args = p.parse_args(argv)
    args.argv = argv
    models = (args.models or ("resnet50" if args.quick else "resnet18,resnet50")).split(",")
    batches = [int(b) for b in (args.batches or ("1" if args.quick else "1,8")).split(",")]
    def presets_of(arch: str) -> list:
        return (args.transformer_presets if is_transformer(arch) else args.presets).split(",")
    args.repeats = args.repeats or 5
    memory = (not args.quick) if args.memory is None else args.memory
    args.profile = (not args.quick) if args.profile is None else args.profile
    compile_time = (not args.quick) if args.compile_time is None else args.compile_time
    out = Path(args.out) if args.out else ROOT / "results" / ("benchmark-quick" if args.quick else "benchmark")

    import torch

    torch.set_num_threads(args.threads)
    info = machine()
    tmp = tempfile.mkdtemp(prefix="graphlrp-bench-")
    speed_rows, memory_rows, compile_rows, notes, profiles = [], [], [], {}, {}
    for arch in models:
        model = build_model(arch)
        print(f"[{arch}] setting up", flush=True)
        presets = presets_of(arch)
        runners, cell_notes = make_runners(arch, model, presets, tmp, args.threads, args.torch_compile,
                                           not args.no_baselines)
        for batch in [] if args.no_speed else batches:
            print(f"[{arch}] batch {batch}: timing {len(runners)} methods", flush=True)
            med = speed_cell(batch, runners, args.repeats, args.warmup)
            base = med["forward | onnxruntime"]
            for name, seconds in med.items():
                method, runtime = name.split(" | ")
                note = cell_notes.get(name, "")
                speed_rows.append({"model": arch, "batch": batch, "method": method, "runtime": runtime,
                                   "ms": seconds * 1000 / batch, "ratio": seconds / base, "note": note,
                                   "macs": cell_notes["_macs"].get(method, 1.0 if method == "forward" else None)})
                print(f"    {name:60s} {seconds * 1000 / batch:9.1f} ms/img  {seconds / base:6.2f}x", flush=True)
        if args.profile and arch in ("resnet50", "vit_b_16"):
            import numpy as np

            for batch in batches:
                print(f"[{arch}] batch {batch}: onnxruntime op profile", flush=True)
                x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
                t = np.full((batch,), -1, dtype=np.int64)
                tables = {"forward": op_profile(os.path.join(tmp, f"{arch}-forward.onnx"), {"input": x},
                                                args.threads, PROFILE_RUNS)}
                for preset in presets:
                    tables[preset] = op_profile(os.path.join(tmp, f"{arch}-{preset}.onnx"),
                                                {"input": x, "target": t}, args.threads, PROFILE_RUNS)
                profiles[(arch, batch)] = tables
        if "_close" in cell_notes:
            cell_notes.pop("_close")()
        cell_notes.pop("_explainers", None)
        if memory:
            print(f"[{arch}] peak memory at batch 16", flush=True)
            jobs = [("forward", "onnxruntime", "ort", "", os.path.join(tmp, f"{arch}-forward.onnx")),
                    ("forward", "torch eager", "torch-forward", "", "")]
            for preset in presets:
                jobs += [(f"graphlrp {preset}", "onnxruntime", "ort", preset, os.path.join(tmp, f"{arch}-{preset}.onnx")),
                         (f"graphlrp {preset}", "torch eager", "torch-explainer", preset, "")]
            if not args.no_baselines and is_transformer(arch):
                jobs.append(("LXT efficient (CP-LRP, Zennit ε on linear layers)", "torch eager", "lxt", "", ""))
            elif not args.no_baselines:
                jobs.append(("Zennit EpsilonPlusFlat+ResNetCanonizer", "torch eager", "zennit", "", ""))
            for method, runtime, kind, preset, path in jobs:
                r = child(kind, arch, preset, path, 16, args.threads)
                memory_rows.append({"model": arch, "batch": 16, "method": method, "runtime": runtime,
                                    "peak_mb": r.get("peak_mb"), "before_mb": r.get("before_mb"),
                                    "note": r.get("error", "")})
                print(f"    {method} | {runtime}: {r}", flush=True)
        del runners
    if compile_time:
        for arch in args.compile_models.split(","):
            for preset in presets_of(arch):
                print(f"[{arch}] compile + export {preset}", flush=True)
                r = child("compile", arch, preset, os.path.join(tmp, f"compile-{arch}-{preset}.onnx"), 1,
                          args.threads)
                compile_rows.append({"model": arch, "method": preset, **r})
                print(f"    {r}", flush=True)
    for row in speed_rows:
        if row["note"]:
            notes[f"{row['method']} ({row['model']})"] = row["note"]
    info["load_average_end"] = os.getloadavg()
    write_reports(out, info, speed_rows, memory_rows, profiles, compile_rows, notes, args)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
