"""Ring attention with the Pallas flash blocks compiles for four H100s (context 4) without a GPU.

The forward and backward of one bf16 layer's attention (causal, GQA, packed) lower to the three flash kernels as
sm_90 cubins, with K/V (and dK/dV) moving by collective-permutes and never gathered. Needs the gpu-compile extra.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxformer.config import MeshConfig
from jaxformer.models.ring_attention import ring_attention
from jaxformer.sharding import make_mesh
from pallas_kernels.targets import compile_devices, get_target
from pallas_kernels.targets.cubin import compile_for


def test_pallas_ring_compiles_for_h100():
    target = get_target("h100")
    devices = compile_devices(target, "1x1x4")
    mesh = make_mesh(MeshConfig(fsdp=1, context=4), devices=devices)
    seq = NamedSharding(mesh, P(None, "context"))
    T, N, K, H = 4096, 8, 2, 128
    sds = jax.ShapeDtypeStruct
    args = [sds((1, T, N, H), jnp.bfloat16, sharding=seq), sds((1, T, K, H), jnp.bfloat16, sharding=seq),
            sds((1, T, K, H), jnp.bfloat16, sharding=seq), sds((1, T), jnp.int32, sharding=seq)]

    def loss(q, k, v, seg):
        o = ring_attention(q, k, v, causal=True, segment_ids=(seg, seg), scale=H ** -0.5, impl="pallas")
        return o.astype(jnp.float32).sum()

    start = time.process_time()
    with jax.set_mesh(mesh):
        result = compile_for(jax.grad(loss, argnums=(0, 1, 2)), args, target, devices=devices)
    for name in ("flash_attention_forward", "flash_attention_dkdv", "flash_attention_dq"):
        assert result.kernel(name).arch == target.arch
    hlo = result.compiled.as_text()
    assert "collective-permute" in hlo
    assert "all-gather" not in hlo, "K/V must travel the ring, never be gathered"
    print(f"ring attention for 4 x {target.name}: {time.process_time() - start:.1f} CPU s")
