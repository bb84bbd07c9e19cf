"""Resolve a model spec (torchvision name, `timm:NAME`, `path/to/file.py:factory`) and its weights.

Used by every command that takes MODEL. Nothing here downloads silently forever: a failed download is a
`WeightsError` that points to `--weights none` / `--weights PATH`.
"""
from __future__ import annotations

import difflib
import importlib.util
import os
import pickle
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import preprocessing as prep
from .errors import ModelSpecError, WeightsError
from .preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing  # noqa: F401 (re-exported)
from .preprocessing import default as default_preprocessing

@dataclass
class ModelInfo:
    """What the explainer's metadata needs to know about the model besides its graph."""

    name: str
    preprocessing: Preprocessing = field(default_factory=default_preprocessing)
    channels: int = 3
    labels: list[str] | None = None
    weights: str = "none"
    extra: dict = field(default_factory=dict)

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.preprocessing.crop)

    @property
    def mean(self) -> tuple[float, ...]:
        return self.preprocessing.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.preprocessing.std


def _timm_has(name: str) -> bool:
    """Whether timm (if installed) knows `name`: a torchvision miss is often a timm model typed without `timm:`."""
    try:
        import timm
    except ImportError:
        return False
    return name in timm.list_models()


def _torchvision_model_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _load_factory(spec: str):
    path, _, factory = spec.rpartition(":")
    file = Path(path)
    if not file.is_file():
        raise ModelSpecError(f"model file not found: {path}")
    mod_name = f"graphlrp_user_model_{abs(hash(str(file.resolve())))}"
    spec_obj = importlib.util.spec_from_file_location(mod_name, file)
    module = importlib.util.module_from_spec(spec_obj)
    sys.modules[mod_name] = module
    try:
        spec_obj.loader.exec_module(module)
    except Exception as e:  # the user's file failed to import: say where
        raise ModelSpecError(f"could not import {path}: {type(e).__name__}: {e}") from e
    fn = getattr(module, factory, None)
    if fn is None or not callable(fn):
        raise ModelSpecError(f"{path} has no callable named {factory!r}")
    return fn


