"""argparse value types shared by the commands, so bad numbers are rejected with a usage message."""
from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port, 0..65535 (0: any free one), got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


def floats(text: str) -> tuple[float, ...]:
    """Comma-separated numbers, e.g. a per-channel mean `0.485,0.456,0.406`."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def add_ray_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """--ray [ADDRESS], --workers, --threads: shared by the commands that can run on Ray. Ray is imported only
    when --ray is given."""
    group = parser.add_argument_group("Ray (pip install graphlrp[ray])")
    group.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                       help=f"compute the {what} on Ray: on the cluster at ADDRESS (ray://HOST:10001, HOST:6379, "
                            "auto), else at $RAY_ADDRESS, else on a Ray started on this machine for the run. "
                            "Put it last or write --ray=ADDRESS, so that it does not take the next argument")
    group.add_argument("--workers", type=positive_int, metavar="N",
                       help="Ray workers (default: as many as the cluster's CPUs allow at --threads each; with "
                            "--provider cuda, one per GPU)")
    group.add_argument("--threads", type=positive_int, default=1, metavar="T",
                       help="CPUs each Ray worker reserves and computes with (default 1)")
