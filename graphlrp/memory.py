"""Handing freed memory back to the system between the big phases of a compile or an export.

glibc keeps the heap pages Python and torch free (a compile's traced values, a written ONNX proto) for the process;
the resident size then stays at the phase's peak, and the next phase (onnxruntime's session, the next compile in
the same process) is measured, and killed by the OOM killer, on top of it. SAM at 1024 px: 4.7 GB resident after
compiling at 512 px, 2.5 GB after `release_freed_memory`, for 1.7 GB of live tensors."""
from __future__ import annotations

import ctypes
import gc
import os

M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h
LARGE_BLOCK_BYTES = 2 * 1024 * 1024  # 1 MiB held Sequencer2D-L lower still, but slower (results/sequencer-stages.md)


def release_freed_memory() -> None:
    """Collect garbage and return free heap pages to the system (malloc_trim); a no-op where there is no glibc."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def return_large_blocks_to_the_system(threshold: int = LARGE_BLOCK_BYTES) -> bool:
    """Serve every allocation of `threshold` bytes or more from a mapping of its own, unmapped when it is freed.

    glibc starts at 128 KiB but raises its threshold to the largest block freed so far (up to 32 MiB); after that a
    compile's large temporaries come from the heap, and small live objects between them keep its pages with the
    process. Sequencer2D-L's `graphlrp compile` at 224 px: median peak 2.72 GiB with this, 4.47 GiB without (49.9 s,
    43.4 s); ResNet-50 10.5 s instead of 9.3 s (results/sequencer-stages.md). Only for processes graphlrp owns
    (its CLI, its coverage workers): a library does not change its host's allocator. Returns whether it was set;
    a no-op where there is no glibc, or where the user chose a threshold (MALLOC_MMAP_THRESHOLD_)."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False
