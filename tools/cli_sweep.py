"""The main job, as a user runs it, on every torchvision classification model.

For each model: `graphlrp compile NAME --weights none -o NAME.onnx` with the CLI's default preset, in its own
process, at the model's own input size (224 px for ImageNet models; models over --max-params million parameters at
--large-size). Per model it records the exit status, whether anything that looks like a traceback reached the user,
the CLI's `checked` and warning lines, the file's size, the wall time, the process's CPU time and its peak resident
memory (from the kernel's rusage of that child). The report is rewritten after every model and resumable:

    python tools/cli_sweep.py -o results/cli-sweep.md            # all of torchvision
    python tools/cli_sweep.py -o results/cli-sweep.md --resume   # go on where a stopped run ended
    python tools/cli_sweep.py -o results/cli-sweep-timm-224.md --size 224 --models timm:gcvit_base,...  # timm models
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROW_MARK = "<!-- row "


def torchvision_models() -> list[str]:
    import torchvision
    return sorted(torchvision.models.list_models(module=torchvision.models))


def params_millions(name: str) -> float:
    """Parameters in millions: torchvision's weight metadata, or a `timm:NAME` model built on the meta device."""
    if name.startswith("timm:"):
        import timm
        import torch
        with torch.device("meta"):
            model = timm.create_model(name[len("timm:"):], pretrained=False)
        return sum(p.numel() for p in model.parameters()) / 1e6
    import torchvision
    return torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"] / 1e6


def watch_memory(pid: int, limit_gib: float, tripped: list) -> None:
    """Kill the child when its resident memory passes the limit (the machine's other work keeps running)."""
    import psutil
    try:
        proc = psutil.Process(pid)
        while proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
            if proc.memory_info().rss > limit_gib * 2**30:
                tripped.append(True)
                proc.kill()
                return
            time.sleep(0.2)
    except psutil.Error:
        return


