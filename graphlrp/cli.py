"""The `graphlrp` command line. Each subcommand lives in `graphlrp/commands/<name>.py` and exposes
`register(subparsers)`; adding a command means adding one module and its name below."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys

from .errors import GraphLRPError, missing_compile_extra

COMMANDS = ["compile", "inspect", "explain", "evaluate", "serve", "export_triton", "coverage"]


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__

    parser = argparse.ArgumentParser(
        prog="graphlrp", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compile PyTorch CNNs (ResNets, ConvNeXts, ...) and transformers (ViT, DeiT, Swin, ...) into "
                    "LRP explainers that verify\ntheir own conservation, export them to ONNX, and explain images, "
                    "serve them over HTTP or lay them out\nfor Triton with onnxruntime alone.",
        epilog="compile, inspect, evaluate and coverage need the compile extra (pip install 'graphlrp[compile]');\n"
               "explain, serve (pip install 'graphlrp[serve]') and export-triton run without torch.\n"
               "Quick start: graphlrp compile resnet18 --weights none -o resnet18.onnx && "
               "graphlrp explain resnet18.onnx examples/photos -o out")
    parser.add_argument("--version", action="version", version=f"graphlrp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f".commands.{name}", __package__)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith(f"{__package__}.commands"):
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler's or CI's time limit, `kill`), raised where the command is, so that its `finally`
    blocks run as for Ctrl-C: a coverage run's worker is stopped, its temporary folder removed, its report kept."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def sigterm_raises():
    """While the command runs, SIGTERM raises `Terminated`; the host's own handler comes back afterwards. Outside
    the main thread (where Python cannot set handlers) SIGTERM keeps its default."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with sigterm_raises():
            return int(args.func(args) or 0)
    except GraphLRPError as e:
        print(f"graphlrp {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        error = missing_compile_extra(e, f"graphlrp {args.command}")
        if error is None:
            raise
        print(f"graphlrp {args.command}: error: {error}", file=sys.stderr)
        return 2
    except Terminated:
        print("terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
