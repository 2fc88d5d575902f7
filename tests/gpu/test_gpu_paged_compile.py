"""paged_decode_attention compiles to an sm_90 (H100) and an sm_80 (A100) cubin at its default tiles.

As tests/gpu/test_gpu_kernels_compile.py: jax's compile-only CUDA devices run XLA:GPU, Triton and ptxas here
and the cubin is read back (pallas_kernels.targets.cubin); no GPU needed. The kernel's tile is the page, or a
slice of it no longer than decode_attention's measured tile (BlockSizes.default: the tuning table's decode
entry), so the cells cover page sizes 16 to 128 on both sides of that tile (pages cut into slices: a100 bf16
H=128 P=128, h100 fp32 H=256 P=64), every dtype on each target, windows, soft-caps and GQA, and in bf16 on both
targets attention sinks with a window (gpt-oss) and chunks (Llama 4). As for
decode_attention's table entries, the query tile is 16 rows (Tq * G <= 16) and bf16/fp16 kernels may spill
at most what the table records for the decode kernel (nothing) plus SPILL_SLACK; fp32 cells prove the
compile and the fit (docs/gpu.md), though at these shapes they measured no spills either. Measured (jax
0.10.2): every cell 0 spill bytes, 64-158 registers, 0.6-1.8 CPU seconds (docs/kernels.md has a wider sweep).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import tuning
from pallas_kernels.paged_attention import BlockSizes, paged_decode_attention
from pallas_kernels.targets import compiling_for, get_target
from pallas_kernels.targets.cubin import compile_for

KERNEL = "paged_decode_attention_split"
SPILL_SLACK = 64  # as test_gpu_kernels_compile: bytes a variant the tuning search did not compile may add
CONTEXT = 4096  # positions per sequence the page table can hold
CELLS = [  # target, dtype, head dim, page size, new tokens Tq, query heads per kv head G, window, softcap
    ("h100", jnp.bfloat16, 128, 16, 1, 4, None, None),
    ("h100", jnp.float16, 64, 128, 1, 16, 1024, 30.0),
    ("h100", jnp.float32, 256, 64, 2, 2, 500, None),
    ("a100", jnp.bfloat16, 128, 128, 4, 2, 300, 50.0),
    ("a100", jnp.float16, 256, 32, 3, 4, None, 30.0),
    ("a100", jnp.float32, 64, 16, 2, 8, 700, None),
]


def shapes(dtype, H: int, P: int, Tq: int, G: int, B: int = 4, K: int = 2) -> list:
    """q, k_pages, v_pages, page_table, lengths: a pool of twice the pages the batch's tables can name."""
    sds, max_pages = jax.ShapeDtypeStruct, CONTEXT // P
    pool = sds((2 * B * max_pages, P, K, H), dtype)
    return [sds((B, Tq, K * G, H), dtype), pool, pool, sds((B, max_pages), jnp.int32), sds((B,), jnp.int32)]


# target, head dim, page size, new tokens, query heads per kv head, window, chunk, sinks: bf16
FAMILY_CELLS = [("h100", 64, 16, 1, 8, 128, None, True), ("a100", 64, 32, 2, 8, 128, None, True),  # gpt-oss
                ("h100", 128, 64, 1, 4, None, 8192, False), ("a100", 128, 128, 3, 4, None, 1000, True)]  # Llama 4


@pytest.mark.parametrize("target,dtype,head_dim,page,new_tokens,group,window,softcap", CELLS,
                         ids=[f"{c[0]}-{jnp.dtype(c[1]).name}-H{c[2]}-P{c[3]}" for c in CELLS])
def test_paged_kernel_compiles_to_cubins(target, dtype, head_dim, page, new_tokens, group, window, softcap):
    compile_and_check(target, dtype, head_dim, page, shapes(dtype, head_dim, page, new_tokens, group),
                      functools.partial(paged_decode_attention, window=window, softcap=softcap))


@pytest.mark.parametrize("target,head_dim,page,new_tokens,group,window,chunk,sinks", FAMILY_CELLS,
                         ids=[f"{c[0]}-bfloat16-H{c[1]}-P{c[2]}-{'chunk' if c[6] else 'window'}"
                              f"{'-sinks' if c[7] else ''}" for c in FAMILY_CELLS])
def test_sinks_and_chunks_compile_to_cubins(target, head_dim, page, new_tokens, group, window, chunk, sinks):
    args = shapes(jnp.bfloat16, head_dim, page, new_tokens, group)
    if sinks:
        args.append(jax.ShapeDtypeStruct((args[0].shape[2],), jnp.float32))  # [N]
    compile_and_check(target, jnp.bfloat16, head_dim, page, args, lambda *a: paged_decode_attention(
        *a[:5], window=window, chunk=chunk, sinks=a[5] if sinks else None))


def compile_and_check(target, dtype, head_dim: int, page: int, args: list, fn) -> None:
    """fn compiled for the target: a cubin of its arch, bf16/fp16 spilling no more than the decode entry allows."""
    target = get_target(target)
    with compiling_for(target):
        blocks = BlockSizes.default(head_dim, dtype)
    start = time.process_time()
    result = compile_for(fn, args, target)
    kernel = result.kernel(KERNEL)
    print(f"{target.name} {jnp.dtype(dtype).name} H={head_dim} P={page} tile={min(page, blocks.block_k)}: "
          f"{kernel.registers} registers, {kernel.frame_bytes} spill bytes, {time.process_time() - start:.1f} CPU s")
    assert kernel.arch == target.arch, f"{KERNEL} compiled for {kernel.arch}, not {target.arch}"
    entry = tuning.table()[target.arch][tuning._width(dtype)][str(tuning._pad_head_dim(head_dim))]
    allowed = entry.get("spills", {}).get("decode", 0)
    assert jnp.dtype(dtype).itemsize == 4 or kernel.frame_bytes <= allowed + SPILL_SLACK, (
        f"{KERNEL} spills {kernel.frame_bytes} bytes ({kernel.registers} registers) at its default tiles on "
        f"{target.name}; the table allows {allowed} for the decode kernel")


def test_cells_cover_both_targets_every_dtype_and_sliced_pages():
    for target in ("h100", "a100"):
        assert {jnp.dtype(c[1]) for c in CELLS if c[0] == target} == {jnp.dtype(d) for d in
                                                                      (jnp.bfloat16, jnp.float16, jnp.float32)}
    sliced = []
    for target, dtype, H, P, *_ in CELLS:
        with compiling_for(target):
            sliced.append(P > BlockSizes.default(H, dtype).block_k)
    assert any(sliced) and not all(sliced)
    assert {c[3] for c in CELLS} == {16, 32, 64, 128}


def test_oversized_tiles_are_refused_before_compiling():
    """256-position pages read whole in fp32 at H=256 with 4 stages need more shared memory than an A100 has:
    BlockSizesDoNotFit names the kernel and the fix before anything is traced for the GPU."""
    fn = functools.partial(paged_decode_attention, block_sizes=BlockSizes(block_k=256, num_stages=4))
    with compiling_for("a100"), pytest.raises(tuning.BlockSizesDoNotFit, match="paged_decode_attention with"):
        jax.eval_shape(fn, *shapes(jnp.float32, 256, 256, 1, 4))
