"""`graphlrp coverage`: compile torchvision's classification models and timm's architectures with three presets,
export the CLI's choice to ONNX, and write a report that a later run can resume."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("coverage", help="compile a zoo of models with three presets and report which are exact",
                       description="Compile every torchvision classification model (CNNs and transformers) and the "
                                   "timm models matching the patterns (random weights) with the CLI's own preset "
                                   "choice, otsuki2024-conserving and cp-lrp-conserving; export the CLI's choice to "
                                   "ONNX with onnxruntime parity; write a markdown report, rewritten after each model.")
    p.add_argument("--timm", action="append", metavar="PATTERN",
                   help="timm model name pattern, '*' for every architecture (repeatable; default: the ResNet "
                        "family and modern CNN families)")
    p.add_argument("--per-module", type=int, default=0, metavar="N",
                   help="at most N matching architectures of every timm module (alphabetical; 0: all)")
    p.add_argument("--no-torchvision", action="store_true", help="skip torchvision's models")
    p.add_argument("--limit", type=int, default=0, help="at most this many timm models per pattern (0: all)")
    p.add_argument("--size", type=int, default=64, help="input size (default 64; inception_v3 uses 299; a model "
                   "that refuses it runs at its own size)")
    p.add_argument("--max-params", type=float, default=100, metavar="MILLIONS",
                   help="models with more parameters are large: run at --large-size (default 100; 0: no limit)")
    p.add_argument("--large-size", type=int, default=32, help="input size of large models (default 32, or the "
                   "smallest the model accepts)")
    p.add_argument("--skip-large", action="store_true", help="skip large models instead (a 'skipped' row)")
    p.add_argument("--no-onnx", action="store_true", help="do not export the CLI's choice to ONNX")
    p.add_argument("--onnx", action="store_true", help=argparse_suppress())
    p.add_argument("--timeout", type=float, default=600, metavar="SECONDS",
                   help="time limit per model (default 600; 0: none); a model over it is a 'timeout' row")
    p.add_argument("--max-memory", type=float, default=None, metavar="GB",
                   help="run each model in its own process and stop it above this resident size: a 'memory' row, "
                        "and the run goes on (default: 85%% of this machine's memory; 0: no guard, one process)")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows already in the report (-o) and run only the models not there yet "
                        "('skipped' rows are run again unless --skip-large is given)")
    p.add_argument("--retry", default="", metavar="STATUS,...",
                   help="with --resume: run again the rows of these statuses (e.g. refused,timeout) or whose "
                        "preset column has this status (e.g. cp-lrp-conserving:refused); they stay in the report, "
                        "marked queued, until rerun, and a stopped retry goes on with its queue on --resume")
    p.add_argument("--rules", help=argparse_suppress())
    p.add_argument("-o", "--output", default="results/coverage.md", help="report path (default results/coverage.md)")
    p.set_defaults(func=run)


def argparse_suppress():
    import argparse
    return argparse.SUPPRESS


def planned_models(args) -> list[tuple[str, str]]:
    from .. import coverage as cov

    todo = [] if args.no_torchvision else [("torchvision", n) for n in cov.torchvision_all()]
    names = cov.timm_models(args.timm or cov.TIMM_DEFAULT, per_module=args.per_module, limit=args.limit)
    return todo + [("timm", n) for n in names]


def run(args) -> int:
    import os
    import shutil
    import sys
    import tempfile
    import time
    import warnings

    from .. import coverage as cov

    warnings.filterwarnings("ignore")
    if args.max_memory is None:
        args.max_memory = cov.default_memory_limit()
    if args.rules:
        print("graphlrp coverage: --rules is ignored: every model runs with the CLI's choice, "
              "otsuki2024-conserving and cp-lrp-conserving", file=sys.stderr)
    todo = planned_models(args)
    rows = cov.read_rows(args.output) if args.resume else []
    try:
        again, again_columns = cov.retry_selection(args.retry)
    except ValueError as e:
        print(f"graphlrp coverage: {e}", file=sys.stderr)
        return 2
    again |= set() if args.skip_large else {"skipped"}
    planned = set(todo)  # rows of models outside this run's list (--no-torchvision, other patterns) are kept as they are
    if args.resume and not rows and os.path.exists(args.output):
        print(f"graphlrp coverage: {args.output} holds no resumable rows; starting from the beginning",
              file=sys.stderr)
    # Rows to run again stay in the report, marked queued, until their new result replaces them: a stopped run
    # loses nothing, and resuming it goes on with its queue rather than selecting again (rows it already ran
    # would match once more).
    stopped_queue = [r for r in rows if r.queued and (r.source, r.name) in planned]
    if stopped_queue:
        print(f"graphlrp coverage: going on with the retry a stopped run left: {len(stopped_queue)} rows queued"
              + (f" (--retry {args.retry} is not applied again until they are done)" if args.retry else ""),
              file=sys.stderr)
    else:
        for r in rows:
            r.queued = (r.source, r.name) in planned and cov.to_retry(r, again, again_columns)
    done = {(r.source, r.name) for r in rows if not r.queued}
    command = "graphlrp coverage " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["coverage"] else "graphlrp coverage"
    tmp = tempfile.mkdtemp()
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)

    def write_report():  # rewritten as it goes: a long run leaves a usable partial report
        with open(args.output, "w") as f:
            f.write(cov.report(rows, command, todo))

    left = [key for key in todo if key not in done]
    if args.resume:
        print(f"resuming: {len(todo) - len(left)} of {len(todo)} planned models already in {args.output}",
              file=sys.stderr)
    limit = args.max_memory * 2**30 if args.max_memory else 0
    try:
        for i, (source, name) in enumerate(left):
            t = time.time()
            if limit and cov.can_isolate():
                row = cov.isolated(_check_one, (source, name, args, tmp), cov.Row(source, name, args.size),
                                   limit, args.timeout)
            else:
                row = _check_one(source, name, args, tmp)
            row.seconds, row.code = time.time() - t, cov.code_version()
            rows = [r for r in rows if (r.source, r.name) != (source, name)] + [row]  # replaces a queued row
            print(f"[{i + 1}/{len(left)}] {source}:{name} {row.status} {row.error}", file=sys.stderr, flush=True)
            write_report()
    finally:  # the exported files of the last model, and the folder, whether the run ends or is stopped
        shutil.rmtree(tmp, ignore_errors=True)
    write_report()
    counts = {s: sum(r.status == s for r in rows) for s in cov.ROW_STATUSES}
    others = ", ".join(f"{v} {k}" for k, v in counts.items() if v and k != "ok")
    print(f"{counts['ok']} of {len(rows)} models ok{f' ({others})' if others else ''}; report: {args.output}")
    return 0


def _check_one(source: str, name: str, args, tmp: str):
    """Build one model and run the coverage check on it (`coverage.check_model`); a Row whatever happens."""
    import gc
    import warnings

    import torch

    from .. import coverage as cov

    warnings.filterwarnings("ignore")
    size = cov.SIZES.get(name, args.size)
    row = cov.Row(source, name, size)
    millions = cov.known_params(source, name)
    if args.skip_large and args.max_params and millions is not None and millions > args.max_params:
        row.status, row.large, row.params = "skipped", True, millions
        row.error = f"{millions:.0f}M parameters, over --max-params {args.max_params:g}"
        return row
    model = None
    try:
        with cov.time_limit(args.timeout):
            try:
                torch.manual_seed(0)
                model = cov.build(source, name).eval()
            except Exception as e:
                row.status, row.error = "model-error", f"{type(e).__name__}: {cov._first_line(e)}"
            if model is not None:
                row.params = sum(p.numel() for p in model.parameters()) / 1e6
                row.large = bool(args.max_params) and row.params > args.max_params
                if row.large:
                    row.error = f"{row.params:.0f}M parameters, over --max-params {args.max_params:g}"
                if row.large and args.skip_large:
                    row.status = "skipped"
                else:
                    row.size = args.large_size if row.large else row.size
                    if not cov.accepts(model, row.size):  # a fixed image size: rebuilt for this one?
                        del model
                        torch.manual_seed(0)
                        model, note = cov.build_for_size(source, name, row.size)
                        row.size = getattr(model, "coverage_size", row.size)
                        row.error = "; ".join(filter(None, [row.error, note]))
                    cov.settle_batchnorm(model)
                    cov.check_model(model, row.size, source, name, None if args.no_onnx else tmp, row)
    except cov.ModelTimeout as e:
        row.status = "timeout"
        row.error = "; ".join(filter(None, [row.error, str(e)]))
    except Exception as e:  # the check itself failed: a row, not the end of the run
        row.status = "CRASH"
        row.error = "; ".join(filter(None, [row.error, cov._crash(e)]))
    del model
    gc.collect()
    return row
