"""Keeping freed memory: glibc serves large blocks from its heap and reuses them."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys
from sepvit.utils import freed_memory_kept, keep_freed_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
kept = keep_freed_memory()
size = 64 << 20
first = libc.malloc(size)
libc.free(first)
second = libc.malloc(size)
# Served from the heap, a freed 64 MiB block is handed out again; mmap would map fresh pages.
print(kept, freed_memory_kept(), first == second)
"""


def run_probe(switch: str | None) -> list[str]:
    env = dict(os.environ)
    env.pop("SEPVIT_KEEP_FREED_MEMORY", None)
    if switch is not None:
        env["SEPVIT_KEEP_FREED_MEMORY"] = switch
    result = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    return result.stdout.split()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_large_blocks_are_reused_once_freed_memory_is_kept():
    assert run_probe(None) == ["True", "True", "True"]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_switch_leaves_glibc_defaults():
    kept, state, _ = run_probe("0")
    assert (kept, state) == ("False", "False")