def state_dict_from_file(path: str | os.PathLike) -> dict:
    """Read a state dict from .pt/.pth (weights_only) or .safetensors; unwrap `state_dict`/`model` and `module.`."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL ([\w.]+)", str(e))
        if refused is None:  # torch's reason is its unpickler's line, not its advice to drop weights_only
            reason = re.search(r"WeightsUnpickler error: ([^\n]+)", str(e))
            raise WeightsError(f"could not read weights from {path} (a .pt/.pth written by torch.save, or a "
                               f".safetensors file): {reason.group(1) if reason else 'not a weights file'}") from e
        # torch.save(model) pickles the model's classes: unpickling them would run the file's code
        raise WeightsError(
            f"{path} holds pickled Python objects ({refused.group(1)}, for one), not only tensors: a whole model saved "
            "with torch.save(model) is one. graphlrp loads weights with weights_only=True, so that a weights file "
            "cannot run code. Save the state dict instead (torch.save(model.state_dict(), PATH)), or build the "
            "model in a file.py:factory that loads it."
        ) from e
    except Exception as e:
        raise WeightsError(f"could not read weights from {path} (a .pt/.pth written by torch.save, or a "
                           f".safetensors file): {type(e).__name__}: {_first_line(e)}") from e
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_state_dict_into(model: torch.nn.Module, path: str | os.PathLike) -> None:
    sd = state_dict_from_file(path)
    try:
        model.load_state_dict(sd, strict=True)  # torch decides (it fills in what old versions lacked, e.g. BN counts)
    except RuntimeError as e:
        said = state_dict_mismatch(model.state_dict(), sd) or _first_line(e)
        raise WeightsError(f"weights in {path} do not fit the model: {said}") from e


def state_dict_mismatch(expected: dict, given: dict, shown: int = 3) -> str:
    """What keeps `given` from loading where `expected` is: counts of keys each side lacks and of shapes that
    differ, a few of each by name ("" when they fit). torch's own message lists every key, hundreds for a
    different architecture."""
    def few(names):
        names = sorted(names)
        more = f", … {len(names) - shown} more" if len(names) > shown else ""
        return ", ".join(names[:shown]) + more

    missing = expected.keys() - given.keys()
    unexpected = given.keys() - expected.keys()
    shapes = [f"{k}: file {list(given[k].shape)}, model {list(expected[k].shape)}"
              for k in sorted(expected.keys() & given.keys()) if given[k].shape != expected[k].shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors the model has are not in the file ({few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} tensors in the file are not in the model ({few(unexpected)})")
    if shapes:
        more = f"; … {len(shapes) - shown} more" if len(shapes) > shown else ""
        parts.append(f"{len(shapes)} shapes differ ({'; '.join(shapes[:shown])}{more})")
    if not parts:
        return ""
    return "; ".join(parts) + ". Were they saved from another architecture, or with another number of classes?"


def _first_line(e: Exception) -> str:
    line = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    return re.sub(r"\x1b\[[0-9;]*m", "", line).strip()[:300]


def _download_error(name: str, e: Exception) -> WeightsError:
    return WeightsError(
        f"could not get pretrained weights for {name} ({type(e).__name__}: {str(e)[:200]}). "
        "With no network and nothing in the cache, use `--weights none` (random weights) "
        "or `--weights PATH` (a local state dict)."
    )


def torchvision_labels(name: str) -> list[str] | None:
    """The `categories` of torchvision model `name`'s DEFAULT weights' description (no download), or None."""
    import torchvision

    try:
        categories = torchvision.models.get_model_weights(name).DEFAULT.meta.get("categories")
    except (ValueError, KeyError, AttributeError):
        return None
    return [str(c) for c in categories] if categories else None


def timm_labels(model) -> list[str] | None:
    """ImageNet class names (timm's `ImageNetInfo` descriptions, e.g. "tench, Tinca tinca") for a timm model whose
    class count is one of ImageNet's subsets (1k, 21k, ...; timm's `infer_imagenet_subset`), else None."""
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset
    except ImportError:  # an older timm
        return None
    subset = infer_imagenet_subset(model)
    if not subset:
        return None
    try:
        return [str(d) for d in ImageNetInfo(subset).label_descriptions()]
    except (OSError, ValueError, KeyError):  # a subset whose class-name files this timm does not ship
        return None


def load_model(spec: str, weights: str = "DEFAULT") -> tuple[torch.nn.Module, ModelInfo]:
    """Build the model named by `spec` in eval mode. weights: "DEFAULT" (pretrained), "none" or a file path.
    Random weights are drawn from a fixed seed (the caller's random state is left as it was), so the same command
    builds the same model, and its compile and export checks give the same verdict, on every run."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return _load_model(spec, weights)


def _load_model(spec: str, weights: str) -> tuple[torch.nn.Module, ModelInfo]:
    weights = weights or "none"
    use_pretrained = weights.upper() == "DEFAULT"
    use_file = not use_pretrained and weights.lower() != "none"
    if ".py:" in spec or spec.endswith(".py"):
        if ":" not in spec or spec.endswith(".py"):
            raise ModelSpecError(f"give the factory function too: {spec}:FACTORY")
        model = _load_factory(spec)()
        info = ModelInfo(name=spec)
        # a user's own model has no pretrained registry: its factory decides its weights, its attributes (or a
        # timm-style pretrained_cfg) its preprocessing
        said = prep.from_model(model)
        if said is not None:
            info.preprocessing = said
        if getattr(model, "labels", None):
            info.labels = [str(v) for v in model.labels]
    elif spec.startswith("timm:"):
        try:
            import timm
        except ImportError as e:
            raise ModelSpecError("timm models need timm: pip install timm") from e
        name = spec[len("timm:"):]
        known = timm.list_models()
        if name not in known and name.split(".")[0] not in known:
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.75)
            hint = f" Did you mean one of: {', '.join('timm:' + n for n in close)}?" if close else ""
            raise ModelSpecError(f"timm has no model named {name!r}.{hint}")
        try:
            model = timm.create_model(name, pretrained=use_pretrained)
        except Exception as e:
            if use_pretrained:
                raise _download_error(spec, e) from e
            raise ModelSpecError(f"timm could not build {name}: {e}") from e
        info = ModelInfo(name=spec, preprocessing=prep.from_model(model) or default_preprocessing(),
                         labels=timm_labels(model))
        info.channels = int((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3,))[0])
    else:
        import torchvision

        names = _torchvision_model_names()
        if spec not in names:
            close = [n for n in names if spec.lower() in n][:8]
            hint = f" Did you mean one of: {', '.join(close)}?" if close else ""
            if not close and _timm_has(spec):
                hint = f" timm has it: timm:{spec}"
            raise ModelSpecError(
                f"unknown model {spec!r}: not a torchvision classification model, `timm:NAME` or `file.py:factory`.{hint}"
            )
        # the weights' own eval transforms: known from their description alone, also with --weights none/PATH
        info = ModelInfo(name=spec, preprocessing=prep.from_torchvision(spec) or default_preprocessing())
        tv_weights = None
        if use_pretrained:
            tv_weights = torchvision.models.get_model_weights(spec).DEFAULT
        # the class names of the weights' description, for their class indices (also with --weights none or a
        # PATH, as for the preprocessing; a count that does not fit the model is dropped at compile)
        info.labels = torchvision_labels(spec)
        try:
            with warnings.catch_warnings():  # GoogLeNet/Inception's notice that its random init will change
                warnings.filterwarnings("ignore", category=FutureWarning, module="torchvision")
                model = torchvision.models.get_model(spec, weights=tv_weights)
        except Exception as e:
            if use_pretrained:
                raise _download_error(spec, e) from e
            raise
    if use_file:
        load_state_dict_into(model, weights)
        info.weights = str(weights)
    elif use_pretrained and not spec.endswith(".py") and ".py:" not in spec:
        info.weights = "DEFAULT"
    return model.eval(), info


