"""How far a float32 explainer is from the same graph run in float64: the rounding an export parity check meets.

    python tools/conditioning.py swin_t --rules attnlrp [--size 224] [--onnx] [--seed 0]

Random weights (torch.manual_seed(--seed); a classification head torchvision initialises to zeros, as ViT's, is
drawn with std 0.02 after torch.manual_seed(1), as acceptance/vit.py draws it); the explainer is compiled once in float32 and its graph is then run in float32 and in
float64 on export's parity batch (two images, the predicted class and a fixed one). Prints, per image,
max |R_float32 − R_float64| / max |R_float64|, the same for float64 runs with simulated float32 rounding (the
export check's allowance, graphlrp.export.expected_float32_error), and with --onnx for the exported file in
onnxruntime.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import warnings


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a torchvision model name")
    p.add_argument("--rules", default="attnlrp")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--onnx", action="store_true", help="also export (without the parity check) and run onnxruntime")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch
    import torchvision

    import graphlrp
    from graphlrp import export

    torch.manual_seed(args.seed)
    model = torchvision.models.get_model(args.model, weights=None).eval()
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    if not head.weight.any():  # every logit 0: nothing to explain
        torch.manual_seed(1)
        torch.nn.init.normal_(head.weight, std=0.02)
    explainer = graphlrp.compile(model, torch.randn(1, 3, args.size, args.size), rules=args.rules)
    x, target = export._parity_batch(explainer)
    with torch.no_grad():
        _, relevance = explainer(x, target)
    exact_logits, exact = export._float64_run(explainer, x, target)
    runs = {"PyTorch float32": relevance.numpy()}
    if args.onnx:
        import onnxruntime as ort

        path = os.path.join(tempfile.mkdtemp(), "explainer.onnx")
        explainer.export_onnx(path, check=False)
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        runs["onnxruntime float32"] = session.run(["relevance"], {"input": x.numpy(), "target": target.numpy()})[0]
    print(f"{args.model} at {args.size}², {args.rules}, weights seed {args.seed}: max |R - R_float64| / max |R_float64| per image "
          f"(targets {target.tolist()})")
    resolved = torch.where(target < 0, torch.as_tensor(exact_logits).argmax(1), target)
    for seed in range(export.ROUNDING_SAMPLES):
        runs[f"float64, float32 rounding simulated (seed {seed})"] = export._float64_run(explainer, x, resolved, seed)[1]
    for name, r in runs.items():
        print(f"  {name}: " + ", ".join(f"{export.rel_diff(r[i], exact[i]):.1e}" for i in range(len(r))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
