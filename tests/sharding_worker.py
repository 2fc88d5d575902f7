"""Runs in a subprocess with fake CPU devices (XLA reads XLA_FLAGS once, at import).

usage: python tests/sharding_worker.py CONFIG.yaml OUT_DIR MESH [MESH ...]
  MESH is "data,fsdp,tensor". Trains the config once per mesh into OUT_DIR/d{D}f{F}t{T}, and writes
  OUT_DIR/report.json: per mesh each parameter's PartitionSpec and per-device shard shape.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax

from jaxformer import sharding
from jaxformer.config import MeshConfig, load_config
from jaxformer.train.lm import train
from jaxformer.train.optim import make_optimizer
from jaxformer.train.state import init_train_state


def param_specs(cfgs, mesh) -> dict[str, list]:
    with jax.set_mesh(mesh):
        _, state, _ = init_train_state(cfgs["model"], make_optimizer(cfgs["train"]), mesh, 0)
    specs = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state["params"])[0]:
        name = ".".join(str(k.key) for k in path if hasattr(k, "key"))
        spec = [list(e) if isinstance(e, tuple) else e for e in leaf.sharding.spec]
        specs[name] = {"spec": spec + [None] * (leaf.ndim - len(spec)), "shape": list(leaf.shape),
                       "shard": list(leaf.sharding.shard_shape(leaf.shape))}
    return specs


def main() -> None:
    config, out = sys.argv[1], Path(sys.argv[2])
    report = {"devices": jax.device_count()}
    for text in sys.argv[3:]:
        d, f, t = (int(x) for x in text.split(","))
        base = load_config(config)
        cfgs = {**base, "mesh": MeshConfig(data=d, fsdp=f, tensor=t),
                "train": dataclasses.replace(base["train"], run_dir=str(out / f"d{d}f{f}t{t}"))}
        mesh = sharding.make_mesh(cfgs["mesh"], cfgs["model"])
        report[text] = param_specs(cfgs, mesh)
        train(cfgs, progress=False)
    (out / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
