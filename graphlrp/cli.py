"""The `graphlrp` command line. Each subcommand lives in `graphlrp/commands/<name>.py` and exposes
`register(subparsers)`; adding a command means adding one module and its name below."""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import GraphLRPError

COMMANDS = ["compile", "inspect", "explain", "evaluate", "serve", "export_triton", "coverage"]


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__

    parser = argparse.ArgumentParser(prog="graphlrp", description="Compile ResNets into LRP explainers and use them.")
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except GraphLRPError as e:
        print(f"graphlrp {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
