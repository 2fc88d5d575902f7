"""Runs in a subprocess with 8 fake CPU devices (XLA reads XLA_FLAGS once, at import).

usage: python tests/finetune_worker.py CONFIG.yaml OUT_DIR
  Fine-tunes the config on one device and on a data=2 x fsdp=2 x tensor=2 mesh into
  OUT_DIR/d1f1t1 and OUT_DIR/d2f2t2; writes OUT_DIR/report.json with, for the 2x2x2 mesh, every
  trainable and frozen parameter's PartitionSpec.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax
from flax import nnx

from jaxformer import sharding
from jaxformer.config import MeshConfig
from jaxformer.finetune import finetune, load_finetune_config
from jaxformer.finetune.task import init_finetune_state
from jaxformer.interop.auto import load_any
from jaxformer.train.optim import make_optimizer


def specs(cfgs, mesh) -> dict[str, dict]:
    with jax.set_mesh(mesh):
        _, state, frozen, _, _ = init_finetune_state(load_any(cfgs["sft"].base), cfgs["sft"].method, cfgs["lora"],
                                                     make_optimizer(cfgs["train"]), mesh, cfgs["train"].seed)
    out = {}
    for tree in (state["params"], *frozen):
        for path, var in nnx.to_flat_state(tree):
            leaf = var[...]
            spec = [list(e) if isinstance(e, tuple) else e for e in leaf.sharding.spec]
            out[".".join(map(str, path))] = {"spec": spec + [None] * (leaf.ndim - len(spec)),
                                             "shard": list(leaf.sharding.shard_shape(leaf.shape))}
    return out


def main() -> None:
    config, out = sys.argv[1], Path(sys.argv[2])
    report = {"devices": jax.device_count()}
    for d, f, t in ((1, 1, 1), (2, 2, 2)):
        base = load_finetune_config(config)
        cfgs = {**base, "mesh": MeshConfig(data=d, fsdp=f, tensor=t),
                "train": dataclasses.replace(base["train"], run_dir=str(out / f"d{d}f{f}t{t}"))}
        devices = jax.devices()[:d * f * t]
        if (d, f, t) != (1, 1, 1):
            report[f"{d},{f},{t}"] = specs(cfgs, sharding.make_mesh(cfgs["mesh"], devices=devices))
        finetune(cfgs, progress=False, devices=devices)
    (out / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
