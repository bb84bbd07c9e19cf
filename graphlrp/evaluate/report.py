"""Write what a run measured: results.csv (one row per method), results.md (the paper's Tables 1 and 2, notes,
versions, timing) and run.json (the same numbers with the run's settings, for tools)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from .methods import OURS
from .metrics import mean_se
from .runner import Evaluation

COLUMNS = ("method", "insertion", "deletion", "id", "n", "insertion_se", "deletion_se", "id_se", "quantized")
PROTOCOLS = {"ours": "the paper's protocol: only the ours-* maps quantized to 8 heat levels",
             "all": "like for like: every method's maps quantized to 8 heat levels",
             "none": "like for like: no method's maps quantized"}


def rows(ev: Evaluation, results: dict | None = None) -> list[dict]:
    """One row per method of `results` (default: the run's own protocol, `ev.results`)."""
    out = []
    for name, r in (ev.results if results is None else results).items():
        (ins, ins_se), (dele, del_se), (idv, id_se) = mean_se(r.insertion), mean_se(r.deletion), mean_se(r.id)
        out.append({"method": name, "insertion": ins, "deletion": dele, "id": idv, "n": len(r.insertion),
                    "insertion_se": ins_se, "deletion_se": del_se, "id_se": id_se, "quantized": r.quantized})
    return out


def paper_rows(ev: Evaluation) -> list[dict]:
    """The rows as the paper's protocol computes them: the run's own where the post-processing is the same."""
    return rows(ev, {name: ev.paper_results.get(name, r) for name, r in ev.results.items()})


def write_csv(ev: Evaluation, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows(ev):
            writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})


def _pm(value: float, se: float) -> str:
    return f"{value:.3f} ± {se:.3f}"


def markdown(ev: Evaluation, figures: list[str] = ()) -> str:
    table = {r["method"]: r for r in rows(ev)}
    lines = [f"# Insertion/deletion: `{ev.model}`", "",
             f"- data: `{ev.data}`, {ev.n} images, top-1 accuracy {ev.accuracy:.1%}",
             f"- protocol: step {ev.step} px ({ev.points} points per curve), explanations of the predicted class, "
             "probability of the labelled class, black (0 in [0, 1] RGB) as the removed value",
             f"- normalisation: mean {list(ev.mean)}, std {list(ev.std)}",
             f"- command: `{ev.command}`",
             f"- post-processing (`--quantize {ev.quantize}`): {PROTOCOLS[ev.quantize]}",
             f"- engine: {ev.engine}, {ev.workers} worker{'s' if ev.workers != 1 else ''}",
             f"- time: {ev.seconds.get('total', 0):.0f} s in all, {ev.model_calls} model calls for the curves",
             "", "## Table 1: Ins ↑ / Del ↓ / ID ↑ (mean ± standard error over images)", ""]
    if ev.quantize == "ours":
        lines += ["| method | Ins | Del | ID |", "|---|---|---|---|"]
        for name, r in table.items():
            lines.append(f"| {name} | {_pm(r['insertion'], r['insertion_se'])} | "
                         f"{_pm(r['deletion'], r['deletion_se'])} | {_pm(r['id'], r['id_se'])} |")
    else:
        paper = {r["method"]: r for r in paper_rows(ev)}
        lines += [f"Left: {PROTOCOLS['ours']}. Right: {PROTOCOLS[ev.quantize]} (results.csv). Both from the same "
                  "maps in this run.", "",
                  "| method | paper: Ins | paper: Del | paper: ID | like for like: Ins | like for like: Del "
                  "| like for like: ID |", "|---|---|---|---|---|---|---|"]
        for name, r in table.items():
            p = paper[name]
            lines.append(f"| {name} | " + " | ".join(_pm(row[k], row[f"{k}_se"]) for row in (p, r)
                                                     for k in ("insertion", "deletion", "id")) + " |")
    variants = [(roman, split, identity) for roman, (split, identity) in OURS.items() if f"ours-{roman}" in table
                or f"ours-{roman}-raw" in table]
    if variants:
        lines += ["", "## Table 2: relevance splitting at skip connections (otsuki2024 rules)", "",
                  "| variant | split | identity skip | Ins | Del | ID | ID without quantization |",
                  "|---|---|---|---|---|---|---|"]
        for roman, split, identity in variants:
            q, raw = table.get(f"ours-{roman}"), table.get(f"ours-{roman}-raw")
            cells = [_pm(q[k], q[f"{k}_se"]) for k in ("insertion", "deletion", "id")] if q else ["–"] * 3
            cells.append(_pm(raw["id"], raw["id_se"]) if raw else "–")
            lines.append(f"| ({roman}) | {split} | {'included' if identity else 'excluded'} | " + " | ".join(cells) + " |")
    if ev.conservation:
        p = ev.conservation["p"]
        lines += ["", "## Conservation (ours-iv: ratio split, identity included)", "",
                  "| where | mean ΣR / p(ŷ) | max \\|ΣR − p(ŷ)\\| |", "|---|---|---|"]
        for key, values in ev.conservation.items():
            if key != "p":
                lines.append(f"| {key} | {(values / p).mean():.4f} | {abs(values - p).max():.2e} |")
    notes = [f"- `{k}`: {text}" for k, texts in ev.notes.items() for text in texts]
    notes += [f"- `{k}` skipped: {reason}" for k, reason in ev.skipped.items()]
    if notes:
        lines += ["", "## Notes", ""] + notes
    lines += ["", "## Methods", ""] + [f"- `{name}`: {r.description}" for name, r in ev.results.items()]
    lines += ["", "## Versions and timing", "",
              ", ".join(f"{k} {v}" for k, v in ev.versions.items()), ""]
    lines += [f"- {k}: {v:.1f} s" for k, v in ev.seconds.items()]
    for figure in figures:
        lines += ["", f"![{Path(figure).stem}]({figure})"]
    return "\n".join(lines) + "\n"


def write_json(ev: Evaluation, path: Path) -> None:
    info = {"model": ev.model, "data": ev.data, "n": ev.n, "accuracy": ev.accuracy, "step": ev.step,
            "points": ev.points, "mean": ev.mean, "std": ev.std, "command": ev.command, "quantize": ev.quantize,
            "engine": ev.engine, "workers": ev.workers, "results": rows(ev), "paper_protocol_results": paper_rows(ev),
            "skipped": ev.skipped, "notes": ev.notes, "versions": ev.versions, "seconds": ev.seconds,
            "model_calls": ev.model_calls}
    path.write_text(json.dumps(info, indent=2) + "\n")


def write_all(ev: Evaluation, out_dir: Path) -> list[Path]:
    from . import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    figures = plots.write_all(ev, out_dir)
    write_csv(ev, out_dir / "results.csv")
    (out_dir / "results.md").write_text(markdown(ev, [f.name for f in figures]))
    write_json(ev, out_dir / "run.json")
    return [out_dir / "results.csv", out_dir / "results.md", out_dir / "run.json"] + figures
