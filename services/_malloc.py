"""glibc malloc tuning for every ``rlaif`` process: the environment, and the re-exec that applies it.

Standard library only: :mod:`services._entry` runs this before any other import, so a command that re-executes
itself pays for nothing twice.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

# glibc's malloc hands every block over 32 MiB (and, in a worker thread, every block its arena cannot hold)
# straight to mmap and back to the kernel on free, so each learner step faults in its (tokens x vocab)
# logits, their softmax and their gradients (126 MB each for 16 rollouts) page by page again, and fresh pages
# are slow on these VMs (up to 1.5 ms/MB). One arena, no mmap, no trimming: freed memory stays with the
# process and the next step reuses it; RSS stays at a step's high-water mark. `rlaif bench compute` measures
# both allocators side by side (docs/benchmarks.md).
TUNED_MALLOC = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def tuned_malloc_env(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment this process should be re-executed with for :data:`TUNED_MALLOC`, or None: not glibc,
    ``RLAIF_TUNE_MALLOC=0``, or some ``MALLOC_*`` setting of ours already present (the user's choice, or the
    re-executed process itself).

    >>> tuned_malloc_env({"RLAIF_TUNE_MALLOC": "0"}) is None, tuned_malloc_env({"MALLOC_ARENA_MAX": "4"}) is None
    (True, True)
    """
    if environ.get("RLAIF_TUNE_MALLOC", "1").strip().lower() in {"0", "false", "no", "off"}:
        return None
    if any(name in environ for name in TUNED_MALLOC) or not _glibc():
        return None
    return {**environ, **TUNED_MALLOC}


def reexec_with_tuned_malloc() -> None:
    """Replace this process (same pid, same arguments) by one whose malloc runs with :data:`TUNED_MALLOC`.

    glibc reads these settings once, before the first allocation, and ``mallopt`` later does not move the
    arenas threads already hold (measured: no gain), so the only reliable way in is the environment at exec.
    Children inherit it.
    """
    env = tuned_malloc_env(os.environ)
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError):
        return False
