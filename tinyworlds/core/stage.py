"""What every DVC stage entry point in `pipeline/` shares: errors as one line, exit 1, and
glibc's allocator told to keep freed memory."""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from collections.abc import Callable

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep the memory a process frees and to reuse it, instead of
    handing large blocks back to the kernel; returns whether it was applied.

    By default glibc serves every block over a threshold (at most 32 MB) with its own mmap and
    unmaps it on free. A training step allocates and frees the same large activations every
    step, so each step then faults all of those pages in again: in bench/README.md's
    measurements that kernel time was up to a third of a CPU step. This is the setting
    `GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...:glibc.malloc.top_pad=...`
    gives, applied at run time: no mmap'd blocks, the heap never trimmed below 2 GiB, and
    grown 1 GiB at a time (address space only; pages count once touched). The cost: the
    process keeps its peak memory until it exits. A no-op off glibc (macOS, musl, Windows)
    and where GLIBC_TUNABLES already sets malloc options (the user's choice stands).
    """
    if platform.libc_ver()[0] != "glibc" or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all([mallopt(M_MMAP_MAX, 0), mallopt(M_TRIM_THRESHOLD, 2**31 - 1), mallopt(M_TOP_PAD, 2**30)])


def run_stage(body: Callable[[], object], params_section: str | None = None) -> None:
    """Run a stage body; a TinyWorldsError becomes `error: ...` on stderr and exit status 1.

    A `ParameterError` names the parameter as its key under `params_section` (the stage's
    section of params.yaml, e.g. `recordings.pong`), where the user sets it. Before the body
    runs, freed memory is kept for reuse (`keep_freed_memory`).
    """
    from tinyworlds.core.errors import ParameterError, TinyWorldsError

    keep_freed_memory()
    try:
        body()
    except ParameterError as err:
        print(f"error: {err.under(params_section) if params_section else err}", file=sys.stderr)
        sys.exit(1)
    except TinyWorldsError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
