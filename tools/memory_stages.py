"""Peak resident memory of each stage of the main job (build, trace, rewrite, self-check, lowering, parity check)
for one model, sampled every 20 ms by a thread: where a large model's memory goes.

    python tools/memory_stages.py timm:aimv2_large_patch14_224 --size 64 [--rules cp-lrp] [--coverage]

MODEL is `timm:NAME` or a torchvision name. Without --coverage: the model built as the CLI builds it (the same
random weights), `graphlrp.compile` with the CLI's preset (or --rules), then `export_onnx` with its parity check,
as `graphlrp compile` runs them. With --coverage: what `graphlrp coverage` does for one row (three presets, the
export of the CLI's choice), with the model built as the coverage report builds it. Prints one line per stage
(peak GiB while it ran and seconds spent in it; "X (after Y)": back in X after stage Y returned) and the overall
peak.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import threading
import time

import psutil


def _kernel_peak(reset: bool) -> int | None:
    """The process's peak resident size since the last reset, from Linux's VmHWM (bytes), then reset to the
    current size; None where /proc does not offer it. The sampling thread alone misses short peaks inside calls
    that hold the GIL (Python's compile() of an fx module's generated code)."""
    try:
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        return peak
    except (OSError, StopIteration, ValueError):
        return None


class StageSampler:
    """A thread that records the process's peak resident size per named stage."""

    def __init__(self, period: float = 0.02):
        self.process, self.period = psutil.Process(), period
        self.stage, self.peaks, self.seconds = "import", {}, {}
        self.since = time.perf_counter()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while True:
            rss = self.process.memory_info().rss
            self.peaks[self.stage] = max(self.peaks.get(self.stage, 0), rss)
            time.sleep(self.period)

    def enter(self, name: str):
        time.sleep(2 * self.period)  # the sampler sees the end of the previous stage under its name
        peak = _kernel_peak(reset=True)  # exact where Linux keeps it: a sampler misses spikes that hold the GIL
        if peak is not None:
            self.peaks[self.stage] = max(self.peaks.get(self.stage, 0), peak)
        now = time.perf_counter()
        self.seconds[self.stage] = self.seconds.get(self.stage, 0.0) + now - self.since
        self.stage, self.since = name, now

    def wrap(self, owner, attr: str, name: str):
        """Count the time inside owner.attr as stage `name`."""
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def staged(*args, **kwargs):
            outer = self.stage
            self.enter(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.enter(f"{outer.split(' (after ')[0]} (after {name})")

        setattr(owner, attr, staged)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rules", default=None)
    ap.add_argument("--coverage", action="store_true")
    a = ap.parse_args()
    sampler = StageSampler()
    import torch

    import graphlrp
    import graphlrp.compiler as compiler
    import graphlrp.coverage as coverage
    import graphlrp.export as export
    import graphlrp.rewrite as rewrite
    from graphlrp.commands.compile import default_preset

    sampler.wrap(compiler, "trace", "trace")
    sampler.wrap(compiler, "certify", "self-check")
    sampler.wrap(rewrite.Rewriter, "build", "rewrite")
    sampler.wrap(export, "_lower", "export: lowering")
    sampler.wrap(export, "check_parity", "export: parity check")
    sampler.wrap(export, "_float64_run", "export: float64 run")
    sampler.enter("build")
    source, _, name = a.model.rpartition(":")
    if a.coverage:
        model, note = coverage.build_for_size(source or "torchvision", name, a.size)
    else:  # as the CLI builds it: the same random weights (load_model's fixed seed), so the same parity numbers
        from graphlrp.models import at_input_size, load_model

        model, info = load_model(a.model, "none")
        built = model
        model = at_input_size(model, a.model, info, a.size, a.size)
        note = "" if model is built else f"(built for {a.size} px)"
        del built
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{a.model}: {params:.1f} M parameters at {a.size} px {note}".rstrip())
    with tempfile.TemporaryDirectory() as tmp:
        if a.coverage:
            sampler.wrap(coverage, "check_preset", "coverage: one preset")
            sampler.enter("coverage")
            row = coverage.check_model(model, a.size, source, name, onnx_dir=tmp)
            print(f"coverage row: {row.status} {row.error} {row.onnx_error}".rstrip())
        else:
            rules = a.rules or default_preset(model)
            sampler.enter("compile")
            explainer = graphlrp.compile(model, torch.randn(1, 3, a.size, a.size), rules=rules, allow_vanishing=True,
                                         derived_weights="computed")  # as the CLI builds it
            del model
            sampler.enter("export")
            report = explainer.export_onnx(os.path.join(tmp, "m.onnx"))
            print(f"{rules}: exported, parity {report.max_rel_diff:.1e}")
    sampler.enter("end")
    for stage, peak in sampler.peaks.items():
        print(f"  {stage:32s} {peak / 2 ** 30:6.2f} GiB {sampler.seconds.get(stage, 0.0):8.1f} s")
    print(f"peak {max(sampler.peaks.values()) / 2 ** 30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
