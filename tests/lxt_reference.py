"""LXT (`lxt` on PyPI, the AttnLRP authors' package) as a reference, run the way its documentation runs it.

Efficient mode (what LXT ships for torchvision's VisionTransformer): LXT monkey-patches `nn.GELU` (identity rule),
`nn.LayerNorm` (normaliser detached) and `nn.MultiheadAttention` (queries and keys detached: CP-LRP), and patches
Zennit's hooks so that Zennit's rules on `nn.Linear` / `nn.Conv2d` work in its Gradient×Input framework; the
relevance is input × gradient. The patches replace class attributes process-wide, so `lxt_vit_patches` restores
every attribute it touched when it exits.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

lxt = __import__("pytest").importorskip("lxt", reason="the LXT reference needs `pip install lxt 'transformers<5'`")


@contextlib.contextmanager
def lxt_vit_patches():
    from lxt.efficient import monkey_patch, monkey_patch_zennit
    from torchvision.models import vision_transformer
    from zennit.core import BasicHook

    touched = [(cls, name) for cls in (nn.GELU, nn.LayerNorm, nn.MultiheadAttention)
               for name in ("forward", "original_forward")] + [(BasicHook, "forward"), (BasicHook, "backward")]
    saved = {(cls, name): cls.__dict__[name] for cls, name in touched if name in cls.__dict__}
    monkey_patch(vision_transformer)
    monkey_patch_zennit()
    try:
        yield
    finally:
        for cls, name in touched:
            if (cls, name) in saved:
                setattr(cls, name, saved[(cls, name)])
            elif name in cls.__dict__:
                delattr(cls, name)


def lxt_cp_lrp(model: nn.Module, x: torch.Tensor, target: torch.Tensor, epsilon: float = 1e-6):
    """(logits, relevance) from LXT's torchvision-ViT patches with Zennit's ε-rule on linear and conv layers:
    relevance = x ⊙ ∂(logit of each sample's target)/∂x."""
    from zennit.composites import LayerMapComposite
    from zennit.rules import Epsilon

    composite = LayerMapComposite([(nn.Conv2d, Epsilon(epsilon)), (nn.Linear, Epsilon(epsilon))])
    x = x.detach().clone().requires_grad_(True)
    with lxt_vit_patches(), composite.context(model) as hooked:
        logits = hooked(x)
        logits.gather(1, target.view(-1, 1)).sum().backward()
    return logits.detach(), (x * x.grad).detach()