def at_input_size(model: torch.nn.Module, spec: str, info: ModelInfo, height: int, width: int) -> torch.nn.Module:
    """`model`, or, where it does not run on a height×width input because its builder fixed the size (a ViT's
    position embeddings: torchvision's `image_size`, timm's `img_size`) and its weights are random, the same model
    built for that size. Trained weights fix the size: then a ModelSpecError says which sizes to use."""
    x = torch.randn(1, info.channels, height, width)
    try:
        with torch.no_grad():
            model(x)
        return model
    except Exception:  # noqa: BLE001 - the model's own complaint about the size; answered below
        pass
    own = tuple(info.input_size)
    fixed = isinstance(spec, str) and ".py" not in spec and height == width
    if not fixed:
        return model  # the trace names what fails
    if info.weights != "none":
        raise ModelSpecError(f"{spec} does not run on {height}x{width} inputs with these weights (their position "
                             f"embeddings fix the size); use --input-size {own[0]}, or --weights none to build it "
                             f"for {height}x{width}")
    try:
        with torch.random.fork_rng():  # the same random weights on every run, as load_model's
            torch.manual_seed(0)
            if spec.startswith("timm:"):
                import timm
                resized = timm.create_model(spec[len("timm:"):], pretrained=False, img_size=height)
            else:
                import torchvision
                resized = torchvision.models.get_model(spec, weights=None, image_size=height)
    except TypeError:  # its builder takes no size: keep the model; the trace names what fails
        return model
    except Exception as e:  # noqa: BLE001 - the builder refuses this size (a patch size that does not divide it)
        raise ModelSpecError(f"{spec} cannot be built for {height}x{width} inputs: {type(e).__name__}: {e}") from None
    try:
        with torch.no_grad():
            resized.eval()(x)
    except Exception as e:  # noqa: BLE001 - built for the size, and still refuses it: say why, in its words
        raise ModelSpecError(f"{spec} does not run on {height}x{width} inputs, also when built for that size: "
                             f"{type(e).__name__}: {e}") from None
    return resized
