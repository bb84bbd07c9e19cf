"""`graphlrp coverage`: compile torchvision's classification CNNs and a list of timm models; write a report."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("coverage", help="compile a zoo of CNNs and report which explainers are exact",
                       description="Compile every torchvision classification CNN and timm models matching the "
                                   "patterns (random weights), and write a markdown report.")
    p.add_argument("--timm", action="append", metavar="PATTERN",
                   help="timm model name pattern (repeatable; default: the ResNet family and modern CNN families)")
    p.add_argument("--no-torchvision", action="store_true", help="skip torchvision's models")
    p.add_argument("--limit", type=int, default=0, help="at most this many timm models per pattern (0: all)")
    p.add_argument("--size", type=int, default=64, help="input size (default 64; inception_v3 uses 299)")
    p.add_argument("--rules", default="otsuki2024-conserving", help="preset (default otsuki2024-conserving)")
    p.add_argument("--max-params", type=float, default=0, metavar="MILLIONS",
                   help="skip models with more parameters (torchvision: from the weights' metadata; 0: no limit)")
    p.add_argument("--onnx", action="store_true", help="also export each explainer and check onnxruntime parity")
    p.add_argument("-o", "--output", default="results/coverage.md", help="report path (default results/coverage.md)")
    p.set_defaults(func=run)


def run(args) -> int:
    import os
    import sys
    import tempfile
    import warnings

    import torch

    from .. import coverage as cov

    warnings.filterwarnings("ignore")
    todo = [] if args.no_torchvision else [("torchvision", n) for n in cov.torchvision_models()]
    seen = set()
    for pattern in args.timm or cov.TIMM_DEFAULT:
        names = [n for n in cov.timm_models([pattern]) if n not in seen]
        names = names[:args.limit] if args.limit else names
        seen.update(names)
        todo += [("timm", n) for n in names]
    results = []
    tmp = tempfile.mkdtemp()

    def write_report():  # rewritten as it goes: a long run leaves a usable partial report
        with open(args.output, "w") as f:
            f.write(cov.markdown(results, "graphlrp coverage " + " ".join(sys.argv[2:]), args.rules, len(todo)))

    for i, (source, name) in enumerate(todo):
        size = cov.SIZES.get(name, args.size)
        millions = cov.known_params(source, name)
        if args.max_params and millions is not None and millions > args.max_params:
            results.append(cov.Result(source, name, size, "skipped", error=f"{millions:.0f}M parameters, over "
                                                                            f"--max-params {args.max_params:g}"))
            continue
        try:
            torch.manual_seed(0)
            model = cov.build(source, name).eval()
            cov.settle_batchnorm(model)
            count = sum(p.numel() for p in model.parameters()) / 1e6
            if args.max_params and count > args.max_params:
                results.append(cov.Result(source, name, size, "skipped", error=f"{count:.0f}M parameters, over "
                                                                                f"--max-params {args.max_params:g}"))
                continue
        except Exception as e:
            results.append(cov.Result(source, name, size, "model-error", error=f"{type(e).__name__}: {e}"[:200]))
            continue
        onnx = os.path.join(tmp, "m.onnx") if args.onnx else None
        r = cov.check(model, size, args.rules, onnx, source, name)
        results.append(r)
        print(f"[{i + 1}/{len(todo)}] {source}:{name} {r.status} {r.error}", file=sys.stderr, flush=True)
        del model
        write_report()
    write_report()  # also after models skipped at the end of the list
    ok = sum(r.status == "ok" for r in results)
    print(f"{ok} of {len(results)} models ok; report: {args.output}")
    return 0
