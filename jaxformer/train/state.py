"""Train state creation on a mesh: params born sharded, optimizer state sharded like its params."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxformer import sharding
from jaxformer.config import ModelConfig
from jaxformer.models import model_class


class TrainState(NamedTuple):
    graphdef: nnx.GraphDef
    state: dict[str, Any]  # params, opt_state, rng (key data)
    shardings: dict[str, Any]  # the same tree of NamedShardings


def init_train_state(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, seed: int) -> TrainState:
    """Parameters are created directly in their sharded layout (never whole on one device)."""
    model_cls = model_class(cfg)
    graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(seed))))
    p_sh = sharding.param_shardings(abstract_params, mesh, cfg)
    params = jax.jit(lambda: nnx.split(model_cls(cfg, rngs=nnx.Rngs(seed)))[1], out_shardings=p_sh)()
    o_sh = sharding.shard_like(jax.eval_shape(tx.init, params), abstract_params, p_sh, mesh)
    opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)
    replicated = NamedSharding(mesh, PartitionSpec())
    rng = jax.device_put(jax.random.key_data(jax.random.key(seed)), replicated)
    return TrainState(graphdef, {"params": params, "opt_state": opt_state, "rng": rng},
                      {"params": p_sh, "opt_state": o_sh, "rng": replicated})


def gather_to_host(tree: Any) -> Any:
    """Every array of a (possibly multi-process, sharded) tree as full numpy arrays on every host."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)
