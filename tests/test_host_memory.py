"""Protects engine.device.keep_freed_host_memory: on glibc, a CPU forward pass that allocates and frees
the same large activations layer after layer stops paying a page fault for every page of them on every
pass (the CLIP scorer's CPU throughput depended on it), and a user's own MALLOC_* settings win.

Each case runs in a fresh interpreter: the setting is process-wide and cannot be undone."""

from __future__ import annotations

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

# A transformer MLP's allocation pattern (20 MB activations, six layers), six passes; prints whether the
# setting was applied and the minor page faults of the passes after the first. With glibc's defaults these
# vary from run to run (about 10,000 to 190,000 here); kept, they are 0 from the second pass on.
SCRIPT = """
import resource, sys, torch
import torch.nn.functional as F
from engine.device import keep_freed_host_memory
kept = keep_freed_host_memory() if sys.argv[1] == "keep" else None
torch.set_num_threads(1)
w1, w2 = torch.randn(1536, 16) / 4, torch.randn(16, 1536) / 40
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.randn(3200, 16)
    for _ in range(6):
        x = x + F.linear(F.gelu(F.linear(x, w1)), w2)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, sum(faults[1:]))
"""


def run(mode: str, **env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout.split()
    return out[0], int(out[1])


def test_freed_activations_are_reused_without_page_faults():
    kept, faults = run("keep")
    assert kept == "True"
    assert faults < 500  # the first pass grew the heap; every later one reuses it


def test_the_users_malloc_settings_win():
    kept, _ = run("keep", MALLOC_TRIM_THRESHOLD_="1")
    assert kept == "False"
