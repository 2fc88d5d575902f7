"""Where jaxformer's MoE block spends its time on XLA:CPU: a jax.profiler trace of the forward + backward of
bench/moe_throughput.py's block, XLA's thunk events summed by kind (matmuls, zero-filled buffers, copies, ...).

Times are summed over XLA's threads (two workers plus the caller), so they add up to more than the wall time;
containers (`while` loops, the executor itself) are left out. The last line is one JSON object.

    python bench/moe_profile.py [--family mixtral] [--steps 10]
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
from jax._src.lib import _profile_data

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moe_throughput  # noqa: E402 - the bench's blocks and runner

KINDS = {"ynn_fusion": "matmul (YNNPACK)", "dot": "matmul (XLA)", "broadcast": "zero-filled buffer",
         "copy": "copy", "gather": "gather", "scatter": "scatter", "sort": "sort", "select": "masked rows",
         "dynamic-slice": "row / weight slices", "dynamic-update-slice": "row writes"}


def kind(event: str) -> str | None:
    if "Execute" in event or "Await" in event or event.startswith("while"):
        return None  # the executor and loops contain the events below
    name = re.sub(r"[._]\d+$", "", event)
    for key, label in KINDS.items():
        if key in name.replace("dot_general", "dot"):
            return label
    return "other elementwise"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="mixtral", choices=["mixtral", "deepseek_v3", "gpt_oss"])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    _, moe, _ = moe_throughput.blocks(args.family, 256, 512, 8, 2)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.tokens // moe_throughput.SEQ, moe_throughput.SEQ, 256)).astype(np.float32)
    run = moe_throughput.jax_runner(moe, x, rng.standard_normal(x.shape).astype(np.float32))
    for _ in range(3):
        run()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        for _ in range(args.steps):
            run()
        jax.profiler.stop_trace()
        trace = _profile_data.ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
        totals = collections.Counter()
        for plane in trace.planes:
            for line in plane.lines:
                if line.name == "python":
                    continue
                for event in line.events:
                    label = kind(event.name)
                    if label:
                        totals[label] += event.duration_ns / 1e6 / args.steps
    print(f"{args.family} block, fwd + bwd, ms per step summed over XLA's threads; load {load_before} -> "
          f"{os.getloadavg()}")
    for label, ms in totals.most_common():
        print(f"  {label:22s} {ms:7.1f}")
    print(json.dumps({"family": args.family, "ms_per_step": {k: round(v, 2) for k, v in totals.most_common()},
                      "loadavg_before": [round(v, 2) for v in load_before]}))


if __name__ == "__main__":
    main()
