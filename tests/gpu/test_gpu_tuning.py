"""Block sizes per target: the defaults come from the measured table, a tile that cannot fit is refused before
anything compiles, and the compiler agrees (the negative control). Needs the gpu-compile extra.

The shared-memory bounds tuning.check_* use are compared with what XLA reports a kernel requests: a target
whose per-block limit is 1 KiB makes every kernel fail with "requested N", and N must be at least the bound.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import tuning
from pallas_kernels.decode_attention import BlockSizes as DecodeBlocks
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.flash_attention import BlockSizes, flash_attention
from pallas_kernels.targets import compiling_for, get_target
from pallas_kernels.targets.cubin import compile_for

SDS = jax.ShapeDtypeStruct
OVERSIZED = BlockSizes(block_q=256, block_k=256, num_stages=4)  # the negative control, H = 128 bf16


def qkv(H=128, T=1024, dtype=jnp.bfloat16):
    return [SDS((1, T, 4, H), dtype), SDS((1, T, 2, H), dtype), SDS((1, T, 2, H), dtype)]


def test_the_table_covers_both_architectures_every_width_and_head_dim():
    table = tuning.table()
    for arch in ("sm_90", "sm_80"):
        for width in tuning.WIDTHS.values():
            assert sorted(int(h) for h in table[arch][width]) == list(tuning.HEAD_DIMS), (arch, width)


@pytest.mark.parametrize("target", ["h100", "h200", "a100", "a100-40gb"])
def test_defaults_follow_the_target_and_fit_it(target):
    t = get_target(target)
    for width in ("bfloat16", "float32"):
        for H in (40, 64, 96, 128, 256):
            entry = tuning.table()[t.arch][width][str(tuning._pad_head_dim(H))]
            with compiling_for(t):
                assert vars(BlockSizes.default(H, width)) == {**vars(BlockSizes()), **entry["flash"]}
                assert vars(DecodeBlocks.default(H, width)) == {**vars(DecodeBlocks()), **entry["decode"]}
                tuning.check_flash_fits(BlockSizes.default(H, width), H, width)  # raises if not


def test_head_dims_beyond_the_table_get_tiles_whose_bounds_fit():
    for target in ("h100", "a100"):
        t = get_target(target)
        for width in ("bfloat16", "float32"):
            fields = tuning.flash_defaults(512, width, t)
            tuning.check_flash_fits(BlockSizes(**fields), 512, width, t)
            assert max(tuning.flash_floors(BlockSizes(**fields), 512, 4 if width == "float32" else 2).values()) \
                <= t.shared_memory_per_block_optin


def test_an_oversized_tile_is_refused_before_compiling():
    with compiling_for("h100"), pytest.raises(tuning.BlockSizesDoNotFit, match=r"forward kernel.*232448.*smaller"):
        jax.eval_shape(lambda q, k, v: flash_attention(q, k, v, causal=True, block_sizes=OVERSIZED), *qkv())
    big_cache = DecodeBlocks(block_k=512, num_stages=4)
    args = [SDS((2, 16, 8, 256), jnp.float32), SDS((2, 4096, 1, 256), jnp.float32),
            SDS((2, 4096, 1, 256), jnp.float32), SDS((2,), jnp.int32)]
    with compiling_for("a100"), pytest.raises(tuning.BlockSizesDoNotFit, match=r"decode_attention.*166912"):
        jax.eval_shape(lambda *a: decode_attention(*a, block_sizes=big_cache), *args)


def test_negative_control_the_compiler_rejects_the_oversized_tile(monkeypatch):
    """Without the early check the tile reaches XLA, which refuses it for the H100's 227 KiB per block."""
    monkeypatch.setattr(tuning, "check_flash_fits", lambda *a, **k: None)
    with pytest.raises(Exception, match=r"Shared memory size limit exceeded: requested (\d+), available: 232448") as e:
        compile_for(lambda q, k, v: flash_attention(q, k, v, causal=True, block_sizes=OVERSIZED), qkv(), "h100")
    requested = int(re.search(r"requested (\d+)", str(e.value)).group(1))
    assert requested >= tuning.flash_floors(OVERSIZED, 128, 2)["forward"] > 232448


def with_limit(target: str, limit: int):
    """The target with `limit` bytes of shared memory per block."""
    t = get_target(target)
    text = re.sub(r"shared_memory_per_block_optin: \d+", f"shared_memory_per_block_optin: {limit}", t.config_text)
    return dataclasses.replace(t, shared_memory_per_block_optin=limit, config_text=text)


@pytest.mark.parametrize("target,kernel,fields,H,dtype", [
    ("a100", "forward", dict(block_q=128, block_k=64, num_stages=3), 128, jnp.float32),
    ("a100", "dkdv", dict(block_q_dkv=64, block_k_dkv=64, num_stages=4), 128, jnp.float32),
    ("h100", "dq", dict(block_q_dq=64, block_k_dq=64, num_stages=3), 64, jnp.bfloat16),
])
def test_the_bounds_are_at_most_what_the_kernels_request(monkeypatch, target, kernel, fields, H, dtype):
    """With one byte less than the bound per block, the kernel must fail (and request at least the bound)."""
    monkeypatch.setattr(tuning, "check_flash_fits", lambda *a, **k: None)
    blocks = dataclasses.replace(BlockSizes(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=16, block_q_dq=16,
                                            block_k_dq=16), **fields)  # the other kernels' 16 x 16 tiles fit
    floor = tuning.flash_floors(blocks, H, jnp.dtype(dtype).itemsize)[kernel]
    fn = (lambda q, k, v: flash_attention(q, k, v, causal=True, block_sizes=blocks)) if kernel == "forward" else \
        jax.grad(lambda q, k, v: flash_attention(q, k, v, causal=True, block_sizes=blocks).sum(), argnums=(0, 1, 2))
    with pytest.raises(Exception, match=r"Shared memory size limit exceeded: requested (\d+)") as e:
        compile_for(fn, qkv(H, 512, dtype), with_limit(target, floor - 1))
    assert int(re.search(r"requested (\d+)", str(e.value)).group(1)) >= floor
