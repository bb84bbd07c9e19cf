"""Coverage: compile every model of a list with three presets and report, per model, whether each explainer
reproduces the forward and conserves relevance, and whether the main job — `graphlrp compile NAME --weights none`,
the CLI's own preset choice exported to ONNX — works (`graphlrp coverage`, written to results/coverage.md).

Random weights (BatchNorm statistics set away from the identity, so BN is not trivially exact), small inputs,
batch 2 of different random inputs. Per model and preset (`check_model`): the CLI's choice (`default_preset`:
cp-lrp with attention, else otsuki2024; compiled with allow_vanishing=True as the CLI does with random weights),
`otsuki2024-conserving` and `cp-lrp-conserving`, each one of

    conserves   a conserving preset, forward within 1e-4 and |ΣR_in / R_out − 1| ≤ 1e-3 per sample
    ok          a non-conserving preset, forward within 1e-4 (ratio ΣR_in / R_out shown)
    refused     compile raised graphlrp's own error (GraphLRPError: the certificate's ConservationError, ...)
    WRONG       compiled, but the coverage's own measurement (independent of the certificate) is out of bounds
    CRASH       any other exception
    timeout     the model's time limit ran out here

and for the CLI choice the ONNX export with its onnxruntime parity and file size. Rows carry their data in a
comment block at the end of the report, so a run can be resumed (`read_rows`).

`check`, `Result` and `markdown` are the earlier single-preset check, kept for callers of the Python API.
"""
from __future__ import annotations

import fnmatch
import functools
import json
import math
import os
import signal
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn as nn

# the ResNet family and the main modern CNN families; each entry is a pattern over timm.list_models()
TIMM_DEFAULT = ["resnet*", "resnext*", "seresnet*", "seresnext*", "ecaresnet*", "skresnet*", "skresnext*", "resnest*",
                "res2net*", "res2next*", "cspresnet*", "cspresnext*", "resnetv2*", "resnetrs*", "regnet*",
                "nf_resnet*", "efficientnet_b*", "tf_efficientnet_b*", "mobilenetv2*", "mobilenetv3*", "mixnet*",
                "convnext*", "rexnet*", "ghostnet*", "dla*", "dpn*", "repvgg*", "hrnet*", "*vovnet*", "lcnet*",
                "gernet*", "cs3*", "xception*", "selecsls*", "fbnet*", "tinynet*", "densenet*", "mnasnet*",
                "inception_v3", "vgg*"]
SIZES = {"inception_v3": 299, "googlenet": 96}
NOT_CNN = ("vit", "swin", "maxvit", "deit", "beit", "levit", "mobilevit", "coat", "cait")


@dataclass
class Result:
    source: str
    name: str
    size: int
    status: str = "ok"  # ok | fail | model-error | skipped
    merges: dict = field(default_factory=dict)
    forward_diff: float | None = None
    conservation: float | None = None
    onnx_parity: float | None = None
    seconds: float = 0.0
    error: str = ""


def torchvision_models() -> list[str]:
    import torchvision
    names = torchvision.models.list_models(module=torchvision.models)
    return [n for n in names if not any(n.startswith(p) for p in NOT_CNN)]


def timm_models(patterns, per_module: int = 0, limit: int = 0, cnn_only: bool = False) -> list[str]:
    """timm models matching any of `patterns` (fnmatch), in pattern order; `limit`: at most K per pattern;
    `per_module`: at most N per timm module (`timm.list_modules()`, each module's models alphabetically), the
    result then in module order. `cnn_only` drops the transformer families (NOT_CNN), as the earlier CNN report."""
    import timm
    names = list(timm.list_models())
    chosen, seen = [], set()
    for p in patterns:
        matched = [n for n in names if fnmatch.fnmatchcase(n, p) and n not in seen]
        matched = matched[:limit] if limit else matched
        seen.update(matched)
        chosen += matched
    if cnn_only:
        chosen = [n for n in chosen if not any(n.startswith(p) for p in NOT_CNN)]
    if not per_module:
        return chosen
    wanted, out = set(chosen), []
    for module in sorted(timm.list_modules()):
        members = sorted(n for n in timm.list_models(module=module) if n in wanted)
        out += members[:per_module]
        wanted.difference_update(members)  # a name listed by two modules counts once
    return out


