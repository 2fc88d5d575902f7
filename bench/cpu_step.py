"""The main job's train step on XLA:CPU: its defaults vs without YNNPACK fusions vs malloc in huge pages.

  python bench/cpu_step.py                  # tiny_code preset: 4 layers, width 128, batch 16 x 256
  python bench/cpu_step.py --quick          # a smaller model, fewer repeats: proves the script runs

Each setting runs in its own child process (XLA reads its flags once, when its backend starts; glibc its
tunables when the process starts): the jitted step (AdamW, donated buffers) on a fixed random packed batch is
compiled, warmed up, then timed --steps times; the processes alternate --rounds times so that a busy moment of the
machine falls on all. Settings: `xla_defaults` (no XLA_FLAGS, glibc's defaults: the baseline), `no_ynn_fusions`,
and `malloc_hugepages` (GLIBC_TUNABLES=glibc.malloc.hugetlb=1: what the `jaxformer` command runs with where
jaxformer/runtime.py finds it helps). Reported: median step time and tokens/s per setting, the (min, max) of the
per-round medians, each setting's speed relative to the baseline, and the load average before and after. The last
line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NO_YNN = "--xla_cpu_experimental_ynn_fusion_type="  # empty: no YNNPACK fusions
SETTINGS = {"xla_defaults": {}, "no_ynn_fusions": {"XLA_FLAGS": NO_YNN},  # name -> environment changes
            "malloc_hugepages": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}}
BASELINE = {"XLA_FLAGS": "", "GLIBC_TUNABLES": "", "JAXFORMER_HUGEPAGES": "0"}  # every setting starts from this


def child(args) -> None:
    """Time the step in this process; print one JSON line {median_s, tokens, xla_flags}."""
    sys.path.insert(0, str(ROOT))
    from jaxformer.config import MeshConfig, load_config
    from jaxformer.sharding import make_mesh
    from jaxformer.train.optim import make_optimizer
    from jaxformer.train.state import init_train_state
    from jaxformer.train.step import lm_loss, make_train_step

    import jax
    import numpy as np

    cfgs = load_config(args.config, args.overrides)
    m, d, t = cfgs["model"], cfgs["data"], cfgs["train"]
    B, T = t.batch_size, d.seq_len
    rng = np.random.default_rng(0)
    tok = rng.integers(0, m.vocab_size, (B, T + 1)).astype(np.int32)
    batch = {"inputs": tok[:, :-1], "targets": tok[:, 1:],
             "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
             "segment_ids": np.sort(rng.integers(1, 4, (B, T)), axis=1).astype(np.int32),
             "loss_mask": np.ones((B, T), np.float32)}
    mesh = make_mesh(MeshConfig(1, 1, 1), m, jax.devices()[:1])
    with jax.set_mesh(mesh):
        tx = make_optimizer(t)
        graphdef, state, _ = init_train_state(m, tx, mesh, 0)
        loss = lm_loss(graphdef, packed=d.packed, z_loss=t.z_loss, loss_chunk=t.loss_chunk)
        step = jax.jit(make_train_step(loss, tx), donate_argnums=(0, 1))
        p, o, b = state["params"], state["opt_state"], jax.device_put(batch)
        for _ in range(2):
            p, o, metrics = step(p, o, b)
            jax.block_until_ready(metrics)
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            p, o, metrics = step(p, o, b)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
    print(json.dumps({"median_s": statistics.median(times), "tokens": B * T}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="tiny_code")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=5, help="alternating child processes per setting (>= 5)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args, overrides = ap.parse_known_args()
    args.overrides = overrides
    if args.child:
        return child(args)
    if args.quick:
        args.steps, args.rounds = 2, 5
        args.overrides += ["--model.d_model=64", "--model.n_heads=4", "--model.n_kv_heads=2", "--model.d_ff=128",
                           "--train.batch_size=4"]
    if args.rounds < 5:
        ap.error("--rounds must be at least 5")
    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    load_before = os.getloadavg()  # a figure counts only while the load stays under the core count
    for _ in range(args.rounds):
        for name, env in SETTINGS.items():
            cmd = [sys.executable, __file__, "--child", "--config", args.config, "--steps", str(args.steps),
                   *args.overrides]
            out = subprocess.run(cmd, env={**os.environ, **BASELINE, **env}, capture_output=True, text=True,
                                 check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    result: dict = {"config": args.config, "overrides": args.overrides, "cpus": os.cpu_count(),
                    "loadavg_before": [round(v, 2) for v in load_before],
                    "loadavg_after": [round(v, 2) for v in os.getloadavg()]}
    for name, rs in runs.items():
        medians = [r["median_s"] for r in rs]
        med = statistics.median(medians)
        result[name] = {"step_s": med, "tokens_per_s": rs[0]["tokens"] / med, "min_s": min(medians),
                        "max_s": max(medians), "env": SETTINGS[name]}
        print(f"{name:20s} step {med * 1000:7.0f} ms [{min(medians) * 1000:.0f}-{max(medians) * 1000:.0f}]  "
              f"{rs[0]['tokens'] / med:8.0f} tok/s  {SETTINGS[name] or 'defaults'}")
    for name in SETTINGS:
        result[name]["speed_vs_defaults"] = round(result["xla_defaults"]["step_s"] / result[name]["step_s"], 3)
    print(f"step speed vs the defaults: without YNNPACK fusions x{result['no_ynn_fusions']['speed_vs_defaults']:.2f}, "
          f"malloc in huge pages x{result['malloc_hugepages']['speed_vs_defaults']:.2f}; load average before "
          f"{result['loadavg_before']}, after {result['loadavg_after']} ({os.cpu_count()} cores)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
