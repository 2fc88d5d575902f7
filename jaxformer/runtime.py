"""Process settings the `jaxformer` command starts with: transparent huge pages for malloc.

XLA:CPU allocates each step's temporaries with malloc (the tiny_code train step: 425 MiB of them). In 4 KiB pages
that working set misses the TLB on every pass; glibc (2.35 and later) asks the kernel for 2 MiB transparent huge
pages when its `glibc.malloc.hugetlb=1` tunable is set, and the train step then runs 1.2-1.3x faster on the
development machine (`python bench/cpu_step.py`, bench/RESULTS.md). Tunables are read when a process starts, so
the command re-executes itself once with the tunable added to GLIBC_TUNABLES, before JAX is imported. It does so
only where it helps: Linux with glibc >= 2.35 and the kernel's transparent huge pages in "madvise" mode (in
"always" mode every large mapping gets them already; in "never" mode none can). JAXFORMER_HUGEPAGES=0 turns it off.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_REEXEC = "JAXFORMER_HUGEPAGES_SET"  # marks the re-executed process (never a second time)


def thp_mode(path: Path = THP_MODE) -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), or None where there is none."""
    try:
        text = path.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def glibc_version() -> tuple[int, ...] | None:
    """This process's glibc version, or None under another C library."""
    try:
        lib, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
    except (AttributeError, OSError, ValueError):  # no confstr (not POSIX), not glibc, an unexpected answer
        return None
    return tuple(int(p) for p in version.split(".") if p.isdigit()) if lib == "glibc" else None


def hugepage_env(environ: Mapping[str, str], glibc: tuple[int, ...] | None, mode: str | None
                 ) -> dict[str, str] | None:
    """The environment to re-execute with so that malloc uses transparent huge pages, or None: the user turned
    it off (JAXFORMER_HUGEPAGES=0), it is set already (or this is the re-executed process), glibc is missing or
    older than 2.35, or the kernel's mode is not "madvise"."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if (environ.get("JAXFORMER_HUGEPAGES", "1") == "0" or _REEXEC in environ or "glibc.malloc.hugetlb" in tunables
            or glibc is None or glibc < (2, 35) or mode != "madvise"):
        return None
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}" if tunables else TUNABLE, _REEXEC: "1"}


def reexec_with_hugepages() -> None:
    """Replace this process by the same command line with huge pages on, where hugepage_env says so (returns
    otherwise). Call first thing in a command's main, before JAX or anything that allocates much is imported."""
    env = hugepage_env(os.environ, glibc_version(), thp_mode())
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
