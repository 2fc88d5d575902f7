"""Every test session: without an NVIDIA driver, JAX runs on CPU only (JAX_PLATFORMS=cpu).

With the gpu-compile extra installed, JAX's CUDA plugin would otherwise try to start a GPU client, fail,
and log a traceback; with jax_platforms="cpu" it only registers the compiler that tests/gpu uses to
build cubins for H100/A100 without the hardware. Where a driver exists nothing changes (pytest -m gpu).
Set here, before any test imports JAX, and inherited by the subprocesses tests start.
"""

import os
from pathlib import Path

if not Path("/proc/driver/nvidia/version").exists():
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each test module, drop JAX's caches of traced and compiled programs: a pytest worker runs hundreds of
    modules, and the suite's two long-lived workers otherwise keep every executable they ever compiled (a worker
    crashed with a segfault inside XLA's CPU compiler near the end of the suite, 98% in, on a test that passes
    alone)."""
    yield
    import jax

    jax.clear_caches()
    gc.collect()
