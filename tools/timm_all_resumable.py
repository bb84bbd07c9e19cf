"""Run the timm acceptance (`../shared/acceptance/timm_all.py`) one module per process, resumably.

The acceptance script runs all of timm's modules in one process, which takes hours on a 2-core machine and loses
everything when it is stopped. This runner calls it with `--modules M` for one module at a time, under a time
limit, and appends each module's verdict lines to a log; a second run skips the modules already in the log.
It then writes a markdown summary (results/timm-all.md by default) from the log, marked partial until every
module has a line.

    python tools/timm_all_resumable.py [--log results/timm-all.log] [--timeout 900] [--modules a,b]
        [--retry failed|uncovered]

Run from the project root, with the project installed and ../shared present.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ACCEPTANCE = Path("../shared/acceptance/timm_all.py")
VERDICT = re.compile(r"^(ok|FAIL|skip)\s+(\S+?)(/|:)")


def read_log(log: Path) -> dict[str, list[str]]:
    """module -> its result lines (the last run of a module wins)."""
    done: dict[str, list[str]] = {}
    if not log.exists():
        return done
    for line in log.read_text().splitlines():
        if line.startswith("# module "):
            current = line.split()[2]
            done[current] = []
        elif line.strip() and "current" in locals():
            done[current].append(line)
    return done


def run_module(module: str, timeout: int) -> tuple[list[str], float]:
    t = time.time()
    # the acceptance script writes each explainer into a fresh temporary folder and keeps it (up to ~0.5 GB a
    # model, ~100 GB over all modules): the module's process gets a temporary folder of its own, removed after it
    scratch = tempfile.mkdtemp(prefix=f"timm-all-{module}-")
    try:
        p = subprocess.run([sys.executable, str(ACCEPTANCE), "--modules", module], capture_output=True, text=True,
                           timeout=timeout, env={**os.environ, "TMPDIR": scratch})
        out = [ln for ln in p.stdout.splitlines() if ln.startswith(("ok ", "FAIL ", "skip "))]
        # the last 'ok/FAIL N of M modules' line is the per-run share; keep only the module's own verdict
        out = [ln for ln in out if " timm modules compile" not in ln]
        if p.returncode not in (0, 1) or not out:
            tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1][:200]
            out.append(f"FAIL  {module}: the acceptance process ended with status {p.returncode}: {tail}")
        covered = " 1 of 1 timm modules" in p.stdout
        out.append(f"covered {int(covered)}")
    except subprocess.TimeoutExpired:
        out = [f"timeout {module}: over {timeout} s", "covered 0"]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out, time.time() - t


def summary(done: dict[str, list[str]], planned: list[str], out: Path, command: str) -> None:
    covered = sum(1 for m in planned if "covered 1" in done.get(m, []))
    skipped = [m for m in planned if any(ln.startswith("skip") for ln in done.get(m, []))]
    failed = [m for m in planned if any(ln.startswith(("FAIL", "timeout")) for ln in done.get(m, []))]
    ran = [m for m in planned if m in done]
    tried = [m for m in ran if m not in skipped]
    partial = len(ran) < len(planned)
    lines = ["# timm: one model per module, both conserving presets, ONNX export", "",
             f"Command: `{command}` (runs `python ../shared/acceptance/timm_all.py --modules M` per module).", ""]
    if partial:
        lines += [f"**partial: {len(ran)} of {len(planned)} modules run** (rerun the command: it resumes).", ""]
    share = covered / max(len(tried), 1)
    lines += [f"Modules tried: {len(tried)} (skipped by the acceptance script: {len(skipped)}). Covered (a conserving "
              f"preset conserves and its explainer exports): **{covered} of {len(tried)} ({share:.0%})**. "
              f"Modules with a failed check (WRONG, CRASH or over the time limit): {len(failed)}"
              + (f" ({', '.join(failed)})" if failed else "") + ".", "",
              "| module | covered | result |", "|---|---|---|"]
    for m in planned:
        if m not in done:
            continue
        res = [ln for ln in done[m] if not ln.startswith(("covered", "# "))]
        text = "<br>".join(r.replace("|", "\\|") for r in res)
        lines.append(f"| {m} | {'yes' if 'covered 1' in done[m] else 'no'} | {text} |")
    out.write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log", default="results/timm-all.log")
    ap.add_argument("-o", "--output", default="results/timm-all.md")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per module")
    ap.add_argument("--modules", default="", help="comma-separated modules (default: all of timm.list_modules())")
    ap.add_argument("--retry", choices=("failed", "uncovered"), default=None,
                    help="run again the modules with a FAIL or timeout line ('failed'), or every module not covered "
                         "('uncovered': failed ones and those a conserving preset did not both conserve and export)")
    ap.add_argument("--reverse", action="store_true",
                    help="go through the modules from the last (a second runner beside a first one: each skips "
                         "what the other has logged)")
    a = ap.parse_args()
    import timm

    planned = timm.list_modules()
    todo = a.modules.split(",") if a.modules else planned
    todo = todo[::-1] if a.reverse else todo
    log = Path(a.log)
    done = read_log(log)
    command = "python tools/timm_all_resumable.py" + "".join(
        f" {flag} {value}" for flag, value, default in (("--log", a.log, "results/timm-all.log"),
                                                        ("-o", a.output, "results/timm-all.md")) if value != default)
    for module in todo:
        lines = done.get(module, [])
        failed = any(ln.startswith(("FAIL", "timeout")) for ln in lines)
        uncovered = "covered 1" not in lines and not any(ln.startswith("skip") for ln in lines)
        if module in done and not ((a.retry == "failed" and failed) or (a.retry == "uncovered" and uncovered)):
            continue
        lines, took = run_module(module, a.timeout)
        with log.open("a") as f:
            f.write(f"# module {module} ({took:.0f} s, {time.strftime('%Y-%m-%d %H:%M')})\n")
            f.write("\n".join(lines) + "\n")
        print(f"{module}: {lines[0][:160]} [{took:.0f} s]", flush=True)
        done = read_log(log)
        summary(done, planned, Path(a.output), command)
    summary(read_log(log), planned, Path(a.output), command)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
