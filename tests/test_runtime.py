"""jaxformer/runtime.py: when the `jaxformer` command re-executes itself with malloc in transparent huge pages."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from jaxformer import runtime

GLIBC = (2, 36)


@pytest.mark.parametrize("environ, glibc, mode, tunables", [
    ({}, GLIBC, "madvise", "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC, "madvise",
     "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),  # appended to the user's tunables
    ({}, (2, 35), "madvise", "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, "madvise", None),  # the user's own choice stands
    ({"JAXFORMER_HUGEPAGES": "0"}, GLIBC, "madvise", None),  # turned off
    ({"JAXFORMER_HUGEPAGES_SET": "1"}, GLIBC, "madvise", None),  # the re-executed process: never twice
    ({}, (2, 31), "madvise", None),  # glibc without the tunable
    ({}, None, "madvise", None),  # another C library
    ({}, GLIBC, "always", None),  # every large mapping has huge pages already
    ({}, GLIBC, "never", None),
    ({}, GLIBC, None, None),  # no transparent huge pages in this kernel
])
def test_hugepage_env(environ, glibc, mode, tunables):
    env = runtime.hugepage_env({"PATH": "/bin", **environ}, glibc, mode)
    if tunables is None:
        assert env is None
    else:
        assert env["GLIBC_TUNABLES"] == tunables and env["PATH"] == "/bin" and env["JAXFORMER_HUGEPAGES_SET"] == "1"


def test_thp_mode_reads_the_bracketed_mode(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert runtime.thp_mode(f) == "madvise"
    f.write_text("[always] madvise never\n")
    assert runtime.thp_mode(f) == "always"
    assert runtime.thp_mode(tmp_path / "missing") is None


def test_reexec_keeps_the_command_line_and_sets_the_tunable_once():
    """A process calling reexec_with_hugepages comes back (once) with its own arguments and, where this machine
    qualifies, the tunable; with JAXFORMER_HUGEPAGES=0 it runs on unchanged."""
    code = ("import os, sys; from jaxformer import runtime; print('start', flush=True); "
            "runtime.reexec_with_hugepages(); print(sys.argv[1:], os.environ.get('GLIBC_TUNABLES'))")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAXFORMER_HUGEPAGES_SET")}
    qualifies = runtime.hugepage_env(env, runtime.glibc_version(), runtime.thp_mode()) is not None
    for extra, reexec in (({}, qualifies), ({"JAXFORMER_HUGEPAGES": "0"}, False)):
        out = subprocess.run([sys.executable, "-c", code, "a b", "--c=1"], env={**env, **extra}, capture_output=True,
                             text=True, check=True).stdout.splitlines()
        assert out.count("start") == (2 if reexec else 1), out
        assert out[-1] == f"['a b', '--c=1'] {'glibc.malloc.hugetlb=1' if reexec else None}"
