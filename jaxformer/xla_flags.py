"""Process-wide XLA settings, applied when jaxformer is imported (before JAX starts a backend).

XLA:CPU hands dots and their neighbours to YNNPACK fusions by default. On this project's CPU train
step (the README's main job: 4 layers, width 256, batch 16 x 256) those fusions are slower than
XLA's own dot and loop emitters: turning them off makes the whole step about 1.25x faster
(`python bench/cpu_step.py` measures both in child processes and prints the ratio). The flag only
concerns the CPU backend; GPU and TPU runs are unaffected.

A user's own XLA_FLAGS setting of the same flag wins, and JAXFORMER_XLA_DEFAULTS=0 turns this off.
JAX reads XLA_FLAGS when it starts its first backend, so a program that already ran a JAX computation
before importing jaxformer keeps XLA's defaults.
"""

from __future__ import annotations

import os

CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)  # empty: no YNNPACK fusions on CPU


def apply_xla_defaults() -> str:
    """Append jaxformer's defaults to XLA_FLAGS (unless set there already or disabled); returns XLA_FLAGS."""
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("JAXFORMER_XLA_DEFAULTS", "1") != "0":
        missing = [f for f in CPU_FLAGS if f.split("=")[0] not in flags]
        if missing:
            flags = " ".join([flags, *missing]).strip()
            os.environ["XLA_FLAGS"] = flags
    return flags
