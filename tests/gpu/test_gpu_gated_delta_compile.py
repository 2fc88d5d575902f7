"""pallas_kernels.gated_delta compiles, forward and backward, to sm_90 (H100) and sm_80 (A100) cubins.

As tests/gpu/test_gpu_latent_compile.py: jax's compile-only CUDA devices run XLA:GPU, Triton and ptxas here and the
cubins are read back (pallas_kernels.targets.cubin); no GPU needed. One program per cell: jax.value_and_grad of the
rule through every kernel (the forward, the forward that writes the chunk states, the reverse state-gradient walk, the
chunk-parallel gradient kernel and the dq/dk kernel). The first two cells are Qwen3.5-like Gated DeltaNet layers in
bf16 (Qwen3-Next: 16 q/k heads, 32 value heads, Dk = Dv = 128, chunk 64), the next two Dk = Dv = 64 (bf16 on h100,
fp16 on a100), all over 1000 packed tokens (not a multiple of 64) with the l2-norm, segment ids and an initial
state, at the default tiles. On sm_90 every kernel must be
spill-free; on sm_80 (no wgmma: mma operands live in registers) the default tiles spill, and the cells hold each
kernel to what was measured plus SPILL_SLACK. The fp32 cell proves the compile only (full-precision tile matmuls;
as for the attention kernels, docs/gpu.md). Measured (jax 0.10.2), registers / spill bytes:
  h100 bf16  forward 194 / 0, forward_states 224 / 0, state_grad 169 / 0, chunk_grad 242 / 0, qk_grad 111 / 0
  a100 bf16  forward 255 / 304, forward_states 255 / 280, state_grad 255 / 56, chunk_grad 255 / 272, qk_grad 180 / 0
  at Dk = Dv = 64: h100 bf16 110-201 registers, no spills; a100 fp16 forward 16 bytes, chunk_grad 80, the others 0
  h100 fp32  forward 255 / 1768, forward_states 255 / 1800, state_grad 255 / 176, chunk_grad 32 / 3688,
             qk_grad 255 / 232
(sm_80 forward tiles tried: 16 or 32 state columns x 4 or 8 warps spilled 304-832 bytes, 64 x 8 about 2.3 KB.
Dk = Dv = 256, the largest the kernel accepts, compiles too, with spills: h100 up to 112 bytes, a100 1.6-3.4 KB.)
About 5-10 CPU seconds per cell (the fp32 one is at Dk = Dv = 64 and holds no spill bound).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.gated_delta import gated_delta
from pallas_kernels.targets import get_target
from pallas_kernels.targets.cubin import compile_for

KERNELS = ("gated_delta_forward", "gated_delta_forward_states", "gated_delta_state_grad", "gated_delta_chunk_grad",
           "gated_delta_qk_grad")
SPILL_SLACK = 64  # as test_gpu_kernels_compile: bytes another shape may add
SPILLS = {"sm_90": dict.fromkeys(KERNELS, 0),  # measured at the default tiles on the bf16 cells below
          "sm_80": {"gated_delta_forward": 304, "gated_delta_forward_states": 280, "gated_delta_state_grad": 56,
                    "gated_delta_chunk_grad": 272, "gated_delta_qk_grad": 0}}
CELLS = [  # target, dtype, batch, tokens, q/k heads K, value heads H, Dk, Dv, chunk
    ("h100", jnp.bfloat16, 2, 1000, 16, 32, 128, 128, 64),
    ("a100", jnp.bfloat16, 2, 1000, 16, 32, 128, 128, 64),
    ("h100", jnp.bfloat16, 2, 1000, 8, 16, 64, 64, 64),
    ("a100", jnp.float16, 2, 1000, 8, 16, 64, 64, 64),
    ("h100", jnp.float32, 1, 300, 2, 4, 64, 64, 64),
]


def shapes(dtype, B: int, T: int, K: int, H: int, Dk: int, Dv: int) -> list:
    """q, k, v, g, beta, initial_state, segment_ids."""
    sds = jax.ShapeDtypeStruct
    return [sds((B, T, K, Dk), dtype), sds((B, T, K, Dk), dtype), sds((B, T, H, Dv), dtype),
            sds((B, T, H), jnp.float32), sds((B, T, H), jnp.float32), sds((B, H, Dk, Dv), jnp.float32),
            sds((B, T), jnp.int32)]


def program(chunk: int):
    """The loss and the gradients of every differentiable input: the forward and the four backward kernels in one
    compile (jax.grad alone would drop the plain forward: only the backward's state-writing rerun is live)."""
    def fn(q, k, v, g, beta, s0, seg):
        def loss(q, k, v, g, beta, s0):
            out, state = gated_delta(q, k, v, g, beta, chunk_size=chunk, initial_state=s0, segment_ids=seg,
                                     use_qk_l2norm=True)
            return out.astype(jnp.float32).sum() + state.sum()
        return jax.value_and_grad(loss, argnums=range(6))(q, k, v, g, beta, s0)
    return fn


@pytest.mark.parametrize("target,dtype,B,T,K,H,Dk,Dv,chunk", CELLS,
                         ids=[f"{c[0]}-{jnp.dtype(c[1]).name}-H{c[5]}-D{c[6]}" for c in CELLS])
def test_gated_delta_compiles_to_cubins(target, dtype, B, T, K, H, Dk, Dv, chunk):
    target = get_target(target)
    start = time.process_time()
    result = compile_for(program(chunk), shapes(dtype, B, T, K, H, Dk, Dv), target)
    for name in KERNELS:
        kernel = result.kernel(name)
        print(f"{target.name} {jnp.dtype(dtype).name} {name}: {kernel.registers} registers, "
              f"{kernel.frame_bytes} spill bytes")
        assert kernel.arch == target.arch, f"{name} compiled for {kernel.arch}, not {target.arch}"
        allowed = SPILLS[target.arch][name] + SPILL_SLACK
        assert jnp.dtype(dtype).itemsize == 4 or kernel.frame_bytes <= allowed, (
            f"{name} spills {kernel.frame_bytes} bytes ({kernel.registers} registers) at the default tiles on "
            f"{target.name}; measured {SPILLS[target.arch][name]}")
    print(f"{time.process_time() - start:.1f} CPU s")


def test_forward_alone_compiles_for_h100():
    """Inference compiles only the forward kernel (no states written), spill-free also at 256 tokens without segment
    ids (the 32-column forward tile spilled 48 bytes there and none at 1000 packed tokens)."""
    fn = functools.partial(gated_delta, chunk_size=64, use_qk_l2norm=True)
    result = compile_for(fn, shapes(jnp.bfloat16, 1, 256, 16, 32, 128, 128)[:5], "h100")
    names = {k.name for k in result.kernels if k.name.startswith("gated_delta")}
    assert names == {"gated_delta_forward"}, names
    assert result.kernel("gated_delta_forward").frame_bytes == 0
