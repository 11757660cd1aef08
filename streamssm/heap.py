"""The C heap of a long-running serving process: freed memory kept for reuse (glibc malloc).

The engine thread of ``streamssm serve`` on a CPU allocates and frees every model call's tensors,
megabytes each. glibc hands blocks above a threshold (128 KiB at first, raised as it goes) out as
fresh ``mmap`` s and returns freed heap tops to the kernel, so in a thread's arena every call whose
sizes it had not settled on touched new pages: with 16 clients of the demo model on the 2-core
CPU the server page-faulted ~170,000 times a second (30 % of a core in the kernel) and the model
ran 1.8x slower per sample (bench_service's first run at every client count; 2026-12-07). Fixed
thresholds and one arena end that: blocks up to 32 MiB come from the heap, freed memory stays with
the process up to 512 MiB, and threads started afterwards share the main arena (a thread's own
arena gave memory back on terms of its own: with only the thresholds set, a torch-only pattern
still faulted ~1,300 times a call). The same server then faulted ~0 times a second after its
first second, its first runs as fast as the later ones.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc <malloc.h>
MMAP_THRESHOLD = 32 << 20  # bytes: glibc's largest on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 512 << 20  # bytes of free heap top kept before any is given back


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Blocks below ``mmap_threshold`` bytes come from the heap, up to ``trim_threshold`` bytes of
    freed memory stay with the process, and threads started from now on allocate from the main
    arena (glibc's ``mallopt``; process-wide, for good: a server's setting, made before it starts
    its threads). True when set; False where the C library is not glibc (then nothing changes)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, mmap_threshold), (M_TRIM_THRESHOLD, trim_threshold))
    return all([mallopt(option, value) == 1 for option, value in settings])
