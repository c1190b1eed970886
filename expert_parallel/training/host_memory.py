"""Host (CPU) memory allocator of the launcher's processes.

Why: every training step allocates and frees the same large host buffers (activations,
gradients and all-to-all buffers on CPU; staging buffers on GPU hosts). glibc's malloc
raises its mmap threshold to the size of any large block freed (up to 32 MiB), so after
the first steps multi-MiB tensors come from the heap arenas, where freed blocks stay
resident and fragment around long-lived small objects. Measured on the launcher's
default model (EP=2, 2 ranks; ``benchmarks/soak.py`` and a 1,000-step diagnostic with
``mallinfo2``): ~135 MiB in use, but 150-260 MiB free-yet-resident in the arenas and
resident memory still growing after 2,000 steps (+6%). A fixed 256 KiB mmap threshold
stops the growth but costs ~40% throughput (page faults on every large block); jemalloc
returns freed pages on a time decay instead, and was both flat and ~13% faster.

So the launcher runs its processes on jemalloc when it is installed
(``apt-get install libjemalloc2``): ``host_allocator="auto"`` (the default) re-executes the
process once with jemalloc preloaded, before any rendezvous, keeping its PID, argv and
environment, so torchrun, mpirun and srun see the same process. ``glibc`` keeps the system
allocator; ``jemalloc`` / ``tcmalloc`` require that library (a ``ValueError`` otherwise).
Linux only; elsewhere the system allocator is kept.
"""

from __future__ import annotations

import ctypes.util
import functools
import os
import sys
from typing import Optional

ALLOCATORS = ("auto", "jemalloc", "tcmalloc", "glibc")
_LIBRARY = {"jemalloc": "jemalloc", "tcmalloc": "tcmalloc_minimal"}
_REEXEC_MARK = "EXPERT_PARALLEL_ALLOCATOR_REEXEC"  # set in the re-executed process only


@functools.lru_cache(maxsize=None)
def _library(name: str) -> Optional[str]:
    """The soname of an installed allocator library (found via the linker cache, which
    ``find_library`` reads by running ``ldconfig``: once per name and process)."""
    return ctypes.util.find_library(_LIBRARY[name])


def check_allocator(choice: str) -> Optional[str]:
    """Validate ``choice``; return the library to preload for it (None: keep the system
    allocator). An explicit jemalloc / tcmalloc that is not installed is a ValueError."""
    if choice not in ALLOCATORS:
        raise ValueError(f"host_allocator must be one of {ALLOCATORS}, got {choice!r}")
    if choice == "glibc" or not sys.platform.startswith("linux"):
        return None
    wanted = "jemalloc" if choice == "auto" else choice
    lib = _library(wanted)
    if lib is None and choice != "auto":
        raise ValueError(
            f"host_allocator={choice!r}: lib{_LIBRARY[wanted]} is not installed "
            f"(Debian/Ubuntu: apt-get install {'libjemalloc2' if wanted == 'jemalloc' else 'libtcmalloc-minimal4'}); "
            "use host_allocator=auto or glibc")
    return lib


def active_allocator() -> str:
    """The allocator this process runs on, read from its memory maps."""
    try:
        with open("/proc/self/maps") as fh:
            maps = fh.read()
    except OSError:
        return "system"
    for name in ("jemalloc", "tcmalloc"):
        if f"lib{name}" in maps:
            return name
    return "glibc"


def select_allocator(choice: str) -> str:
    """Make this process run on the allocator ``choice`` (see the module docstring).

    May replace the process image (``os.execv``) to preload the library and so never
    return; call it first thing in an entry point, before threads or process groups
    exist. Returns the allocator now active."""
    lib = check_allocator(choice)
    active = active_allocator()
    wanted = "jemalloc" if choice == "auto" else choice
    if lib is None or active == wanted or os.environ.get(_REEXEC_MARK):
        return active
    preload = os.environ.get("LD_PRELOAD", "")
    env = dict(os.environ, LD_PRELOAD=f"{lib}:{preload}" if preload else lib, **{_REEXEC_MARK: "1"})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), env)
    raise AssertionError("unreachable")  # pragma: no cover


__all__ = ["ALLOCATORS", "active_allocator", "check_allocator", "select_allocator"]
