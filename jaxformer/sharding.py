"""The only module that knows about device meshes.

Model code names axes logically (params carry `logical_axes` metadata; activations call
`constrain(x, ("batch", "seq", "act_embed"))`). RULES maps each logical name onto the mesh axes
("data", "fsdp", "expert", "context", "tensor"). The mesh uses Auto axis types (GSPMD): XLA propagates shardings from
the parameter layouts and these constraints, and inserts the collectives.

Tensor parallelism is Megatron-style because of how the names fall: q/k/v and gate/up have their
output dim on "heads"/"kv_heads"/"mlp" (column-parallel), o/down their input dim (row-parallel),
the embedding and LM head their vocab dim (vocab-parallel). FSDP shards every parameter's "embed"
dim over "fsdp"; the batch is split over ("data", "fsdp", "expert").

Expert parallelism: expert weights carry an "expert" logical axis on their expert dim, split over
the "expert" mesh axis; outside the MoE blocks that axis is one more data-parallel axis (it splits
the batch), so no device idles on the dense layers. Context parallelism: activations' "seq" axis is
split over "context"; parameters' "embed" dim is split over ("fsdp", "context"), so the devices of a ring
hold 1/C of the parameters each (they are gathered per layer, as FSDP gathers them).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxformer.config import MeshConfig, ModelConfig

MESH_AXES = ("data", "fsdp", "expert", "context", "tensor")  # outermost to innermost (tensor: fastest links)

# axes a multi-axis rule uses only where the mesh has them (> 1): without them a spec reads as before
OPTIONAL_AXES = ("context",)

# logical axis -> mesh axis (or axes, or None = replicated)
RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "vocab": "tensor",
    "embed": ("fsdp", "context"),  # context devices share params ZeRO-3 style too (as MaxText): 1/C of them each
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "norm": None,
    "expert": "expert",
    # activations
    "batch": ("data", "fsdp", "expert"),
    "seq": "context",
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


def logical_to_spec(axes: Sequence[str | None]) -> PartitionSpec:
    """('batch', 'seq', 'act_embed') -> PartitionSpec(('data', 'fsdp', 'expert'), 'context', None)."""
    unknown = [a for a in axes if a is not None and a not in RULES]
    if unknown:
        raise ValueError(f"unknown logical axes {unknown}; known: {sorted(RULES)}")
    return PartitionSpec(*(None if a is None else RULES[a] for a in axes))


def mesh_axis_size(name: str) -> int:
    """Size of the mesh axis `name` of the mesh in context (jax.set_mesh); 1 without a mesh or that axis."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else dict(mesh.shape).get(name, 1)


def sequence_is_split() -> bool:
    """Whether the mesh in context splits activations' "seq" axis (context parallelism)."""
    return mesh_axis_size(RULES["seq"]) > 1


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Constrain an activation's layout to its logical axes; a no-op when no mesh is set."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, fitted_spec(axes, x.shape, mesh.shape))


def fitted_spec(axes: Sequence[str | None], shape: Sequence[int], mesh_shape: dict[str, int],
                counts: dict[str, int] | None = None) -> PartitionSpec:
    """The rule's spec, leaving replicated each dim its mesh axes do not divide.

    `counts` gives unit counts for flattened dims (a [K*H, D] projection is split only if the
    tensor size divides K, so heads are never cut through their head_dim).
    """
    out = []
    for name, entry, dim in zip(axes, logical_to_spec(axes), shape):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        if len(names) > 1 and any(n in names and mesh_shape.get(n, 1) == 1 for n in OPTIONAL_AXES):
            names = tuple(n for n in names if n not in OPTIONAL_AXES or mesh_shape.get(n, 1) > 1)
            entry = names[0] if len(names) == 1 else names
        size = int(np.prod([mesh_shape[n] for n in names])) if names else 1
        units = (counts or {}).get(name, dim)
        out.append(entry if names and units % size == 0 and dim % size == 0 else None)
    return PartitionSpec(*out)