def torchvision_all() -> list[str]:
    """Every torchvision classification model, CNNs and transformers."""
    import torchvision
    return list(torchvision.models.list_models(module=torchvision.models))


def known_params(source: str, name: str) -> float | None:
    """Parameters in millions where known without building the model (torchvision's weight metadata)."""
    if source != "torchvision":
        return None
    try:
        import torchvision
        return torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"] / 1e6
    except Exception:
        return None


def build(source: str, name: str) -> nn.Module:
    if source == "torchvision":
        import torchvision
        kw = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
        return torchvision.models.get_model(name, weights=None, **kw)
    import timm
    return timm.create_model(name, pretrained=False)


def accepts(model: nn.Module, size: int) -> bool:
    """Whether the model runs on a size² input (one sample)."""
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, size, size))
        return True
    except Exception:
        return False


def build_for_size(source: str, name: str, size: int) -> tuple[nn.Module, str]:
    """The model built as `build` does; where it refuses size² (a transformer with a fixed image size), rebuilt
    for that size where its builder takes one (timm's img_size, torchvision ViT's image_size), or for the
    smallest multiple of a usual patch size (PATCH_MULTIPLES) above it where the size itself does not divide into
    patches (a 14-pixel patch: 42 for 32). Returns the model (eval mode) and a note saying so ("" when built as
    usual); a rebuilt model's `coverage_size` attribute is the size it takes."""
    model = build(source, name).eval()
    if accepts(model, size):
        return model, ""
    key = "img_size" if source == "timm" else "image_size"
    for candidate in nearby_sizes(size):
        try:
            if source == "timm":
                import timm
                resized = timm.create_model(name, pretrained=False, img_size=candidate).eval()
            else:
                import torchvision
                resized = torchvision.models.get_model(name, weights=None, image_size=candidate).eval()
        except Exception:
            return model, ""
        if accepts(resized, candidate):
            resized.coverage_size = candidate
            return resized, f"built with {key}={candidate}"
        del resized
    return model, ""


def settle_batchnorm(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def check(model: nn.Module, size: int, rules: str = "otsuki2024-conserving", onnx_path: str | None = None,
          source: str = "", name: str = "") -> Result:
    """Compile `model` at `size`² and measure it (see the module docstring)."""
    import graphlrp
    from .errors import GraphLRPError

    res = Result(source, name or type(model).__name__, size)
    t = time.time()
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    try:
        with torch.no_grad():
            ref = model(x)
    except Exception as e:
        res.status, res.error = "model-error", f"{type(e).__name__}: {_first_line(e)}"
        return res
    try:
        explainer = graphlrp.compile(model, x[:1], rules=rules)
        logits, rel = explainer(x)
        p = logits.softmax(-1).max(-1).values
        res.forward_diff = rel_diff(logits, ref)
        res.conservation = (rel.flatten(1).sum(1).double() / p.double() - 1).abs().max().item()
        res.merges = dict(Counter(m.skip_kind for m in explainer.merges))
        if onnx_path:
            report = explainer.export_onnx(onnx_path)
            res.onnx_parity = float(report.max_rel_diff)
        ok = res.forward_diff <= 1e-4 and res.conservation <= 1e-3
        res.status = "ok" if ok else "fail"
        if not ok:
            res.error = "tolerance: forward diff or conservation above bound"
    except GraphLRPError as e:
        res.status, res.error = "fail", f"{type(e).__name__}: {_first_line(e)}"
    except Exception as e:  # compile() lets none through; anything else is measured code failing
        res.status = "fail"
        res.error = f"{type(e).__name__}: {_first_line(e)} [{traceback.extract_tb(e.__traceback__)[-1].name}]"
    res.seconds = time.time() - t
    return res


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [""])[0][:200]


