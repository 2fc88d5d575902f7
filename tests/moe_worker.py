"""Expert parallelism on 8 fake CPU devices, in one subprocess (XLA reads XLA_FLAGS once, at import).

usage: XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/moe_worker.py OUT.json
For a tiny MoE model (2 sparse layers, 8 experts, top-2) and each mesh of MESHES, against one device: the
training objective (cross-entropy + aux + z loss) and the largest relative gradient error, the per-device
bytes of each expert weight, the compiled step's all-gather / all-to-all result shapes. For the capacity
mode on expert=8: the block's output and dropped fraction against moe.py's one-device path on each
device's own tokens (one GShard group per device).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys

import jax
import numpy as np
from flax import nnx

from jaxformer import sharding
from jaxformer.config import MeshConfig, ModelConfig
from jaxformer.models import DecoderLM
from jaxformer.models.moe import MoE
from jaxformer.train.step import lm_loss

MESHES = {"expert8": MeshConfig(expert=8), "expert2_fsdp2_tensor2": MeshConfig(expert=2, fsdp=2, tensor=2)}
CFG = ModelConfig.llama(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32,
                        n_experts=8, n_experts_per_token=2, router_aux_loss_coef=0.02, router_z_loss_coef=0.001)
B, T = 8, 16


def _name(path) -> str:
    return ".".join(str(k.key) for k in path if hasattr(k, "key"))


def _batch(rng) -> dict[str, np.ndarray]:
    tokens = rng.integers(0, CFG.vocab_size, (B, T + 1)).astype(np.int32)
    t = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((B, T), np.int32),
            "positions": np.ascontiguousarray(t), "loss_mask": (rng.random((B, T)) > 0.1).astype(np.float32)}


def _collectives(hlo: str, op: str) -> list[list[int]]:
    """The first result shape of every `op` (sync or async start) in compiled HLO text."""
    found = re.findall(rf"= \(?\w+\[([\d,]*)\][^\n]*? {op}(?:-start)?\(", hlo)
    return [[int(d) for d in dims.split(",") if d] for dims in found]


def model_case(params, graphdef, batch, mesh, cfg: ModelConfig = CFG) -> dict:
    """Objective, gradients, per-device expert bytes and collectives of one train-step gradient on `mesh`."""
    loss = lm_loss(graphdef, packed=True)

    def objective(p, b):
        value, (_, n, _) = loss(p, b, (), None)
        return value / n

    with jax.set_mesh(mesh):
        p_sh = sharding.param_shardings(params, mesh, cfg)
        fn = jax.jit(jax.value_and_grad(objective), out_shardings=(None, p_sh))
        laid_out = jax.device_put(params, p_sh)
        gb = sharding.global_batch(batch, mesh)
        hlo = fn.lower(laid_out, gb).compile().as_text()
        value, grads = fn(laid_out, gb)
    flat = jax.tree_util.tree_flatten_with_path
    expert_bytes = {_name(k): [v.addressable_shards[0].data.nbytes, v.nbytes] for k, v in flat(laid_out)[0]
                    if ".experts." in _name(k)}
    return {"loss": float(value), "grads": {_name(k): np.asarray(v) for k, v in flat(grads)[0]},
            "expert_bytes": expert_bytes, "all_gather": _collectives(hlo, "all-gather"),
            "all_to_all": _collectives(hlo, "all-to-all")}


def capacity_case(rng) -> dict:
    """Capacity factor 1 on expert=8 vs the one-device block on each device's row (its GShard group)."""
    cfg = CFG.replace(capacity_factor=1.0)
    block = MoE(cfg, rngs=nnx.Rngs(3))
    x = rng.standard_normal((B, T, cfg.d_model)).astype(np.float32)

    def run(b, x):
        stats = []
        return b(x, stats), stats[0]["dropped"]

    one = [run(block, x[i:i + 1]) for i in range(B)]  # no mesh: moe.py's own capacity path
    mesh = sharding.make_mesh(MESHES["expert8"], cfg)
    graphdef, state = nnx.split(block)
    with jax.set_mesh(mesh):
        y, dropped = jax.jit(lambda s, x: run(nnx.merge(graphdef, s), x))(state, sharding.global_batch({"x": x},
                                                                                                       mesh)["x"])
    ref = np.concatenate([np.asarray(o[0]) for o in one])
    return {"max_abs_diff": float(np.abs(np.asarray(y) - ref).max()), "max_abs": float(np.abs(ref).max()),
            "dropped": float(dropped), "dropped_ref": float(np.mean([float(o[1]) for o in one]))}


