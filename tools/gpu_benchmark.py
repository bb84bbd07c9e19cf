"""GPU figures: the explainer in onnxruntime's CUDA (and TensorRT) provider against the forward on the same device,
and against Zennit (ResNet-50) and LXT (ViT-B/16) in PyTorch on the same device, plus a float16 explainer.

Run through `tools/gpu_benchmark.sh` (one call of at most 8 minutes on one GPU; it writes results/benchmark-gpu.md).
`--provider cpu` runs the same on the CPU (onnxruntime's CPU provider, PyTorch on the CPU), so the script is tested
where no GPU is lent; `--models resnet18,vit_tiny --size 32 --batches 1 --repeats 1` runs in well under a minute.

Random weights (no downloads). Timing: `--warmup` discarded rounds, then the median of `--repeats` rounds in which
every method of a (model, batch) cell runs once, interleaved, so a noisy machine moves them alike. On a GPU the
onnxruntime inputs and outputs are bound on the device (IOBinding), so no host copies are timed; PyTorch runs are
closed by torch.cuda.synchronize(). The report is rewritten after every cell: a run stopped by the time limit
leaves what it measured, and `--budget-s` skips the cells that would start after it (the report names them).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark as cpu_bench  # noqa: E402  (tools/benchmark.py: models, Zennit and LXT set-ups)

PRESETS = {"resnet": ["otsuki2024", "epsilon-plus-flat"], "vit": ["cp-lrp"]}


def build(arch: str, size: int):
    import torch
    import torchvision

    if arch == "vit_tiny":  # a one-layer ViT for the CPU test of this script
        torch.manual_seed(0)
        model = torchvision.models.VisionTransformer(image_size=size, patch_size=16, num_layers=1, num_heads=2,
                                                     hidden_dim=32, mlp_dim=64).eval()
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
        return model
    if arch.startswith("vit") and size != 224:
        torch.manual_seed(0)
        model = getattr(torchvision.models, arch)(image_size=size).eval()
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
        return model
    return cpu_bench.build_model(arch)


def providers(kind: str, tensorrt: bool, cache: str):
    import onnxruntime as ort

    available = ort.get_available_providers()
    if kind == "cpu":
        return {"onnxruntime CPU": ["CPUExecutionProvider"]}
    if "CUDAExecutionProvider" not in available:
        raise SystemExit(f"no CUDAExecutionProvider in this onnxruntime ({', '.join(available)}); install "
                         "onnxruntime-gpu (pip install -e '.[gpu]') or run with --provider cpu")
    out = {"onnxruntime CUDA": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
    if tensorrt and "TensorrtExecutionProvider" in available:
        out["onnxruntime TensorRT"] = [("TensorrtExecutionProvider", {"trt_engine_cache_enable": True,
                                                                      "trt_engine_cache_path": cache}),
                                       "CUDAExecutionProvider", "CPUExecutionProvider"]
    return out


class OrtRunner:
    """session.run, or on a GPU run_with_iobinding with the inputs and outputs on the device."""

    def __init__(self, path: str, provider_list, device: str, threads: int, outputs):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if device == "cpu":
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(path, options, providers=provider_list)
        self.device, self.outputs, self.binding = device, outputs, None

    def feed(self, feeds: dict):
        import onnxruntime as ort

        if self.device == "cpu":
            self.feeds = feeds
            return
        self.binding = self.session.io_binding()
        self.device_inputs = {k: ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0) for k, v in feeds.items()}
        for k, v in self.device_inputs.items():
            self.binding.bind_ortvalue_input(k, v)
        for name in self.outputs:
            self.binding.bind_output(name, "cuda")

    def __call__(self):
        if self.binding is None:
            return self.session.run(None, self.feeds)
        self.session.run_with_iobinding(self.binding)
        return None

    def result(self):
        return self.session.run(None, self.feeds) if self.binding is None else \
            [o.numpy() for o in self.binding.get_outputs()]


def timed_rounds(runners: dict, repeats: int, warmup: int, sync) -> dict:
    times = {k: [] for k in runners}
    for r in range(warmup + repeats):
        for name, fn in runners.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            if r >= warmup:
                times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def machine(device: str) -> str:
    import onnxruntime as ort
    import torch

    gpu = torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else "none"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores; GPU: {gpu}; torch "
            f"{torch.__version__}, onnxruntime {ort.__version__} (providers: {', '.join(ort.get_available_providers())})")


def write(out: Path, args, info: str, rows: list, fp16_rows: list, skipped: list, started: float) -> None:
    lines = ["# graphlrp GPU benchmark" if args.provider == "cuda" else "# graphlrp benchmark of the GPU script, "
             "run on the CPU (--provider cpu)", "",
             f"Command: `tools/gpu_benchmark.sh {' '.join(sys.argv[1:])}`", "", f"Machine: {info}.", "",
             f"Speed: median of {args.repeats} interleaved rounds after {args.warmup} warm-up round(s), input "
             f"{args.size}x{args.size}, random weights. × forward: time / the onnxruntime forward of the same model, "
             "batch and provider, in the same rounds. PyTorch rows (Zennit, LXT, the eager forward) run on the "
             f"same device ({'cuda' if args.provider == 'cuda' else 'cpu'}).", "",
             "| model | batch | method | runtime | images / s | ms / batch | × onnxruntime forward |",
             "|---|---:|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['method']} | {r['runtime']} | {r['ips']:.1f} | "
                     f"{r['ms']:.2f} | {r['ratio']:.2f} |")
    if fp16_rows:
        lines += ["", "## float16 explainer (`graphlrp compile --precision fp16`)", "",
                  "Float16 weights and graph, float32 input and outputs. Distances are max |a − b| / max |b| against "
                  "the float32 explainer; ΣR_in / R_out per sample on the export's parity batch (2 images: top-1 "
                  "and a random class), float16 and float32; 'at batch' compares the float16 and float32 files in "
                  "the benchmark's provider on the benchmark batch.", "",
                  "| model | preset | file fp16 / fp32 (MiB) | relevance vs fp32 | logits vs fp32 | relevance vs fp32 "
                  "at batch | ΣR_in / R_out fp16 | ΣR_in / R_out fp32 |", "|---|---|---:|---:|---:|---:|---|---|"]
        for r in fp16_rows:
            lines.append(f"| {r['model']} | {r['preset']} | {r['mib16']:.1f} / {r['mib32']:.1f} | {r['rel']:.1e} | "
                         f"{r['logits']:.1e} | {r['at_batch']} | {r['c16']} | {r['c32']} |")
    if skipped:
        lines += ["", "Not measured (the --budget-s limit came first): " + ", ".join(skipped) + "."]
    if args.provider != "cuda":
        lines += ["", "No GPU was used: these are CPU figures of the same script (its test setting), not GPU ones. "
                  "onnxruntime's CPU provider runs most float16 ops through float32 casts it inserts, so the fp16 "
                  "rows are slow here by construction; float16 is for GPUs."]
    lines += ["", f"Wall time of the run: {time.time() - started:.0f} s."]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--provider", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--models", default="resnet50,vit_b_16")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="onnxruntime / torch CPU threads")
    p.add_argument("--resnet-presets", default=",".join(PRESETS["resnet"]))
    p.add_argument("--vit-presets", default=",".join(PRESETS["vit"]))
    p.add_argument("--no-tensorrt", action="store_true", help="skip the TensorRT provider even where it is installed")
    p.add_argument("--no-baselines", action="store_true", help="skip Zennit and LXT")
    p.add_argument("--budget-s", type=float, default=420.0, help="start no cell after this many seconds")
    p.add_argument("--out", default="results/benchmark-gpu.md")
    args = p.parse_args(argv)

    import onnx
    import torch

    import graphlrp
    from graphlrp.export import forward_onnx

    started = time.time()
    device = "cuda" if args.provider == "cuda" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("torch sees no CUDA device; run with --provider cpu")
    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="graphlrp-gpu-")
    ort_providers = providers(args.provider, not args.no_tensorrt, tmp)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    info = machine(device)
    rows, fp16_rows, skipped = [], [], []
    out = Path(args.out)
    batches = [int(b) for b in args.batches.split(",")]
    for arch in args.models.split(","):
        if time.time() - started > args.budget_s:
            skipped.append(arch)
            continue
        vit = arch.startswith("vit")
        presets = (args.vit_presets if vit else args.resnet_presets).split(",")
        model = build(arch, args.size)
        x1 = torch.randn(1, 3, args.size, args.size)
        files = {}
        forward = os.path.join(tmp, f"{arch}-forward.onnx")
        onnx.save(forward_onnx(model, x1), forward)
        for preset in presets:
            explainer = graphlrp.compile(model, x1, rules=preset, allow_vanishing=True)
            f32, f16 = os.path.join(tmp, f"{arch}-{preset}.onnx"), os.path.join(tmp, f"{arch}-{preset}-fp16.onnx")
            r32 = explainer.export_onnx(f32)
            r16 = explainer.export_onnx(f16, precision="fp16")
            files[preset] = (f32, f16)
            fp16_rows.append(dict(model=arch, preset=preset, mib16=r16.size_bytes / 2**20,
                                  mib32=r32.size_bytes / 2**20, rel=r16.fp16["relevance_vs_fp32"],
                                  logits=r16.fp16["logits_vs_fp32"], at_batch="",
                                  c16=", ".join(f"{v:.4f}" for v in r16.fp16["conservation_fp16"]),
                                  c32=", ".join(f"{v:.4f}" for v in r16.fp16["conservation_fp32"])))
        baseline = None
        if not args.no_baselines:
            m_dev = model.to(device)
            if vit:
                lxt = cpu_bench.LXTAttributor(m_dev)
                baseline = ("LXT efficient (CP-LRP, ε on linear layers)", lambda xt: lxt(xt))
            else:
                attributor = cpu_bench.zennit_attributor(m_dev)
                baseline = ("Zennit EpsilonPlusFlat + ResNetCanonizer",
                            lambda xt: cpu_bench.zennit_run(attributor, m_dev, xt))
        for batch in batches:
            if time.time() - started > args.budget_s:
                skipped.append(f"{arch} batch {batch}")
                continue
            xb = np.random.default_rng(batch).standard_normal((batch, 3, args.size, args.size)).astype(np.float32)
            tb = np.full((batch,), -1, dtype=np.int64)
            xt = torch.from_numpy(xb).to(device)
            for runtime, provider_list in ort_providers.items():
                if time.time() - started > args.budget_s:
                    skipped.append(f"{arch} batch {batch} {runtime}")
                    continue
                runners, kinds = {}, {}
                try:
                    fwd = OrtRunner(forward, provider_list, device, args.threads, ["logits"])
                    fwd.feed({"input": xb})
                    runners["forward"], kinds["forward"] = fwd, runtime
                    ort_runners = {}
                    for preset, (f32, f16) in files.items():
                        for label, path in ((f"graphlrp {preset}", f32), (f"graphlrp {preset} fp16", f16)):
                            r = OrtRunner(path, provider_list, device, args.threads, ["logits", "relevance"])
                            r.feed({"input": xb, "target": tb})
                            runners[label], kinds[label], ort_runners[label] = r, runtime, r
                    for fn in runners.values():  # first calls allocate (and build TensorRT engines): not timed
                        fn()
                except Exception as e:  # e.g. the TensorRT provider listed but its libraries missing
                    if runtime == next(iter(ort_providers)):
                        raise
                    skipped.append(f"{arch} batch {batch} {runtime} ({type(e).__name__}: {str(e)[:120]})")
                    continue
                if runtime == next(iter(ort_providers)):
                    m_dev = model.to(device)

                    def eager(m_dev=m_dev, xt=xt):
                        with torch.no_grad():
                            return m_dev(xt)

                    runners["forward (PyTorch eager)"] = eager
                    kinds["forward (PyTorch eager)"] = f"torch {device}"
                    if baseline is not None:
                        runners[baseline[0]] = lambda: baseline[1](xt)
                        kinds[baseline[0]] = f"torch {device}"
                for fn in runners.values():  # and the PyTorch ones: a first call each, not timed
                    fn()
                for preset in files:
                    a = ort_runners[f"graphlrp {preset} fp16"].result()[1]
                    b = ort_runners[f"graphlrp {preset}"].result()[1]
                    dist = float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-30))
                    for row in fp16_rows:
                        if row["model"] == arch and row["preset"] == preset:
                            row["at_batch"] += f"{'; ' if row['at_batch'] else ''}{dist:.1e} ({runtime}, {batch})"
                med = timed_rounds(runners, args.repeats, args.warmup, sync)
                for name, t in med.items():
                    rows.append(dict(model=arch, batch=batch, method=name, runtime=kinds[name], ips=batch / t,
                                     ms=t * 1000, ratio=t / med["forward"]))
                write(out, args, info, rows, fp16_rows, skipped, started)
                print(f"{arch} batch {batch} {runtime}: " + ", ".join(f"{k} {v / med['forward']:.2f}x"
                                                                      for k, v in med.items()), flush=True)
        model.to("cpu")
    write(out, args, info, rows, fp16_rows, skipped, started)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
