"""The host allocator setting for CPU-heavy loops (the CLIP scorer): glibc's malloc keeps freed memory for
reuse instead of handing it back to the OS at once."""

from __future__ import annotations

# glibc mallopt parameters (malloc.h) and the largest mmap threshold glibc accepts on 64-bit
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 << 20
_host_allocator_kept: bool | None = None


def keep_freed_host_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the OS at once.

    A forward pass on the CPU allocates and frees the same large activations layer after layer. By
    default glibc serves blocks that large with fresh mmaps, or trims them off the heap when freed, so each
    layer touches new pages and pays a page fault for every 4 KiB (expensive on a VM): in the CLIP
    benchmark about 1,700 faults and several ms per image. With the trim threshold unlimited and the mmap
    threshold at its 32 MiB maximum, freed blocks are reused; the cost is that the process keeps its peak
    heap instead of shrinking after it. Both are set: setting either one alone turns off glibc's dynamic
    adjustment of the other, which is worse than the default. Process-wide, applied once; a no-op (False)
    off glibc and where the user set MALLOC_TRIM_THRESHOLD_ or MALLOC_MMAP_THRESHOLD_ (theirs wins)."""
    global _host_allocator_kept
    if _host_allocator_kept is None:
        _host_allocator_kept = _set_mallopt()
    return _host_allocator_kept


def _set_mallopt() -> bool:
    import ctypes
    import os
    import platform

    if any(k in os.environ for k in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trimmed = mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) and trimmed)