def markdown(results: list[Result], command: str, rules: str, planned: int | None = None) -> str:
    count = lambda source, status: sum(r.source == source and r.status == status for r in results)  # noqa: E731
    lines = ["# Coverage", "",
             f"`{command}` — preset `{rules}`, random weights, batch 2, torch {torch.__version__}.", "",
             *([f"**Partial run: {len(results)} of {planned} planned models reached** (the report is rewritten after "
                "each model; this run stopped before the end).", ""] if planned and len(results) < planned else []),
             "| source | models | ok | failing | skipped |", "|---|---:|---:|---:|---:|"]
    for s in dict.fromkeys(r.source for r in results):
        lines.append(f"| {s} | {sum(r.source == s for r in results)} | {count(s, 'ok')} | "
                     f"{count(s, 'fail') + count(s, 'model-error')} | {count(s, 'skipped')} |")
    lines += ["", "ok: logits within 1e-4 (relative) of the model's and |ΣR_input / p(ŷ) − 1| ≤ 1e-3 for every sample.",
              "merges: identity / projection / other skips of adds, branch-dim sums (ResNeSt, SK).", "",
              "| source | model | input | status | merges | forward diff | abs(ΣR/p − 1) | ONNX parity | s | error |",
              "|---|---|---:|---|---|---:|---:|---:|---:|---|"]
    fmt = lambda v: "" if v is None else f"{v:.1e}"  # noqa: E731
    for r in results:
        merges = ", ".join(f"{v} {k}" for k, v in sorted(r.merges.items())) or ("0" if r.status == "ok" else "")
        err = r.error.replace("|", "\\|")
        lines.append(f"| {r.source} | {r.name} | {r.size} | {r.status} | {merges} | {fmt(r.forward_diff)} | "
                     f"{fmt(r.conservation)} | {fmt(r.onnx_parity)} | {r.seconds:.1f} | {err} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Three presets per model, the main job's export, a time limit per model, and a report that can be resumed.

CONSERVING = ("otsuki2024-conserving", "cp-lrp-conserving")
PRESET_COLUMNS = ("cli",) + CONSERVING  # "cli": the CLI's own choice, `default_preset(model)`
FORWARD_BOUND = 1e-4
CONSERVATION_BOUND = 1e-3
DATA_BEGIN = "<!-- graphlrp coverage rows (one JSON object per line; read back by --resume)"
DATA_END = "-->"
ROW_STATUSES = ("ok", "refused", "WRONG", "CRASH", "timeout", "memory", "model-error", "skipped")
PRESET_STATUSES = ("conserves", "ok", "refused", "WRONG", "CRASH", "timeout")
MEMORY_FRACTION = 0.85  # the default --max-memory: this share of the machine's memory
KILL_GRACE = 60.0  # seconds past --timeout after which a model's process is stopped (a long kernel ignores SIGALRM)


class ModelTimeout(BaseException):
    """The per-model time limit ran out (a BaseException, so no `except Exception` on the way swallows it)."""


@dataclass
class PresetResult:
    preset: str
    status: str = "timeout"  # see PRESET_STATUSES
    ratio: list = field(default_factory=list)  # ΣR_in / R_out per sample, measured here
    forward_diff: float | None = None
    error: str = ""

    def cell(self) -> str:
        ratios = ", ".join(_g(r) for r in self.ratio)
        if self.status == "conserves":
            finite = [abs(r - 1) for r in self.ratio if r is not None and not math.isnan(r)]
            return f"conserves ({_e(max(finite)) if finite else 'no output relevance'})"
        if self.status == "ok":
            return f"ok (ratio {ratios or 'n/a'})"
        if self.status in ("refused", "CRASH", "WRONG"):
            return f"{self.status}: {self.error}" if self.error else self.status
        return self.status


@dataclass
class Row:
    source: str
    name: str
    size: int
    status: str = "ok"  # see ROW_STATUSES
    large: bool = False  # over --max-params: run at --large-size (or the smallest size the model accepts)
    params: float | None = None  # millions
    cli_preset: str = ""
    presets: dict = field(default_factory=dict)  # column ("cli" or a conserving preset) -> PresetResult
    merges: dict = field(default_factory=dict)
    onnx_parity: float | None = None
    onnx_bytes: int | None = None
    onnx_error: str = ""
    seconds: float = 0.0
    error: str = ""  # model-error / skipped / timeout / memory: why
    peak_gb: float | None = None  # the peak resident size of the model's process (run with --max-memory)
    code: str = ""  # the code that produced the row (`code_version`); "" in rows written before it was recorded
    queued: bool = False  # picked by a `--retry` run that has not reached it yet: the result is the earlier one

    def to_json(self) -> str:
        data = {k: v for k, v in self.__dict__.items() if k != "presets"}
        data["presets"] = {k: v.__dict__ for k, v in self.presets.items()}
        text = json.dumps(data, default=str, allow_nan=True)
        return text.replace("-->", "--\\u003e")

    @classmethod
    def from_json(cls, text: str) -> "Row":
        data = json.loads(text)
        presets = {k: PresetResult(**v) for k, v in data.pop("presets", {}).items()}
        row = cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
        row.presets = presets
        return row

    def settle(self) -> "Row":
        """The row's status from its presets and export: CRASH or WRONG if any preset or the export is so,
        refused if the main job (the CLI's choice, compiled and exported) was refused, else ok."""
        if self.status in ("timeout", "memory", "model-error", "skipped"):
            return self
        found = [p.status for p in self.presets.values()]
        if "CRASH" in found or self.onnx_error.startswith("export CRASH"):
            self.status = "CRASH"
        elif "WRONG" in found:
            self.status = "WRONG"
        elif self.presets.get("cli") is None or self.presets["cli"].status == "refused" or self.onnx_error:
            self.status = "refused"
        else:
            self.status = "ok"
        return self


def _g(v) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


def _e(v) -> str:
    return "" if v is None else f"{v:.1e}"


def output_relevance(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """R_out per sample for the target ŷ = argmax: p(ŷ) for output = "probability", the logit for "logit"."""
    from .conservation import output_relevance as of_targets

    predicted = torch.full((len(logits),), -1)
    return torch.from_numpy(of_targets(logits.detach().double().numpy(), predicted.numpy(), kind))


def _crash(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    where = f" [{frames[-1].name}]" if frames else ""
    return f"{type(e).__name__}: {_first_line(e)}{where}"


def check_preset(model: nn.Module, x: torch.Tensor, reference: torch.Tensor, preset: str,
                 allow_vanishing: bool = False):
    """Compile `model` with `preset` on x[:1] and measure it on the batch `x` against the model's `reference`
    logits. Returns (PresetResult, explainer or None)."""
    import warnings

    import graphlrp
    from .errors import GraphLRPError

    res = PresetResult(preset)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            explainer = graphlrp.compile(model, x[:1], rules=preset, allow_vanishing=allow_vanishing)
            logits, rel = explainer(x)
    except GraphLRPError as e:
        res.status, res.error = "refused", f"{type(e).__name__}: {_first_line(e)}"
        return res, None
    except Exception as e:  # compile() lets none through; anything else is graphlrp's code failing
        res.status, res.error = "CRASH", _crash(e)
        return res, None
    res.forward_diff = rel_diff(logits, reference)
    out = output_relevance(logits, explainer.info["output_relevance"])
    ratio = rel.flatten(1).sum(1).double() / out
    res.ratio = [float("nan") if o == 0 else float(r) for r, o in zip(ratio, out)]
    conserving = bool(getattr(explainer.preset, "conserving", False))
    problems = []
    if not res.forward_diff <= FORWARD_BOUND:
        problems.append(f"forward diff {res.forward_diff:.1e} > {FORWARD_BOUND:g}")
    if not bool(torch.isfinite(rel).all()):
        problems.append("non-finite relevance")
    elif conserving:
        finite = [abs(r - 1) for r in res.ratio if not math.isnan(r)]
        if finite and not max(finite) <= CONSERVATION_BOUND:
            problems.append(f"|ΣR_in/R_out − 1| = {max(finite):.1e} > {CONSERVATION_BOUND:g}")
    if problems:
        res.status, res.error = "WRONG", "; ".join(problems)
    else:
        res.status = "conserves" if conserving else "ok"
    return res, explainer


PATCH_MULTIPLES = (8, 14, 16, 24, 32, 48)  # what patch sizes (and a patch times a pooling kernel: 16 × 3) divide


def nearby_sizes(size: int) -> list[int]:
    """`size` and the smallest multiple of each usual patch size at or above it, smallest first."""
    return sorted({size, *(-(-size // p) * p for p in PATCH_MULTIPLES)})


def input_sizes(model: nn.Module, size: int) -> list[int]:
    """Sizes to try, smallest first: the one asked for and the multiples of a patch size just above it, then the
    model's own and 224 (timm's pretrained_cfg, a torchvision ViT's image_size), so a model that needs a multiple
    of 48 runs at 96, not at its own 768."""
    own = [224]
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    if isinstance(cfg, dict) and cfg.get("input_size"):
        own.append(int(cfg["input_size"][-1]))
    if isinstance(getattr(model, "image_size", None), int):
        own.append(model.image_size)
    return list(dict.fromkeys([*nearby_sizes(size), *sorted(own)]))


def check_model(model: nn.Module, size: int, source: str = "", name: str = "", onnx_dir: str | None = None,
                row: Row | None = None) -> Row:
    """The three presets on `model` (see the module docstring) and, with `onnx_dir`, the ONNX export of the
    CLI's choice. The input is `size`² or, where the model refuses that, the next of `input_sizes`. Fills and
    returns `row` (so a time limit that interrupts it leaves what was done)."""
    from .commands.compile import default_preset
    from .errors import GraphLRPError

    row = row or Row(source, name or type(model).__name__, size)
    row.params = row.params if row.params is not None else sum(p.numel() for p in model.parameters()) / 1e6
    row.cli_preset = default_preset(model)
    errors = []
    for s in input_sizes(model, size):
        torch.manual_seed(0)
        x = torch.randn(2, 3, s, s)
        try:
            with torch.no_grad():
                reference = model(x)
            break
        except Exception as e:
            errors.append(f"{s}: {type(e).__name__}: {_first_line(e)}")
    else:
        row.status, row.error = "model-error", "; ".join(errors)[:300]
        return row
    row.size = s
    for column in PRESET_COLUMNS:
        row.presets[column] = PresetResult(row.cli_preset if column == "cli" else column)
    for column in PRESET_COLUMNS:
        preset = row.presets[column].preset
        res, explainer = check_preset(model, x, reference, preset, allow_vanishing=column == "cli")
        row.presets[column] = res
        if explainer is None:
            continue
        if not row.merges or column == "cli":
            row.merges = dict(Counter(m.skip_kind for m in explainer.merges))
        if column == "cli" and onnx_dir:
            path = os.path.join(onnx_dir, "coverage.onnx")
            try:
                report = explainer.export_onnx(path)
                row.onnx_parity, row.onnx_bytes = float(report.max_rel_diff), int(report.size_bytes)
            except GraphLRPError as e:
                row.onnx_error = f"export refused: {type(e).__name__}: {_first_line(e)}"
            except Exception as e:
                row.onnx_error = f"export CRASH: {_crash(e)}"
            finally:
                for f in os.listdir(onnx_dir):
                    os.remove(os.path.join(onnx_dir, f))
        del explainer
    return row.settle()


class time_limit:
    """`with time_limit(seconds):` raises ModelTimeout in the block after `seconds` (SIGALRM; Unix, main
    thread). 0, or where SIGALRM is not available, sets no limit."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.active = bool(seconds) and hasattr(signal, "SIGALRM")

    def __enter__(self):
        if self.active:
            try:
                self.previous = signal.signal(signal.SIGALRM, self._expire)
            except ValueError:  # not the main thread
                self.active = False
                return self
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def _expire(self, signum, frame):
        raise ModelTimeout(f"over the time limit of {self.seconds:g} s")

    def __exit__(self, *exc):
        if self.active:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)
        return False


def default_memory_limit() -> float:
    """MEMORY_FRACTION of this machine's memory, in GB."""
    import psutil

    return round(MEMORY_FRACTION * psutil.virtual_memory().total / 2**30, 1)


def can_isolate() -> bool:
    """Whether models can run in processes of their own started by a fork server (POSIX). The server imports
    torch once and forks each model's process from itself: a fork of the command's own process could inherit
    an OpenMP pool that a child's first parallel kernel then waits on forever."""
    import multiprocessing

    return "forkserver" in multiprocessing.get_all_start_methods()


def _in_child(send, fn, args) -> None:
    import resource
    import sys

    from .memory import return_large_blocks_to_the_system

    return_large_blocks_to_the_system()  # the model's own process: its peak is its tensors, not glibc's heap
    row = fn(*args)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB elsewhere
    row.peak_gb = maxrss / (2**30 if sys.platform == "darwin" else 2**20)
    send.send(row.to_json())


_SERVER_STARTED = []


def isolated(fn, args: tuple, row: Row, limit_bytes: float, timeout: float, poll: float = 0.25) -> Row:
    """`fn(*args)` (returning a Row; both picklable) in a process of its own whose resident size (with its
    children) is sampled every `poll` s: above `limit_bytes` it is stopped and `row` comes back as a 'memory' row,
    so one model too large for the machine costs its row, not the run (the kernel's OOM killer would take the
    whole run). A process still running KILL_GRACE s past `timeout` is stopped too (a 'timeout' row), and one
    that dies is a CRASH row. Each row records its process's peak resident size (`peak_gb`)."""
    import multiprocessing

    import psutil

    ctx = multiprocessing.get_context("forkserver")
    if not _SERVER_STARTED:
        ctx.set_forkserver_preload(["torch", "graphlrp.coverage"])
        _SERVER_STARTED.append(True)
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_in_child, args=(send, fn, args), daemon=True)
    start = time.time()
    peak = 0
    try:  # from the start: SIGTERM (raised as cli.Terminated) or Ctrl-C at any point stops the model's process
        process.start()
        send.close()
        watched = psutil.Process(process.pid)
        while True:
            if receive.poll(poll):
                try:
                    done = Row.from_json(receive.recv())
                except EOFError:  # it ended without a row
                    process.join()
                    row.status, row.error = "CRASH", f"the model's process died (exit code {process.exitcode})"
                    break
                process.join()
                done.peak_gb = max(done.peak_gb or 0.0, peak / 2**30)
                return done
            try:
                rss = sum(p.memory_info().rss for p in [watched, *watched.children(recursive=True)])
            except psutil.Error:  # it is ending: the next poll reads its row or its end
                continue
            peak = max(peak, rss)
            if rss > limit_bytes:
                row.status = "memory"
                row.error = (f"stopped at {rss / 2**30:.1f} GB resident, over --max-memory "
                             f"{limit_bytes / 2**30:g} GB")
                break
            if timeout and time.time() - start > timeout + KILL_GRACE:
                row.status = "timeout"
                row.error = f"over the time limit of {timeout:g} s (stopped {KILL_GRACE:g} s later)"
                break
    finally:
        if process.pid is not None:  # started
            if process.is_alive():
                process.kill()
            process.join()
    row.peak_gb = peak / 2**30
    return row


@functools.lru_cache(maxsize=None)
def code_version() -> str:
    """The code a row is produced by: graphlrp's git commit, with "+changes" where its sources differ from the
    commit, or graphlrp's version outside a git checkout. A report resumed across commits says which rows are whose."""
    import subprocess

    from .version import __version__

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "graphlrp", "rules"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"graphlrp {__version__}"
    return f"{commit}+changes" if changed else commit


def code_summary(rows: list[Row]) -> str:
    """One line: how many rows each version of the code produced (rows of older reports have no record)."""
    counts = Counter(r.code for r in rows)
    parts = [f"{n} at {code}" for code, n in counts.most_common() if code]
    if counts.get(""):
        parts.append(f"{counts['']} before rows recorded it")
    return "Rows by the code that produced them: " + ("; ".join(parts) or "none") + "."


def retry_selection(text: str) -> tuple[set, set]:
    """`--retry` entries: row statuses ("refused") and preset-column statuses ("cp-lrp-conserving:refused").
    Raises ValueError naming an unknown entry."""
    rows, columns, unknown = set(), set(), []
    for entry in filter(None, (e.strip() for e in text.split(","))):
        column, _, status = entry.rpartition(":")
        if not column and status in ROW_STATUSES:
            rows.add(status)
        elif column in PRESET_COLUMNS and status in PRESET_STATUSES:
            columns.add((column, status))
        else:
            unknown.append(entry)
    if unknown:
        raise ValueError(f"unknown --retry entr{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)} (row "
                         f"statuses: {', '.join(ROW_STATUSES)}; or COLUMN:STATUS with a column of "
                         f"{', '.join(PRESET_COLUMNS)} and a status of {', '.join(PRESET_STATUSES)})")
    return rows, columns


def to_retry(row: Row, statuses: set, column_statuses: set) -> bool:
    """Whether `--retry` asks for this row again: its status, or one of its presets' status, is listed."""
    return row.status in statuses or any(p.status == status for column, status in column_statuses
                                         if (p := row.presets.get(column)) is not None)


def read_rows(path: str) -> list[Row]:
    """The rows stored in a report written by `report`; [] for a missing file or one without the data block."""
    if not os.path.exists(path):
        return []
    rows, inside = [], False
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if line == DATA_BEGIN:
                inside = True
            elif inside and line == DATA_END:
                break
            elif inside and line.strip():
                rows.append(Row.from_json(line))
    return rows


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def report(rows: list[Row], command: str, planned: list[tuple[str, str]] | None = None) -> str:
    """The markdown report: summary per source and per preset, one row per model, and the data block."""
    planned = planned or []
    order = {key: i for i, key in enumerate(planned)}
    rows = sorted(rows, key=lambda r: order.get((r.source, r.name), len(order)))
    done = sum((r.source, r.name) in order and not r.queued for r in rows)
    queued = sum(r.queued for r in rows)
    lines = ["# Coverage", "",
             f"`{command}` — random weights, batch 2 of different random inputs, torch {torch.__version__}.", ""]
    if planned and done < len(planned):
        waiting = (f"; {queued} rows queued for `--retry` still show their earlier result (marked queued)"
                   if queued else "")
        lines += [f"**partial: {done} of {len(planned)} planned models run{waiting}** (the report is rewritten "
                  "after each model; run `--resume` to go on).", ""]
    sources = list(dict.fromkeys(r.source for r in rows))
    lines += ["| source | models | " + " | ".join(ROW_STATUSES) + " | large |",
              "|---|---:|" + "---:|" * (len(ROW_STATUSES) + 1)]
    for s in sources + (["all"] if len(sources) > 1 else []):
        sel = [r for r in rows if s == "all" or r.source == s]
        lines.append(f"| {s} | {len(sel)} | " + " | ".join(str(sum(r.status == st for r in sel))
                                                        for st in ROW_STATUSES) + f" | {sum(r.large for r in sel)} |")
    lines += ["", "| source | preset | " + " | ".join(PRESET_STATUSES) + " |",
              "|---|---|" + "---:|" * len(PRESET_STATUSES)]
    for s in sources:
        sel = [r for r in rows if r.source == s]
        for column in PRESET_COLUMNS:
            results = [r.presets[column] for r in sel if column in r.presets]
            label = "CLI choice" if column == "cli" else column
            lines.append(f"| {s} | {label} | " + " | ".join(str(sum(p.status == st for p in results))
                                                         for st in PRESET_STATUSES) + " |")
    lines.append("")
    lines += [code_summary(rows), ""]
    for s in sources:
        sel = [r for r in rows if r.source == s]
        exported = sum(r.onnx_parity is not None for r in sel)
        refused = sum(r.onnx_error.startswith("export refused") for r in sel)
        crashed = sum(r.onnx_error.startswith("export CRASH") for r in sel)
        lines.append(f"ONNX export of the CLI choice, {s}: {exported} exported with onnxruntime parity, "
                     f"{refused} refused, {crashed} CRASH.")
    lines += ["",
              "status: ok — the main job works (the CLI's preset compiles, is exact and exports with onnxruntime "
              "parity) and no preset is WRONG or CRASH; refused — the main job was refused with graphlrp's own "
              "error; WRONG / CRASH — some preset (or the export) is; timeout — over `--timeout`; large — over "
              "`--max-params`, run at `--large-size` (marked `L` after the input size).",
              "CLI choice: `default_preset(model)` (cp-lrp with attention, else otsuki2024), compiled with "
              "allow_vanishing as `graphlrp compile NAME --weights none`; ratio: ΣR_in / R_out per sample. "
              "conserves (e): a conserving preset with max |ΣR_in / R_out − 1| = e ≤ 1e-3; forward: the largest "
              "|logits − model| / max|model| over the compiled presets (≤ 1e-4).",
              "ONNX: the CLI choice's onnxruntime parity (max relative difference) and file size. "
              "s: build, three compiles with their checks, and the export; GB: the peak resident size of the "
              "model's process (empty: run without --max-memory, or before it existed); memory — its process "
              "was stopped over `--max-memory`.", "",
              "| source | model | input | status | CLI choice | otsuki2024-conserving | cp-lrp-conserving | forward "
              "| merges | ONNX | s | GB | note |",
              "|---|---|---:|---|---|---|---|---:|---|---|---:|---:|---|"]
    for r in rows:
        cells = []
        for column in PRESET_COLUMNS:
            p = r.presets.get(column)
            text = "" if p is None else p.cell()
            cells.append(_escape(f"{p.preset}: {text}" if p is not None and column == "cli" else text))
        diffs = [p.forward_diff for p in r.presets.values() if p.forward_diff is not None]
        merges = ", ".join(f"{v} {k}" for k, v in sorted(r.merges.items())) or ("0" if r.presets else "")
        if r.onnx_parity is not None:
            onnx = f"{r.onnx_parity:.1e}, {r.onnx_bytes / 2**20:.1f} MiB"
        else:
            onnx = _escape(r.onnx_error)
        size = f"{r.size} L" if r.large and r.status != "skipped" else f"{r.size}"
        note = _escape("; ".join(filter(None, ["queued for --retry: the earlier result" if r.queued else "",
                                                r.error])))
        lines.append(f"| {r.source} | {r.name} | {size} | {r.status} | " + " | ".join(cells)
                     + f" | {_e(max(diffs)) if diffs else ''} | {merges} | {onnx} | {r.seconds:.1f} | "
                     + (f"{r.peak_gb:.1f}" if r.peak_gb is not None else "") + f" | {note} |")
    lines += ["", DATA_BEGIN, *(r.to_json() for r in rows), DATA_END]
    return "\n".join(lines) + "\n"