def _named(sizes: Sequence[int]) -> str:
    """'data=2 x fsdp=2 x tensor=2' (expert and context only when used)."""
    return " x ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes) if s != 1 or a in ("data", "fsdp", "tensor"))


def resolve_mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, ...]:
    """Sizes in MESH_AXES order, with one -1 taking the rest; a clear error when sizes do not fit."""
    sizes = [getattr(cfg, a) for a in MESH_AXES]
    named = _named(sizes)
    free = [i for i, s in enumerate(sizes) if s == -1]
    fixed = int(np.prod([s for s in sizes if s != -1]))
    if len(free) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {named}")
    if free:
        if n_devices % fixed:
            raise ValueError(f"mesh {named} cannot fill {n_devices} devices: {fixed} does not divide {n_devices}")
        sizes[free[0]] = n_devices // fixed
    if int(np.prod(sizes)) != n_devices:
        named = _named(sizes)
        raise ValueError(f"mesh {named} = {int(np.prod(sizes))} devices, but there are {n_devices}; "
                         "make the product equal the device count (or set one axis to -1)")
    return tuple(sizes)


def check_model_fits(cfg: ModelConfig, tensor: int) -> None:
    """Tensor parallelism splits attention heads, so the tensor size must divide n_heads.

    kv heads are split too where tensor divides n_kv_heads; otherwise k/v stay replicated.
    """
    if tensor > 1 and cfg.n_heads % tensor:
        raise ValueError(f"mesh.tensor={tensor} divides neither n_heads={cfg.n_heads} nor n_kv_heads="
                         f"{cfg.n_kv_heads}: tensor parallelism splits attention heads; choose a tensor size "
                         "that divides n_heads")


def make_mesh(cfg: MeshConfig, model_cfg: ModelConfig | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A MESH_AXES mesh over all devices of all processes (Auto axis types)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(cfg, len(devices))
    if model_cfg is not None:
        check_model_fits(model_cfg, shape[MESH_AXES.index("tensor")])
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def batch_rows(mesh: Mesh) -> int:
    """How many ways the batch axis is split: the product of the mesh axes the "batch" rule names."""
    return int(np.prod([mesh.shape[a] for a in RULES["batch"]]))


def param_shardings(abstract_state: nnx.State, mesh: Mesh, cfg: ModelConfig | None = None) -> nnx.State:
    """NamedSharding per parameter from its `logical_axes` metadata (same tree as the state)."""
    counts = {"heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads} if cfg is not None else None

    def one(var):
        axes = var.get_metadata().get("logical_axes") or (None,) * len(var.shape)
        return var.replace(NamedSharding(mesh, fitted_spec(axes, var.shape, mesh.shape, counts)))

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_like(tree: Any, params_abstract: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for an optimizer state: subtrees shaped like the params take theirs, the rest replicate."""
    target = jax.tree.structure(params_abstract)
    replicated = NamedSharding(mesh, PartitionSpec())
    is_params = lambda x: jax.tree.structure(x) == target  # noqa: E731
    return jax.tree.map(lambda x: params_shardings if is_params(x) else replicated, tree, is_leaf=is_params)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """[B, T, ...] batches split over the "batch" rule's mesh axes on the batch axis (rows whole)."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1)))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble each process's rows into global arrays laid out over the mesh."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v) for k, v in local.items()}


def maybe_initialize_distributed(force: bool = False) -> bool:
    """Join a multi-process run when asked or when the environment describes one; returns True if it did.

    JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID select the coordinator explicitly.
    Under SLURM (SLURM_NTASKS > 1), and wherever `force` or JAXFORMER_DISTRIBUTED=1 asks for it (a Cloud TPU
    pod slice, GKE, Open MPI), jax.distributed.initialize() is called with no arguments: JAX detects the
    cluster, its coordinator, process count and id itself (on TPU VMs from the metadata server).
    """
    addr = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if addr:
        n, pid = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU-only processes; harmless on GPU
        jax.distributed.initialize(addr, num_processes=n, process_id=pid)
        return True
    if force or os.environ.get("JAXFORMER_DISTRIBUTED", "") not in ("", "0") or \
            int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()
        return True
    return False
