"""`graphlrp compile MODEL -o OUT.onnx`: build the explainer, export it, check it in onnxruntime."""
from __future__ import annotations

import argparse
import gc
import sys
import time
import warnings

from ..preprocessing import INTERPOLATIONS
from ._types import floats, positive_int


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number such as 0.875, got {text!r}") from None
    if not 0 < value <= 4:
        raise argparse.ArgumentTypeError(f"crop fraction must be in (0, 4], got {text}")
    return value


def register(sub) -> None:
    p = sub.add_parser("compile", help="compile a CNN or transformer into an ONNX LRP explainer (needs the compile extra)",
                       description="Trace MODEL, rewrite it into an LRP explainer and export it to ONNX. "
                                   "Defaults to the paper's method (otsuki2024: ratio split, identity included), "
                                   "and to cp-lrp for vision transformers.")
    p.add_argument("model", help="torchvision name (resnet50, ...), timm:NAME, or path/to/file.py:factory")
    p.add_argument("-o", "--output", required=True, help="where to write the .onnx file")
    p.add_argument("--weights", default="DEFAULT",
                   help="DEFAULT (pretrained; needs network or cache), none (random), or PATH (.pt/.pth/.safetensors)")
    p.add_argument("--rules", default=None, help="preset name or path to a preset .toml (default: otsuki2024, or "
                   "cp-lrp for models with attention)")
    p.add_argument("--split", choices=["ratio", "symmetric", "signed"], help="relevance split at merges "
                   "(default: the preset's)")
    p.add_argument("--no-identity", action="store_true", help="identity skips receive no relevance")
    p.add_argument("--input-size", help="H or H,W (default: the model's, 224 for ImageNet models)")
    g = p.add_argument_group("preprocessing", "how images become the model's input, stored in the file and applied "
                             "by `explain`/`serve`. Default: the model's own (torchvision weights' transforms, timm's "
                             "pretrained_cfg, attributes of a user's model), else resize to ⌊size / 0.875⌋ and "
                             "centre-crop, ImageNet mean/std")
    g.add_argument("--resize", type=positive_int, metavar="PIXELS", help="shorter side before the centre crop")
    g.add_argument("--crop-pct", type=_fraction, metavar="F", help="crop fraction: resize to ⌊size / F⌋ first "
                   "(ignored when --resize is given)")
    g.add_argument("--interpolation", choices=INTERPOLATIONS, help="resampling filter of the resize")
    g.add_argument("--mean", type=floats, metavar="M,M,M", help="normalisation mean per channel, on [0, 1] pixels")
    g.add_argument("--std", type=floats, metavar="S,S,S", help="normalisation std per channel")
    g.add_argument("--labels", metavar="FILE", help="class names, one per line in class order (stored in the file; "
                   "`explain` and `serve` print them)")
    p.add_argument("--allow-vanishing", action="store_true",
                   help="write the explainer even where the relevance of a non-conserving preset vanishes between "
                        "output and input (always so with random weights: --weights none, or a factory's own), where "
                        "relevance often vanishes); a warning says where")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32",
                   help="fp16: every weight and tensor of the graph in float16, input and outputs float32 (half the "
                        "file, for GPUs); the check states its distance to the float32 explainer and its conservation "
                        "instead of asking for parity")
    p.set_defaults(func=run)


