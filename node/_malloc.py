"""Keep large buffers inside the process instead of returning them to the kernel.

glibc serves every allocation above its mmap threshold (128 KiB to start with)
by a fresh ``mmap`` and gives it back with ``munmap`` on free. A node moves
8 MiB piece buffers all day (received pieces, reads for upload, HTTP bodies),
so each one costs a fresh mapping whose pages fault in, zeroed by the kernel,
one by one; on a virtual machine each first touch may also trap to the
hypervisor. Measured on the development VM: filling 256 fresh 8 MiB
``bytearray`` objects cost 3.16 CPU-s; with the thresholds below 0.34 CPU-s,
because freed buffers stay in the heap and are reused.

:func:`tune` raises the mmap threshold to 64 MiB (above the largest piece) and
the trim threshold to 256 MiB, so the heap keeps up to that much free memory
for reuse. It changes process-wide allocator settings, so only the
``autoglm-node`` command calls it, never the library API. Set
``AUTOGLM_MALLOC_TUNE=0`` to leave glibc's defaults alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 256 << 20


def tune() -> bool:
    """Apply the thresholds; True when glibc accepted them (False elsewhere, harmlessly)."""
    if os.environ.get("AUTOGLM_MALLOC_TUNE", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        # glibc's soname first: find_library runs `ldconfig -p` in a subprocess (~0.1 s of start-up wall time).
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        except OSError:
            return False
    try:
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
