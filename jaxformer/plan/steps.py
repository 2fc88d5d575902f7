"""The sharded train step and the engine's decode step, compiled for GPUs that are not here.

Everything is abstract: parameters, optimizer state, batch and KV cache are ShapeDtypeStructs laid
out by jaxformer.sharding on a mesh of compile-only devices (pallas_kernels.targets), so a Llama-3-8B
step for eight H100s compiles on a laptop. The step is the one training runs (train.step with the
run's optimizer) and the decode step the one the inference engine runs (infer.engine.decode_step).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxformer import sharding
from jaxformer.config import ModelConfig
from jaxformer.infer.engine import RowSettings, Slots, compiled_steps
from jaxformer.models import model_class
from jaxformer.models.cache import CACHE_AXES, KVCache
from jaxformer.plan.hlo import ModuleStats, analyze
from jaxformer.train.optim import make_optimizer
from jaxformer.train.step import lm_loss, make_train_step
from pallas_kernels.targets import GpuTarget, compiling_for

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


@dataclasses.dataclass
class StepCompile:
    """One step compiled for one topology: XLA's per-device memory and what its HLO does per device."""

    seconds: float
    arguments: int  # bytes per device (XLA memory analysis)
    outputs: int
    aliased: int  # outputs written into donated arguments
    temporaries: int  # activations, gradients in flight, workspaces
    generated_code: int
    state: dict[str, int]  # bytes per device of each argument group (params, optimizer, batch, cache, ...)
    xla_flops: float | None  # XLA's HloCostAnalysis of the optimized module (loop bodies counted once)
    xla_bytes_accessed: float | None
    hlo: ModuleStats

    @property
    def peak(self) -> int:
        """Bytes a device holds at the step's high-water mark: inputs, temporaries and non-aliased outputs."""
        return self.arguments + self.temporaries + self.outputs - self.aliased + self.generated_code


def shard_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard of each leaf)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * leaf.dtype.itemsize  # PRNG key dtypes too (threefry: 8 bytes)
    return total


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def abstract_params(cfg: ModelConfig, mesh: Mesh) -> tuple[nnx.GraphDef, Any, Any]:
    """(graphdef, parameters as sharded ShapeDtypeStructs, their shardings)."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: model_class(cfg)(cfg, rngs=nnx.Rngs(0))))
    shardings = sharding.param_shardings(params, mesh, cfg)
    return graphdef, _abstract(params, shardings), shardings


def compile_train(cfgs: dict[str, Any], mesh: Mesh, target: GpuTarget, hosts: int = 1) -> StepCompile:
    """The run's optimizer step (make_train_step over lm_loss, AdamW) compiled for `mesh`'s devices."""
    mcfg, dcfg, tcfg = cfgs["model"], cfgs["data"], cfgs["train"]
    tx = make_optimizer(tcfg)
    graphdef, params, p_sh = abstract_params(mcfg, mesh)
    opt_abstract = jax.eval_shape(tx.init, params)
    o_sh = sharding.shard_like(opt_abstract, params, p_sh, mesh)
    opt_state = _abstract(opt_abstract, o_sh)
    rows = sharding.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct((tcfg.batch_size, dcfg.seq_len), jnp.float32 if k == "loss_mask" else jnp.int32,
                                     sharding=rows) for k in BATCH_KEYS}
    loss = lm_loss(graphdef, packed=dcfg.packed, z_loss=tcfg.z_loss, loss_chunk=tcfg.loss_chunk)
    step = jax.jit(make_train_step(loss, tx, grad_accum=tcfg.grad_accum),
                   out_shardings=(p_sh, o_sh, None), donate_argnums=(0, 1))
    state = {"params": shard_bytes(params), "optimizer": shard_bytes(opt_state), "batch": shard_bytes(batch)}
    return _compile(step, (params, opt_state, batch), mesh, target, state, hosts)


def compile_decode(cfg: ModelConfig, mesh: Mesh, target: GpuTarget, batch: int, context: int,
                   hosts: int = 1) -> StepCompile:
    """The inference engine's one-token decode step for `batch` slots of `context` tokens, compiled for `mesh`."""
    graphdef, params, _ = abstract_params(cfg, mesh)
    leaves, state_def = jax.tree.flatten(params)
    _, decode = compiled_steps(graphdef, state_def)
    with jax.set_mesh(mesh):
        slots = jax.eval_shape(lambda: Slots(cache=KVCache.init(cfg, batch, context),
                                             history=jnp.zeros((batch, context), jnp.int32),
                                             prompt_len=jnp.zeros((batch,), jnp.int32),
                                             keys=jax.random.split(jax.random.key(0), batch),
                                             settings=RowSettings.neutral(batch)))
    layout = slots.cache.layout

    def place(x, axes=None):
        axes = axes or ("batch",) + (None,) * (len(x.shape) - 1)
        return NamedSharding(mesh, sharding.fitted_spec(axes, x.shape, mesh.shape))

    slot_sh = jax.tree.map(place, slots)
    slot_sh = dataclasses.replace(slot_sh, cache=slot_sh.cache.replace(
        k=tuple(place(x, CACHE_AXES[layout]) for x in slots.cache.k),
        v=tuple(place(x, CACHE_AXES[layout]) for x in slots.cache.v)))
    slots = _abstract(slots, slot_sh)
    active = jax.ShapeDtypeStruct((batch,), jnp.bool_, sharding=place(jax.ShapeDtypeStruct((batch,), jnp.bool_)))
    state = {"params": shard_bytes(leaves), "kv_cache": shard_bytes((slots.cache.k, slots.cache.v)),
             "slots": shard_bytes(slots) - shard_bytes((slots.cache.k, slots.cache.v))}
    return _compile(lambda *a: decode(*a, n_top=None), (leaves, slots, active), mesh, target, state, hosts)


def _compile(fn, args: tuple, mesh: Mesh, target: GpuTarget, state: dict[str, int], hosts: int) -> StepCompile:
    start = time.perf_counter()
    with jax.set_mesh(mesh), compiling_for(target):
        compiled = (fn if hasattr(fn, "lower") else jax.jit(fn)).lower(*args).compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    module = compiled.runtime_executable().hlo_modules()[0]
    n = mesh.devices.size
    return StepCompile(seconds=seconds, arguments=mem.argument_size_in_bytes, outputs=mem.output_size_in_bytes,
                       aliased=mem.alias_size_in_bytes, temporaries=mem.temp_size_in_bytes,
                       generated_code=mem.generated_code_size_in_bytes, state=state,
                       **_xla_cost(module), hlo=analyze(module.to_string(), n_devices=n, devices_per_host=n // hosts))


def _xla_cost(module) -> dict[str, float | None]:
    """XLA's HloCostAnalysis of the optimized per-device module (GPU executables do not offer it themselves;
    the analysis is backend-independent, so the CPU client runs it)."""
    try:
        from jax._src import xla_bridge
        from jax._src.lib import _jax

        cost = _jax.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), module)
        return {"xla_flops": float(cost.get("flops", 0.0)), "xla_bytes_accessed": float(cost.get("bytes accessed", 0))}
    except Exception:  # noqa: BLE001 - a private entry point: without it the plan still has the HLO walk
        return {"xla_flops": None, "xla_bytes_accessed": None}
