"""The insertion/deletion protocol, as the authors' released code computes it.

An attribution is reduced to one value per pixel (channel sum; coarser maps such as Grad-CAM's upsampled
bilinearly). Pixels are ranked by that value. A curve has ceil(H·W / step) points; point k (k = 0, 1, ...) takes the
value at rank min(step·(k+1), H·W−1) as a threshold and keeps every pixel whose value is >= it, so pixels tied at a
threshold always move together (this is what makes 8-level heat quantization change the score). Insertion shows the
kept pixels on a black image (0 in [0, 1] RGB, then normalised); deletion blacks them out. Each point is the softmax
probability of the ground-truth class; the score is the trapezoid area with the x axis scaled to [0, 1], and
ID = insertion − deletion.

Most of the cost is the model calls, so `InsertionDeletion` runs each distinct masked image once per image — across
steps and across methods — through onnxruntime where the model exports.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

HEAT_LEVELS = 8


def default_step(height: int, width: int, points: int = 100) -> int:
    """The step that gives about `points` points per curve: 10 px for 32×32, 502 px for 224×224."""
    return max(1, round(height * width / points))


def curve_length(num_pixels: int, step: int) -> int:
    return math.ceil(num_pixels / step)


def pixel_maps(attr: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[N, C, h, w] or [N, h, w] attributions -> [N, H, W] per-pixel scores used for ranking.

    Non-finite values become 0 so that a degenerate map ranks as ties instead of breaking the sort.
    """
    maps = attr.detach().float().cpu()
    if maps.dim() == 4:
        maps = maps.sum(1)
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    return torch.nan_to_num(maps, nan=0.0, posinf=0.0, neginf=0.0)


def quantize(maps: torch.Tensor, levels: int = HEAT_LEVELS) -> torch.Tensor:
    """Heat quantization per map: `levels` equally spaced values from min to max; each value is floored to the
    largest of them not above it (the max keeps its own level). Leaves at most `levels` distinct values."""
    flat = maps.flatten(1).double()
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    edges = lo + (hi - lo) * torch.linspace(0, 1, levels, dtype=torch.float64)[None]
    edges[:, -1:] = hi
    idx = (torch.searchsorted(edges, flat, right=True) - 1).clamp(0, levels - 1)
    return edges.gather(1, idx).to(maps.dtype).view_as(maps)


def insertion_masks(pixel_map: torch.Tensor, step: int) -> torch.Tensor:
    """Boolean [K, H·W]: which pixels are shown at each insertion point (deletion hides the same pixels)."""
    flat = pixel_map.flatten()
    ranked = flat.sort(descending=True).values
    n = flat.numel()
    ranks = (torch.arange(1, curve_length(n, step) + 1) * step).clamp(max=n - 1)
    return flat[None, :] >= ranked[ranks][:, None]


def auc(curves: np.ndarray) -> np.ndarray:
    """Trapezoid area under curves sampled at evenly spaced x in [0, 1] (last axis)."""
    curves = np.asarray(curves, dtype=np.float64)
    if curves.shape[-1] < 2:
        return curves[..., 0]
    return (curves.sum(-1) - curves[..., 0] / 2 - curves[..., -1] / 2) / (curves.shape[-1] - 1)


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n))."""
    values = np.asarray(values, dtype=np.float64)
    se = values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return float(values.mean()), float(se)


def fast_logits(model: torch.nn.Module, example: torch.Tensor, threads: int | None = None
                ) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """A faster stand-in for `model(x)` for the metric's many forward passes, and its name for the report.

    onnxruntime (a graphlrp dependency) runs these small-batch CNN forwards about 1.6× faster than PyTorch eager on
    CPU; the export is checked against the model on `example` and dropped if it disagrees. Otherwise, a torch.fx
    copy with BatchNorm folded into the convolutions in channels-last memory; otherwise the model itself.
    `threads` caps onnxruntime's intra-op threads (default: onnxruntime's choice).
    """
    with torch.inference_mode():
        expected = model(example)
    try:
        import onnxruntime

        from ..export import forward_onnx

        proto = forward_onnx(model, example)  # graphlrp's own fx → ONNX lowering of the model's forward
        options = onnxruntime.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # spinning hurts on shared cores
        if threads:
            options.intra_op_num_threads = threads
        session = onnxruntime.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])

        def run(x):
            return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])

        if torch.allclose(run(example), expected, rtol=1e-3, atol=1e-4):
            return run, f"onnxruntime {onnxruntime.__version__}"
    except Exception:  # no exporter for some op of the user's model: PyTorch below is still correct
        pass
    from torch.fx.experimental.optimization import fuse

    try:
        fused = fuse(model).to(memory_format=torch.channels_last)
    except Exception:  # untraceable by torch.fx
        return model, "PyTorch"
    return (lambda x: fused(x.contiguous(memory_format=torch.channels_last))), "PyTorch, BatchNorm folded"


class InsertionDeletion:
    """Insertion and deletion curves of many attribution maps on the same images. `example`: a few normalised
    images to check the fast forward path against the model."""

    def __init__(self, model: torch.nn.Module, example: torch.Tensor, mean, std, step: int, batch_size: int = 256,
                 threads: int | None = None):
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.step = step
        self.batch_size = batch_size
        self.model_calls = 0
        self.logits, self.backend = fast_logits(model.eval(), example, threads)

    def curves(self, images: torch.Tensor, labels: torch.Tensor, maps: dict[str, torch.Tensor]
               ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """images: [n, C, H, W] in [0, 1]; labels: [n]; maps: name -> [n, H, W] pixel maps.
        Returns name -> (insertion [n, K], deletion [n, K]) probabilities of the labelled class."""
        n, _, h, w = images.shape
        names = list(maps)
        k = curve_length(h * w, self.step)
        owners, kept, inverses = [], [], []
        for i in range(n):
            shown = [insertion_masks(maps[name][i], self.step) for name in names]
            rows = torch.cat([m for s in shown for m in (s, ~s)])  # per method: K insertion rows, K deletion rows
            uniq, inverse = np.unique(np.packbits(rows.numpy(), axis=1), axis=0, return_inverse=True)
            kept.append(torch.from_numpy(np.unpackbits(uniq, axis=1, count=h * w).astype(bool)))
            owners.append(torch.full((len(uniq),), i))
            inverses.append(inverse.reshape(-1))
        probs = self._probabilities(images, labels, torch.cat(owners), torch.cat(kept).view(-1, 1, h, w))
        out = {name: (np.empty((n, k)), np.empty((n, k))) for name in names}
        offset = 0
        for i in range(n):
            per_image = probs[offset + inverses[i]].reshape(len(names), 2, k)
            offset += len(kept[i])
            for j, name in enumerate(names):
                out[name][0][i], out[name][1][i] = per_image[j, 0], per_image[j, 1]
        return out

    @torch.inference_mode()
    def _probabilities(self, images, labels, owners, kept) -> np.ndarray:
        probs = []
        for start in range(0, len(owners), self.batch_size):
            idx = owners[start:start + self.batch_size]
            x = (images[idx] * kept[start:start + self.batch_size] - self.mean) / self.std
            logits = self.logits(x)
            probs.append(logits.float().softmax(-1).gather(1, labels[idx][:, None])[:, 0])
            self.model_calls += len(idx)
        return torch.cat(probs).numpy().astype(np.float64)