def run_one(name: str, size: int | None, timeout: float, workdir: str, max_rss_gib: float = 0) -> dict:
    out = os.path.join(workdir, f"{name}.onnx")
    cmd = [sys.executable, "-m", "graphlrp.cli", "compile", name, "--weights", "none", "-o", out]
    if size:
        cmd += ["--input-size", str(size)]
    load = os.getloadavg()[0]  # wall times mean little on a busy machine: the row says how busy it was
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    tripped: list = []
    if max_rss_gib:
        threading.Thread(target=watch_memory, args=(proc.pid, max_rss_gib, tripped), daemon=True).start()
    # os.wait4 gives this child's own rusage: its CPU time and its peak resident memory
    _, wait_status, usage = os.wait4(proc.pid, 0)
    killer.cancel()
    timed_out = time.perf_counter() - t0 >= timeout
    proc.returncode = os.waitstatus_to_exitcode(wait_status)
    reader.join()
    text = "".join(chunks)
    wall = time.perf_counter() - t0
    row = {"model": name, "input": size or "", "rc": proc.returncode, "timeout": timed_out, "memory": bool(tripped),
           "wall_s": round(wall, 1), "load": round(load, 1),
           "traceback": "Traceback (most recent call last)" in text, "size_mb": None,
           "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "rss_gib": round(usage.ru_maxrss / 2**20, 2)}
    if os.path.exists(out):
        row["size_mb"] = round(os.path.getsize(out) / 2**20, 1)
        os.remove(out)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    row["checked"] = next((ln for ln in lines if ln.startswith("checked")), "")
    row["warning"] = next((ln for ln in lines if "warning" in ln.lower() or "vanish" in ln.lower()), "")
    row["error"] = "" if proc.returncode == 0 else (lines[-1] if lines else "")
    return row


def read_rows(path: str) -> dict[str, dict]:
    rows = {}
    if os.path.exists(path):
        for line in open(path):
            if line.startswith(ROW_MARK):
                row = json.loads(line[len(ROW_MARK):].rsplit("-->", 1)[0])
                rows[row["model"]] = row
    return rows


def status(row: dict) -> str:
    if row["timeout"]:
        return "timeout"
    if row.get("memory"):
        return "memory"
    if row["traceback"]:
        return "TRACEBACK"
    if row["rc"] != 0:
        return "refused"
    return "ok" if row["size_mb"] else "no file"


def cell(text: str, n: int = 160) -> str:
    text = text.replace("|", "\\|")
    return text if len(text) <= n else text[: n - 1] + "…"


def cpu_name() -> str:
    """The CPU's model name (Linux), else the machine type."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def report(rows: dict[str, dict], planned: list[str], command: str, limits: tuple[float, float]) -> str:
    done = [rows[m] for m in planned if m in rows]
    counts = {}
    for r in done:
        counts[status(r)] = counts.get(status(r), 0) + 1
    wall_limit, rss_limit = limits
    normal = [r for r in done if not r.get("large")]
    over = [r["model"] for r in normal if status(r) == "ok" and (r["wall_s"] > wall_limit or r["rss_gib"] > rss_limit)]
    import torch
    everything = planned == torchvision_models()
    title = "every torchvision classification model" if everything else "the models listed below"
    lines = [f"# The main job on {title}", "",
             f"`{command}` — each model `graphlrp compile NAME --weights none -o NAME.onnx` in its own process, the "
             f"CLI's default preset, torch {torch.__version__}, {cpu_name()}, "
             f"{os.cpu_count()} cores (times depend on the CPU: compare rows of one report only).", ""]
    if len(done) < len(planned):
        lines += [f"**partial: {len(done)} of {len(planned)} models** (run the same command with `--resume` to go on).",
                  ""]
    lines += ["| models | " + " | ".join(sorted(counts)) + " |", "|---:|" + "---:|" * len(counts),
              f"| {len(done)} | " + " | ".join(str(counts[k]) for k in sorted(counts)) + " |", ""]
    if normal:
        walls = sorted(r["wall_s"] for r in normal if status(r) == "ok")
        rss = sorted(r["rss_gib"] for r in normal if status(r) == "ok")
        if walls:
            sizes = {r["input"] for r in normal}
            at = f"at {sizes.pop()} px" if len(sizes) == 1 and "" not in sizes else "at their own input size"
            lines += [f"Models up to the parameter limit, {at}: wall time median {walls[len(walls) // 2]} s,"
                      f" max {walls[-1]} s; peak memory median {rss[len(rss) // 2]} GiB, max {rss[-1]} GiB. "
                      f"Over {wall_limit:g} s or {rss_limit:g} GiB: {', '.join(over) if over else 'none'}.", ""]
    lines += ["status: ok — exit 0 and a file written (the CLI checks it: onnx.checker and onnxruntime parity); "
              "refused — graphlrp's own error, exit ≠ 0; TRACEBACK — a Python traceback reached the user; "
              "timeout — over the time limit; memory — stopped by this tool at --max-rss-gib. wall: the whole process (import, build, compile with its self-check, "
              "export with its parity check); CPU: user + system time of the process; peak: its peak resident memory.",
              "", "load: the 1-minute load average when the model started (the machine has "
              f"{os.cpu_count()} cores; above that, wall times are inflated by other work).", "",
              "| model | input | status | wall s | CPU s | load | peak GiB | MB | checked | warning / error |",
              "|---|---:|---|---:|---:|---:|---:|---:|---|---|"]
    for r in done:
        size = f"{r['input']} L" if r.get("large") else (r["input"] or "own")
        lines.append(f"| {r['model']} | {size} | {status(r)} | {r['wall_s']} | {r['cpu_s']} | {r.get('load', '')} | {r['rss_gib']} | "
                     f"{r['size_mb'] or ''} | {cell(r['checked'])} | {cell(r['error'] or r['warning'])} |")
    lines.append("")
    lines += [ROW_MARK + json.dumps(rows[m]) + " -->" for m in planned if m in rows]
    return "\n".join(lines) + "\n"


def planned_models(subset: list[str], rows: dict) -> list[str]:
    """The models the report is about: every torchvision classification model, unless the report (resumed: `rows`)
    or the run (`subset`) names others; then those, the report's first, so a resumed or partly redone sweep of
    timm models keeps every row it had."""
    everything = torchvision_models()
    named = list(rows) + [m for m in subset if m not in rows]
    if not named or set(named) <= set(everything):
        return everything if rows or not subset else subset
    return named


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output", default="results/cli-sweep.md")
    ap.add_argument("--resume", action="store_true", help="keep the models already in the report")
    ap.add_argument("--models", default="", help="comma-separated subset, run in this order (with --resume the "
                    "report keeps every other model's row)")
    ap.add_argument("--redo", default="", help="comma-separated models to run again although the report has them")
    ap.add_argument("--max-params", type=float, default=100, help="millions; larger models run at --large-size")
    ap.add_argument("--large-size", type=int, default=64)
    ap.add_argument("--size", type=int, default=0, help="input size of the models up to --max-params (default 0: "
                    "each model's own, e.g. 600 px for efficientnet_b7)")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--max-rss-gib", type=float, default=12, help="stop a compile whose memory passes this (0: none)")
    a = ap.parse_args(argv)
    subset = a.models.split(",") if a.models else []
    rows = read_rows(a.output) if a.resume else {}
    planned = planned_models(subset, rows)
    redo = set(a.redo.split(",")) if a.redo else set()
    command = "python tools/cli_sweep.py -o " + a.output + (f" --size {a.size}" if a.size else "") + (
        "" if planned == torchvision_models() else f" --models {','.join(planned)}")
    with tempfile.TemporaryDirectory() as workdir:
        for name in subset or planned:
            if name in rows and name not in redo:
                continue
            large = params_millions(name) > a.max_params
            row = run_one(name, a.large_size if large else (a.size or None), a.timeout, workdir, a.max_rss_gib)
            row["large"] = large
            rows[name] = row
            print(f"{name}: {status(row)} {row['wall_s']} s {row['rss_gib']} GiB {row['error'][:120]}", flush=True)
            tmp = a.output + ".tmp"
            with open(tmp, "w") as f:
                f.write(report(rows, planned, command, (60.0, 4.0)))
            os.replace(tmp, a.output)
    return 0



if __name__ == "__main__":
    sys.exit(main())
