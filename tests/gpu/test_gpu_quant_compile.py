"""The int8 / int4 weight-only matmul kernels compile to sm_90 (H100) and sm_80 (A100) cubins without a GPU.

As tests/gpu/test_gpu_kernels_compile.py: jax's compile-only CUDA devices run XLA:GPU, Triton and ptxas here,
and pallas_kernels.targets.cubin reads the cubins back. A cell is one (target, dtype) and compiles, in one
program, both kernels on GPT-2-sized decode shapes (a 768 -> 3072 projection, one row of x) through the
quantized layer's own dispatch (impl="auto" picks the kernel when compiling for a GPU). A cell passes when
each kernel is a cubin for the target's architecture and ptxas spills nothing at the default tiles. Needs
the gpu-compile extra (`make test` installs it).
"""

from __future__ import annotations

import random

import jax
import jax.numpy as jnp
import pytest

from jaxformer.models.quant import int4_linear, int8_linear
from pallas_kernels.targets import get_target
from pallas_kernels.targets.cubin import compile_for

TARGETS = ("h100", "a100")
DTYPES = (jnp.bfloat16, jnp.float32)
KERNELS = ("int8_matmul", "int4_matmul")


def program(n: int):
    def fn(x, w8, s8, packed, scale, group_scale, group_zero):
        return int8_linear(x, w8, s8), int4_linear(x, packed, scale, group_scale, group_zero, n)
    return fn


def shapes(dtype, rows: int, n: int, k: int, group: int) -> list:
    sds = jax.ShapeDtypeStruct
    h, groups = -(-n // 2), -(-k // group)
    return [sds((rows, 1, k), dtype), sds((n, k), jnp.int8), sds((n,), jnp.float32),
            sds((h, groups * group), jnp.uint8), sds((2 * h,), jnp.float32),
            sds((2 * h, groups), jnp.float16), sds((2 * h, groups), jnp.float16)]


def assert_cubins(result, target) -> None:
    for name in KERNELS:
        kernel = result.kernel(name)
        assert kernel.arch == target.arch, f"{name} compiled for {kernel.arch}, not {target.arch}"
        assert kernel.frame_bytes == 0, f"{name} spills {kernel.frame_bytes} bytes ({kernel.registers} registers)"


@pytest.mark.parametrize("target,dtype", [(t, d) for t in TARGETS for d in DTYPES],
                         ids=[f"{t}-{jnp.dtype(d).name}" for t in TARGETS for d in DTYPES])
def test_quant_kernels_compile_to_cubins(target, dtype):
    target = get_target(target)
    result = compile_for(program(3072), shapes(dtype, 1, 3072, 768, 64), target)
    assert_cubins(result, target)


def test_shapes_the_tests_never_saw_compile_for_sm90():
    """Odd output counts, inputs off the group, a few rows, any group size: drawn afresh (the seed is printed)."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    n, k = rng.randrange(100, 60000) | 1, rng.randrange(100, 5000)
    rows, group = rng.choice([1, 2, 5, 8, 16, 40]), rng.choice([32, 64, 128])
    dtype = rng.choice([jnp.bfloat16, jnp.float16])
    print(dict(seed=seed, n=n, k=k, rows=rows, group=group, dtype=jnp.dtype(dtype).name))
    target = get_target("h100")
    assert_cubins(compile_for(program(n), shapes(dtype, rows, n, k, group), target), target)
