"""Protects modeltest.host_memory.keep_freed_host_memory: on glibc, a large block freed on the CPU stays in the
heap for the next allocation of its size (not a fresh mmap, not trimmed off the heap), so a forward pass
that allocates and frees the same activations layer after layer stops paying a page fault for every page
of them on every pass (the CLIP scorer's CPU throughput depended on it), and a user's own MALLOC_*
settings win.

Each case runs in a fresh interpreter: the setting is process-wide and cannot be undone."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)

ROOT = Path(__file__).resolve().parent.parent

# One 20 MB block through libc itself, so nothing else allocates in between: where glibc serves it
# (heap or mmap), whether freeing it shrinks the heap, and the page faults of allocating and touching it
# again. glibc's defaults mmap it (its first mmap threshold is 128 KiB); the trim threshold alone keeps
# that threshold fixed, so it is still mmapped; the mmap threshold alone lets a free at the heap's top
# trim it (the trim threshold stays 128 KiB). Only both keep it.
BLOCK_SCRIPT = """
import ctypes, json, resource
from modeltest.host_memory import keep_freed_host_memory
kept = keep_freed_host_memory()
libc = ctypes.CDLL(None)
field = ctypes.c_size_t if hasattr(libc, "mallinfo2") else ctypes.c_int
class MallInfo(ctypes.Structure):
    _fields_ = [(n, field) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
mallinfo = getattr(libc, "mallinfo2", None) or libc.mallinfo
mallinfo.restype = MallInfo
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.restype, libc.memset.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
SIZE = 20 << 20
def touched():
    p = libc.malloc(SIZE)
    libc.memset(p, 1, SIZE)
    return p
mmapped = mallinfo().hblkhd
p = touched()
mmapped_for_it = mallinfo().hblkhd - mmapped
heap = mallinfo().arena
libc.free(p)
heap_shrunk_by = heap - mallinfo().arena
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
libc.free(touched())
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps(dict(kept=kept, mmapped_for_it=mmapped_for_it, heap_shrunk_by=heap_shrunk_by, faults=faults)))
"""

# A transformer MLP's allocation pattern (20 MB activations of 4,800 pages, six layers) for twelve passes;
# prints whether the setting was applied and each pass's minor page faults. The first pass grows the heap.
# Small allocations that land in a freed activation's space fragment it, so in some address layouts the
# heap grows by one more activation in a later pass (seen once in a run, at pass 3 or at pass 12); the
# rest reuse it. With the trim threshold alone every pass faults about 57,600 times; with glibc's
# defaults the later passes fault 14,400 to 420,000 times in all, depending on the layout.
MLP_SCRIPT = """
import json, resource, torch
import torch.nn.functional as F
from modeltest.host_memory import keep_freed_host_memory
kept = keep_freed_host_memory()
torch.set_num_threads(1)
w1, w2 = torch.randn(1536, 16) / 4, torch.randn(16, 1536) / 40
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.randn(3200, 16)
    for _ in range(6):
        x = x + F.linear(F.gelu(F.linear(x, w1)), w2)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(dict(kept=kept, faults=faults)))
"""


def run(script: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    return json.loads(out.splitlines()[-1])


def test_a_freed_block_stays_in_the_heap_for_the_next_allocation():
    got = run(BLOCK_SCRIPT)
    assert got["kept"] is True
    assert got["mmapped_for_it"] == 0  # served from the heap, not a fresh mmap
    assert got["heap_shrunk_by"] == 0  # freeing it did not trim the heap
    assert got["faults"] < 100  # the same pages again (a 20 MB block is 5,120 pages)


def test_a_forward_pass_reuses_the_heap_it_grew():
    got = run(MLP_SCRIPT)
    assert got["kept"] is True
    assert sum(got["faults"][1:]) < 3 * 4800, got["faults"]  # at most two late growths by one activation


def test_the_users_malloc_settings_win():
    assert run(BLOCK_SCRIPT, MALLOC_TRIM_THRESHOLD_="1")["kept"] is False
    assert run(BLOCK_SCRIPT, MALLOC_MMAP_THRESHOLD_="65536")["kept"] is False