def parse_size(text: str | None, default):
    from ..errors import GraphLRPError

    if not text:
        return tuple(default)
    try:
        parts = [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError as e:
        raise GraphLRPError(f"--input-size takes H or H,W, got {text!r}") from e
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 8:
        raise GraphLRPError(f"--input-size takes H or H,W (>= 8), got {text!r}")
    return tuple(parts)


def default_preset(model) -> str:
    """cp-lrp for a model with attention (LXT's choice for ViTs), else the paper's otsuki2024."""
    import torch

    attention = any(isinstance(m, torch.nn.MultiheadAttention) or "Attention" in type(m).__name__
                    for m in model.modules())
    return "cp-lrp" if attention else "otsuki2024"


def run(args) -> int:
    import torch

    import graphlrp
    from ..memory import return_large_blocks_to_the_system
    from ..models import at_input_size, load_model
    from ..preprocessing import read_labels

    return_large_blocks_to_the_system()  # this process is graphlrp's: its freed tensors go back to the system
    t0 = time.perf_counter()
    labels = read_labels(args.labels) if args.labels else None  # a bad file fails before the slow work
    model, info = load_model(args.model, args.weights)
    h, w = parse_size(args.input_size, info.input_size)
    built = model
    model = at_input_size(model, args.model, info, h, w)  # a ViT of random weights built for another size
    resized = model is not built
    del built
    example = torch.randn(1, info.channels, h, w)
    rules = args.rules or default_preset(model)
    options = dict(split=args.split, include_identity=False if args.no_identity else None, model_name=info.name,
                   preprocessing=info.preprocessing, resize=args.resize, crop_pct=args.crop_pct,
                   interpolation=args.interpolation, mean=args.mean, std=args.std,
                   labels=labels if labels is not None else info.labels,
                   # random weights (--weights none, or a factory's own): relevance often vanishes; say so, write
                   allow_vanishing=args.allow_vanishing or info.weights == "none",
                   # this explainer is only exported: W⁺, W⁻, |W| computed from W, not held beside it (the file is
                   # the same; 0.8 GB less at the onnxruntime check for a 100 M-parameter CNN)
                   derived_weights="computed")
    with warnings.catch_warnings():  # vanishing or grown relevance is printed below, in the command's own words
        warnings.filterwarnings("ignore", message="preset .*: the relevance (vanishes|grows)")
        warnings.filterwarnings("ignore", message="preset .*: relevance of both signs grows")
        warnings.filterwarnings("ignore", message="preset .*: the relevance put on the output is 0")
        try:
            explainer = graphlrp.compile(model, example, rules=rules, **options)
        except (graphlrp.PresetError, graphlrp.UnsupportedOpError, graphlrp.ConservationError) as e:
            if args.rules:
                raise
            raise type(e)(f"{e}\n{_other_presets(model, example, rules, options)}") from e
    del model  # the explainer holds its own copy; the export's peak memory need not hold this one too
    gc.collect()
    t1 = time.perf_counter()
    merges = explainer.merges
    kinds = {k: sum(m.skip_kind == k for m in merges) for k in ("identity", "projection", "other")}
    image_prep = explainer.preprocessing
    print(f"model     {info.name} (weights: {info.weights}{f', built for {h}x{w}' if resized else ''})")
    print(f"merges    {len(merges)} found: " + ", ".join(f"{v} {k}" for k, v in kinds.items()))
    print(f"preset    {explainer.info['preset']}, split {explainer.info['split']}, "
          f"include_identity {explainer.info['include_identity']}, output relevance {explainer.info['output_relevance']}")
    resize = f"resize {image_prep.resize} ({image_prep.interpolation}), " if image_prep.resize else ""
    print(f"images    {resize}{image_prep.crop_mode} crop {image_prep.crop[0]}x{image_prep.crop[1]}, "
          f"mean {_short(image_prep.mean)}, std {_short(image_prep.std)} [{image_prep.source}]"
          + (f", {len(explainer.labels)} labels" if explainer.labels else ""))
    if explainer.certificate is not None:
        cert = explainer.certificate
        print(f"checked   {cert.summary()} ({cert.seconds:.1f} s)")
        for warning in (cert.vanished, cert.grown):
            if warning:
                print(f"warning   {warning}", file=sys.stderr)
    with warnings.catch_warnings():  # the zero-relevance warning is printed below, in the command's own words
        warnings.filterwarnings("ignore", message="the relevance is 0 everywhere")
        report = explainer.export_onnx(args.output, opset=args.opset, metadata={"source_model": info.name},
                                       precision=args.precision)
    t2 = time.perf_counter()
    if report.fp16 is not None:
        f = report.fp16
        print(f"fp16      vs the float32 explainer: relevance {f['relevance_vs_fp32']:.1e}, logits "
              f"{f['logits_vs_fp32']:.1e} (max relative difference); ΣR_in / R_out "
              f"{_short(f['conservation_fp16'])} (float32: {_short(f['conservation_fp32'])})")
    else:
        print(f"parity    {report.parity_summary()}")
    if report.zero_relevance:
        from ..export import ZERO_RELEVANCE_WARNING

        cert = explainer.certificate
        why = "; the warning above says why" if cert is not None and cert.vanished else ""
        print(f"warning   {ZERO_RELEVANCE_WARNING}{why}", file=sys.stderr)
    print(f"wrote     {report.path} ({report.size_bytes / 2**20:.1f} MiB, opset {report.opset})")
    print(f"time      {t2 - t0:.1f} s (compile {t1 - t0:.1f} s, export + check {t2 - t1:.1f} s)")
    return 0


def _other_presets(model, example, refused: str, options: dict) -> str:
    """Which shipped preset takes the model the default preset refused: its own family's first (otsuki2024 →
    otsuki2024-conserving), then the others, each tried without export until one compiles and passes its check."""
    import graphlrp
    from ..presets import available_presets

    family = refused.split("-")[0]
    candidates = sorted((n for n in available_presets() if n != refused), key=lambda n: (not n.startswith(family), n))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in candidates:
            try:
                graphlrp.compile(model, example, rules=name, **options)
            except graphlrp.GraphLRPError:
                continue
            return f"the default preset {refused!r} cannot take this model; {name!r} can: --rules {name}"
    return f"no shipped preset takes this model (tried {', '.join(candidates)})"


def _short(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"
