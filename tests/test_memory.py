"""The CLI's processes hand large freed blocks back to the system (graphlrp/memory.py)."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest

try:
    ctypes.CDLL("libc.so.6").mallopt
    GLIBC = True
except (OSError, AttributeError):
    GLIBC = False

RETAINED = textwrap.dedent("""
    import sys, psutil, torch
    from graphlrp.memory import return_large_blocks_to_the_system
    if sys.argv[1] == "on":
        assert return_large_blocks_to_the_system()
    process = psutil.Process()
    warm = torch.ones(1 << 20); del warm   # a 4 MiB block freed: glibc raises its mmap threshold past it
    before = process.memory_info().rss
    blocks, pins = [], []
    for _ in range(40):
        blocks.append(torch.ones(1 << 20))  # 4 MiB each, written
        pins.append(torch.ones(1 << 15))    # a small live tensor after each one: 128 KiB, too large for the
                                            # free holes the imports left, so it lands above its block
    del blocks
    print((process.memory_info().rss - before) / 2**20)
""")


def retained_mib(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", RETAINED, mode], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC, reason="the mmap threshold is glibc's (mallopt)")
def test_freed_large_blocks_go_back_to_the_system_with_the_fixed_threshold():
    """160 MiB of freed 4 MiB tensors, each followed by a small live one (128 KiB: a 64-byte one can land in a
    hole the imports left, and then nothing pins the blocks): glibc's default keeps them all (its
    threshold grew past 4 MiB, so they came from the heap, pinned by the small tensors); with the threshold fixed
    at 2 MiB each block is its own mapping and goes back when freed."""
    assert retained_mib("off") >= 120
    assert retained_mib("on") <= 16


def test_a_users_own_threshold_is_kept(monkeypatch):
    from graphlrp.memory import return_large_blocks_to_the_system

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    assert return_large_blocks_to_the_system() is False


def test_compile_and_coverage_workers_set_it(monkeypatch):
    """Both processes graphlrp owns call it before their work: `graphlrp compile` and a coverage model's worker."""
    import graphlrp.commands.compile as compile_command
    import graphlrp.coverage as coverage
    import graphlrp.memory as memory

    calls = []
    monkeypatch.setattr(memory, "return_large_blocks_to_the_system", lambda: calls.append(1) or True)

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr("graphlrp.models.load_model", stop)
    with pytest.raises(Stop):
        compile_command.run(type("Args", (), {"labels": None, "model": "resnet18", "weights": "none"})())
    assert calls == [1]
    with pytest.raises(Stop):
        coverage._in_child(None, stop, ())
    assert calls == [1, 1]
