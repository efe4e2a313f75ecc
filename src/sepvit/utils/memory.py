"""Keep freed memory in the process, so that large tensors reuse pages instead of faulting in new ones.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves blocks above its mmap
threshold (at most 32 MiB by default) with fresh ``mmap`` calls and unmaps them when freed, so every
large activation of a forward pass (a 16 × 56 × 56 × 384 MLP hidden map is 77 MiB) touches pages the
kernel must fault in and zero first. On a virtual machine each fault is expensive: an elementwise
op on such a tensor costs several times the op itself. Raising the mmap and trim thresholds makes
glibc serve those blocks from its heap and keep them after ``free``, so later passes reuse warm
pages. The cost is that the process keeps its peak heap until it exits (or ``malloc_trim`` runs).

The ``sepvit`` command calls :func:`keep_freed_memory` at start-up; set ``SEPVIT_KEEP_FREED_MEMORY=0``
to leave glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# The largest block glibc may serve from its heap instead of mmap; bigger than any activation of
# the models here, well inside what mallopt accepts on 64-bit glibc.
_MMAP_THRESHOLD_BYTES = 1 << 30
_TRIM_THRESHOLD_BYTES = (1 << 31) - 1
ENV_SWITCH = "SEPVIT_KEEP_FREED_MEMORY"

_state = {"kept": False}


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse; True when the process now does so.

    Does nothing (returns False) off Linux/glibc, or when ``SEPVIT_KEEP_FREED_MEMORY=0``.
    """
    if _state["kept"]:
        return True
    if os.environ.get(ENV_SWITCH, "1") == "0" or platform.system() != "Linux":
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        kept = bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)
        )
    except (OSError, AttributeError):
        return False
    _state["kept"] = kept
    return kept


def freed_memory_kept() -> bool:
    """Whether :func:`keep_freed_memory` has taken effect in this process."""
    return _state["kept"]
