"""What the compile's self-check (graphlrp.verify) costs: compile time with verify=False and verify=True, interleaved
in the same run (medians), and the check's own share. Writes results/verify-cost.md.

    python tools/verify_cost.py [--models resnet50,densenet121,vit_b_16] [--rounds 3] [--size 224]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import graphlrp
from graphlrp.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet50,densenet121,vit_b_16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--out", default="results/verify-cost.md")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    for name in args.models.split(","):
        model, _ = load_model(name, "none")
        torch.manual_seed(0)
        x = torch.randn(1, 3, args.size, args.size)
        rules = "cp-lrp" if "vit" in name else "otsuki2024"
        plain, checked, check = [], [], []
        for _ in range(args.rounds):
            t = time.perf_counter()
            graphlrp.compile(model, x, rules=rules, verify=False)
            plain.append(time.perf_counter() - t)
            t = time.perf_counter()
            explainer = graphlrp.compile(model, x, rules=rules, allow_vanishing=True)
            checked.append(time.perf_counter() - t)
            check.append(explainer.certificate.seconds)
        p, c, k = (statistics.median(v) for v in (plain, checked, check))
        rows.append(f"| {name} | {rules} | {p:.1f} | {c:.1f} | {k:.1f} | {c / p:.2f} |")
        print(rows[-1], flush=True)
    text = "\n".join([
        "# What the compile's self-check costs",
        "",
        f"`python tools/verify_cost.py --models {args.models} --rounds {args.rounds} --size {args.size}`: "
        f"random weights, {args.size} px, batch-1 example, 2 threads, compile with `verify=False` and with the "
        f"check interleaved in each round; medians of {args.rounds} rounds, seconds. The check runs the model, "
        "rebuilds the relevance pass with the conservation trace and runs it, on the example and a perturbed copy.",
        "",
        "| model | preset | compile, no check (s) | compile with check (s) | of which the check (s) | ratio |",
        "|---|---|---:|---:|---:|---:|",
        *rows, ""])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
