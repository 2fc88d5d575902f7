"""Runs in a subprocess with fake CPU devices (XLA reads XLA_FLAGS once, at import).

usage: python tests/sharding_worker.py CONFIG.yaml OUT_DIR MESH [MESH ...]
  MESH is "data,fsdp,tensor". Trains the config once per mesh into OUT_DIR/d{D}f{F}t{T}, and writes
  OUT_DIR/report.json: per mesh each parameter's PartitionSpec and per-device shard shape.
usage: python tests/sharding_worker.py --grads CONFIG.yaml OUT_DIR MESH
  The loss and every gradient of one random packed batch, at random weights (1-D ones moved away from
  their init), on one device and on MESH: OUT_DIR/grads.npz ("one/NAME", "mesh/NAME", "loss/one",
  "loss/mesh") and OUT_DIR/report.json (MESH's PartitionSpecs, as above).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxformer import sharding
from jaxformer.config import MeshConfig, load_config
from jaxformer.models import model_class
from jaxformer.train.lm import train
from jaxformer.train.optim import make_optimizer
from jaxformer.train.state import init_train_state
from jaxformer.train.step import lm_loss


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


def _name(path) -> str:
    return ".".join(str(k.key) for k in path if hasattr(k, "key"))


def random_batch(cfgs, seed: int = 0) -> dict[str, np.ndarray]:
    """A packed batch [B, T] of random tokens: two documents per row, positions restarting, some tokens unmasked."""
    B, T, V = cfgs["train"].batch_size, cfgs["data"].seq_len, cfgs["model"].vocab_size
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, (B, T + 1)).astype(np.int32)
    cut = rng.integers(T // 4, 3 * T // 4, B)[:, None]
    t = np.arange(T)[None, :]
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.where(t < cut, 1, 2).astype(np.int32),
            "positions": np.where(t < cut, t, t - cut).astype(np.int32),
            "loss_mask": (rng.random((B, T)) > 0.1).astype(np.float32)}


def loss_and_grads(cfgs, params, graphdef, batch, mesh) -> tuple[float, dict[str, np.ndarray], dict[str, list]]:
    """Mean token loss, its gradients and the params' PartitionSpecs, laid out on `mesh` by the logical-axis table."""
    loss = lm_loss(graphdef, packed=True, loss_chunk=cfgs["train"].loss_chunk)

    def mean_loss(p, b):
        _, (ce, n, *_) = loss(p, b, (), None)  # MoE models add their router metrics
        return ce / n

    with jax.set_mesh(mesh):
        p_sh = sharding.param_shardings(params, mesh, cfgs["model"])
        fn = jax.jit(jax.value_and_grad(mean_loss), out_shardings=(None, p_sh))
        laid_out = jax.device_put(params, p_sh)
        value, grads = fn(laid_out, sharding.global_batch(batch, mesh))
    flat = jax.tree_util.tree_flatten_with_path
    specs = {_name(k): [list(e) if isinstance(e, tuple) else e for e in v.sharding.spec] + [None] * (v.ndim - len(
        v.sharding.spec)) for k, v in flat(laid_out)[0]}
    return float(value), {_name(k): np.asarray(v) for k, v in flat(grads)[0]}, specs


def grads_main(config: str, out: Path, mesh_text: str) -> None:
    cfgs = load_config(config)
    graphdef, params = nnx.split(model_class(cfgs["model"])(cfgs["model"], rngs=nnx.Rngs(0)), nnx.Param)
    rng = np.random.default_rng(1)  # norm weights and biases away from their init (zeros / ones)
    params = jax.tree.map(lambda p: p + 0.3 * rng.standard_normal(p.shape).astype(p.dtype) if p.ndim == 1 else p,
                          params)
    batch = random_batch(cfgs)
    d, f, t = (int(x) for x in mesh_text.split(","))
    one = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), cfgs["model"], devices=jax.devices()[:1])
    mesh = sharding.make_mesh(MeshConfig(data=d, fsdp=f, tensor=t), cfgs["model"])
    loss_one, g_one, _ = loss_and_grads(cfgs, params, graphdef, batch, one)
    loss_mesh, g_mesh, specs = loss_and_grads(cfgs, params, graphdef, batch, mesh)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "grads.npz", **{"loss/one": loss_one, "loss/mesh": loss_mesh},
             **{f"one/{k}": v for k, v in g_one.items()}, **{f"mesh/{k}": v for k, v in g_mesh.items()})
    (out / "report.json").write_text(json.dumps({"devices": jax.device_count(), mesh_text: specs}))


def main() -> None:
    if sys.argv[1] == "--grads":
        return grads_main(sys.argv[2], Path(sys.argv[3]), sys.argv[4])
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
