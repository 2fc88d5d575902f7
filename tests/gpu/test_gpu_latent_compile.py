"""latent_decode_attention compiles to an sm_90 (H100) and an sm_80 (A100) cubin at its default tiles.

As tests/gpu/test_gpu_paged_compile.py: jax's compile-only CUDA devices run XLA:GPU, Triton and ptxas here and the
cubin is read back (pallas_kernels.targets.cubin); no GPU needed. The cells are DeepSeek-V3's attention (C = 512
latent, R = 64 rope dims) with all 128 heads or a 16-head tensor-parallel shard, one new token or two (multi-token
prediction), with and without a window, in bf16 on both targets, plus small shapes (C = 48 padded to 64, fp16 and
fp32). The defaults (tuning.LATENT_DECODE) are the first spill-free tiles found at C = 512, so bf16/fp16 cells may
spill at most SPILL_SLACK bytes; fp32 cells prove the compile and the fit (docs/gpu.md). Measured (jax 0.10.2):
bf16/fp16 0 spill bytes at 96-255 registers, fp32 0 at 110; about 1 CPU second per cell.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import tuning
from pallas_kernels.latent_decode_attention import BlockSizes, latent_decode_attention
from pallas_kernels.targets import compiling_for, get_target
from pallas_kernels.targets.cubin import compile_for

KERNEL = "latent_decode_attention_split"
SPILL_SLACK = 64  # as test_gpu_kernels_compile: bytes a shape the tuning sweep did not compile may add
CELLS = [  # target, dtype, heads N, new tokens T, latent C, rope R, cache length S, window
    ("h100", jnp.bfloat16, 128, 1, 512, 64, 4096, None),
    ("h100", jnp.bfloat16, 16, 2, 512, 64, 4096, 1024),
    ("a100", jnp.bfloat16, 128, 2, 512, 64, 4096, 1024),
    ("a100", jnp.bfloat16, 16, 1, 512, 64, 4096, None),
    ("h100", jnp.float16, 4, 1, 48, 16, 100, 50),
    ("a100", jnp.float32, 8, 2, 512, 64, 1000, None),
]


def shapes(dtype, N: int, T: int, C: int, R: int, S: int, B: int = 4) -> list:
    """q_lat, q_pe, c_cache, pe_cache, lengths."""
    sds = jax.ShapeDtypeStruct
    return [sds((B, T, N, C), dtype), sds((B, T, N, R), dtype), sds((B, S, C), dtype), sds((B, S, R), dtype),
            sds((B,), jnp.int32)]


@pytest.mark.parametrize("target,dtype,heads,new_tokens,latent,rope,length,window", CELLS,
                         ids=[f"{c[0]}-{jnp.dtype(c[1]).name}-N{c[2]}-T{c[3]}-C{c[4]}" for c in CELLS])
def test_latent_kernel_compiles_to_cubins(target, dtype, heads, new_tokens, latent, rope, length, window):
    target = get_target(target)
    start = time.process_time()
    result = compile_for(functools.partial(latent_decode_attention, sm_scale=192 ** -0.5, window=window),
                         shapes(dtype, heads, new_tokens, latent, rope, length), target)
    kernel = result.kernel(KERNEL)
    with compiling_for(target):
        blocks = BlockSizes.default(latent, rope, dtype)
    print(f"{target.name} {jnp.dtype(dtype).name} N={heads} T={new_tokens} C={latent} {blocks}: {kernel.registers} "
          f"registers, {kernel.frame_bytes} spill bytes, {time.process_time() - start:.1f} CPU s")
    assert kernel.arch == target.arch, f"{KERNEL} compiled for {kernel.arch}, not {target.arch}"
    assert jnp.dtype(dtype).itemsize == 4 or kernel.frame_bytes <= SPILL_SLACK, (
        f"{KERNEL} spills {kernel.frame_bytes} bytes ({kernel.registers} registers) at its default tiles "
        f"{blocks} on {target.name}")


def test_defaults_fit_every_target_and_width():
    for name in ("h100", "h200", "a100", "a100-40gb"):
        target = get_target(name)
        for dtype in (jnp.bfloat16, jnp.float32):
            for C in (32, 48, 128, 256, 512, 1024):
                with compiling_for(target):
                    blocks = BlockSizes.default(C, 64, dtype)
                tuning.check_latent_decode_fits(blocks, C, 64, dtype, target)  # raises if not
    with compiling_for("h100"):
        assert BlockSizes.default(512, 64, jnp.bfloat16) == BlockSizes(**tuning.LATENT_DECODE["bfloat16"])


def test_oversized_tiles_are_refused_before_compiling():
    """128-slot latent tiles in 3 stages need 3 x 128 x (512 + 64) x 2 bytes, more than an A100 has per block:
    BlockSizesDoNotFit names the kernel and the fix before anything is traced for the GPU."""
    fn = functools.partial(latent_decode_attention, sm_scale=0.1, block_sizes=BlockSizes(block_k=128, num_stages=3))
    with compiling_for("a100"), pytest.raises(tuning.BlockSizesDoNotFit, match="latent_decode_attention with"):
        jax.eval_shape(fn, *shapes(jnp.bfloat16, 16, 1, 512, 64, 4096))


def test_the_bound_is_at_most_what_the_kernel_requests(monkeypatch):
    """With one byte less than latent_decode_floor per block, XLA must refuse the default tile, asking for more."""
    monkeypatch.setattr(tuning, "check_latent_decode_fits", lambda *a, **k: None)
    blocks = BlockSizes(**tuning.LATENT_DECODE["bfloat16"])
    floor = tuning.latent_decode_floor(blocks, 512, 64, 2)
    t = get_target("h100")
    text = re.sub(r"shared_memory_per_block_optin: \d+", f"shared_memory_per_block_optin: {floor - 1}", t.config_text)
    small = dataclasses.replace(t, shared_memory_per_block_optin=floor - 1, config_text=text)
    fn = functools.partial(latent_decode_attention, sm_scale=0.1, block_sizes=blocks)
    with pytest.raises(Exception, match=r"Shared memory size limit exceeded: requested (\d+)") as e:
        compile_for(fn, shapes(jnp.bfloat16, 16, 1, 512, 64, 4096), small)
    assert int(re.search(r"requested (\d+)", str(e.value)).group(1)) >= floor