def few_rows_case(rng) -> dict:
    """3 rows of T tokens on expert=8 (fewer rows than the batch axes: dispatched over tokens, as a server does with
    one prompt) against the block on one device (dropless: no grouping difference)."""
    block = MoE(CFG, rngs=nnx.Rngs(4))
    x = rng.standard_normal((3, T, CFG.d_model)).astype(np.float32)
    ref = np.asarray(block(x, []))
    graphdef, state = nnx.split(block)
    with jax.set_mesh(sharding.make_mesh(MESHES["expert8"], CFG)):
        y = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, []))(state, x)
    return {"max_abs_diff": float(np.abs(np.asarray(y) - ref).max()), "max_abs": float(np.abs(ref).max())}


def block_on_expert_fsdp_tensor(cfg: ModelConfig, graphdef, params, rng) -> dict:
    """A MoE block's output and the gradient of every parameter on expert 2 x fsdp 2 x tensor 2 against one device."""
    x = rng.standard_normal((B, T, cfg.d_model)).astype(np.float32)
    r = rng.standard_normal((B, T, cfg.d_model)).astype(np.float32)

    def objective(p, x):
        y = nnx.merge(graphdef, p)(x, [])
        return (y * r).sum(), y

    one_value, one_grads = jax.value_and_grad(objective, has_aux=True)(params, x)
    mesh = sharding.make_mesh(MESHES["expert2_fsdp2_tensor2"], cfg)
    with jax.set_mesh(mesh):
        p_sh = sharding.param_shardings(params, mesh, cfg)
        value, grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(jax.device_put(params, p_sh),
                                                                           sharding.global_batch({"x": x}, mesh)["x"])
    y, y1 = np.asarray(value[1]), np.asarray(one_value[1])
    flat = lambda t: {_name(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(t)[0]}  # noqa: E731
    g, g1 = flat(grads), flat(one_grads)
    rel = {k: float(np.abs(g[k] - v).max() / max(np.abs(v).max(), 1e-30)) for k, v in g1.items()}
    return {"max_abs_diff": float(np.abs(y - y1).max()), "max_abs": float(np.abs(y1).max()),
            "max_grad_rel": max(rel.values()), "worst": max(rel, key=rel.get), "names": sorted(rel)}


def biased_case(rng) -> dict:
    """gpt-oss's experts (router, gate/up/down biases, the clamped GLU) on expert 2 x fsdp 2 x tensor 2 against one
    device: the block's output and the gradients of every parameter (the biases split like their weights)."""
    cfg = CFG.replace(use_bias=True, moe=dataclasses.replace(CFG.moe, swiglu_limit=1.5))
    graphdef, params = nnx.split(MoE(cfg, rngs=nnx.Rngs(5)), nnx.Param)
    params = jax.tree.map(lambda p: p + 0.5 * rng.standard_normal(p.shape).astype(p.dtype), params)  # biases != 0
    return block_on_expert_fsdp_tensor(cfg, graphdef, params, rng)


def deepseek_case(rng) -> dict:
    """The deepseek router (sigmoid, correction bias, 2 of 4 groups, scaled, a shared expert) on expert=8 against one
    device: the block's output."""
    cfg = CFG.replace(moe=dataclasses.replace(CFG.moe, router="deepseek", n_group=4, topk_group=2,
                                              routed_scaling_factor=2.5, shared_d_ff=16))
    graphdef, params = nnx.split(MoE(cfg, rngs=nnx.Rngs(6)), nnx.Param)
    params = jax.tree.map(lambda p: p + 0.3 * rng.standard_normal(p.shape).astype(p.dtype), params)
    x = rng.standard_normal((B, T, cfg.d_model)).astype(np.float32)
    run = lambda p, x: nnx.merge(graphdef, p)(x, [])  # noqa: E731
    ref = np.asarray(run(params, x))
    mesh = sharding.make_mesh(MESHES["expert8"], cfg)
    with jax.set_mesh(mesh):
        y = np.asarray(jax.jit(run)(jax.device_put(params, sharding.param_shardings(params, mesh, cfg)),
                                    sharding.global_batch({"x": x}, mesh)["x"]))
    return {"max_abs_diff": float(np.abs(y - ref).max()), "max_abs": float(np.abs(ref).max())}


# DeepSeek-V3 in small: latent attention (rank-12 queries, rank-16 latent, 4 rotated dims, 8-wide values), layer 0
# dense, then the deepseek router over 2 of 4 groups with a shared expert
DEEPSEEK = ModelConfig.llama(vocab_size=128, d_model=32, n_layers=3, n_heads=4, head_dim=12, d_ff=64, max_seq_len=32,
                             latent=dict(kv_rank=16, q_rank=12, rope_dim=4, v_head_dim=8),
                             moe=dict(n_experts=8, n_experts_per_token=2, d_ff=16, shared_d_ff=16, router="deepseek",
                                      n_group=4, topk_group=2, routed_scaling_factor=2.5, dense_layers=(0,),
                                      aux_loss_coef=0.02))


def deepseek_model_case(rng, batch) -> dict:
    """A DeepSeek-V3-like model's objective and every gradient on each mesh of MESHES against one device."""
    graphdef, params = nnx.split(DecoderLM(DEEPSEEK, rngs=nnx.Rngs(8)), nnx.Param)
    params = jax.tree.map(lambda p: p + 0.3 * rng.standard_normal(p.shape).astype(p.dtype), params)
    one = model_case(params, graphdef, batch, sharding.make_mesh(MeshConfig(), DEEPSEEK, devices=jax.devices()[:1]),
                     DEEPSEEK)
    out = {"one_loss": one["loss"], "names": sorted(one["grads"])}
    for label, mc in MESHES.items():
        r = model_case(params, graphdef, batch, sharding.make_mesh(mc, DEEPSEEK), DEEPSEEK)
        rel = {k: float(np.abs(r["grads"][k] - g).max() / max(np.abs(g).max(), 1e-30)) for k, g in one["grads"].items()}
        out[label] = {"loss": r["loss"], "max_grad_rel": max(rel.values()), "worst": max(rel, key=rel.get)}
    return out


def llama4_case(rng) -> dict:
    """Llama 4's router (top-1 by logit, its sigmoid on the expert's input) with a shared expert on expert 2 x fsdp 2
    x tensor 2 against one device: the block's output and every parameter's gradient."""
    cfg = CFG.replace(moe=dataclasses.replace(CFG.moe, router="llama4", n_experts_per_token=1, shared_d_ff=16))
    graphdef, params = nnx.split(MoE(cfg, rngs=nnx.Rngs(7)), nnx.Param)
    params = jax.tree.map(lambda p: p + 0.3 * rng.standard_normal(p.shape).astype(p.dtype), params)  # O(1) outputs
    return block_on_expert_fsdp_tensor(cfg, graphdef, params, rng)


def error_case(cfg: ModelConfig, rows: int) -> str:
    """The error a misfit expert-parallel block raises while tracing (expert=8), or "" if none."""
    block = MoE(cfg, rngs=nnx.Rngs(0))
    with jax.set_mesh(sharding.make_mesh(MESHES["expert8"], cfg)):
        try:
            jax.eval_shape(block, jax.ShapeDtypeStruct((rows, T, cfg.d_model), np.float32))
        except ValueError as e:
            return str(e)
    return ""


def main() -> None:
    rng = np.random.default_rng(0)
    graphdef, params = nnx.split(DecoderLM(CFG, rngs=nnx.Rngs(0)), nnx.Param)
    params = jax.tree.map(lambda p: p + 0.3 * rng.standard_normal(p.shape).astype(p.dtype) if p.ndim == 1 else p,
                          params)  # norm weights away from their init
    batch = _batch(rng)
    one = model_case(params, graphdef, batch, sharding.make_mesh(MeshConfig(), CFG, devices=jax.devices()[:1]))
    report = {"devices": jax.device_count(), "one_loss": one["loss"], "routed_rows": [2, B * T, CFG.d_model],
              "expert_shapes": {k: list(v.shape) for k, v in one["grads"].items() if ".experts." in k}}
    for label, mc in MESHES.items():
        r = model_case(params, graphdef, batch, sharding.make_mesh(mc, CFG))
        rel = {k: float(np.linalg.norm(r["grads"][k] - g) / max(np.linalg.norm(g), 1e-30))
               for k, g in one["grads"].items()}
        report[label] = {"loss": r["loss"], "max_grad_rel": max(rel.values()), "worst": max(rel, key=rel.get),
                         "n_grads": len(rel), "expert_bytes": r["expert_bytes"], "all_gather": r["all_gather"],
                         "all_to_all": r["all_to_all"]}
    report["capacity"] = capacity_case(rng)
    report["few_rows"] = few_rows_case(rng)
    report["biased"] = biased_case(rng)
    report["deepseek"] = deepseek_case(rng)
    report["llama4"] = llama4_case(rng)
    report["deepseek_model"] = deepseek_model_case(rng, batch)
    report["errors"] = {"experts": error_case(CFG.replace(n_experts=4), B)}
    with open(sys.argv[1], "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
