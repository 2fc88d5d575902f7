"""int8 / int4 weight-only matmul kernels (Pallas, interpret mode on CPU) against plain numpy on fresh inputs,
and the quantized layers routed through them (impl="pallas")."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.models.layers import Linear
from jaxformer.models.quant import QuantSpec
from jaxformer.models.quant_layers import QuantLinear, set_impl
from pallas_kernels.quant_matmul import (BlockSizes, int4_matmul, int4_matmul_reference, int8_matmul,
                                         int8_matmul_reference, pack_int4)

# Interpret-mode kernels are large XLA programs: skipping backend optimisation halves CPU compile time.
FAST_COMPILE = {} if jax.default_backend() == "gpu" else {"xla_backend_optimization_level": 0}


def int4_weight(rng, N: int, K: int, G: int):
    """(nibbles [N, Kp], packed, scale [2h], group_scale, group_zero [2h, Kp/G]) drawn afresh."""
    Kp = -(-K // G) * G
    nibbles = rng.integers(0, 16, (N, Kp))
    h = -(-N // 2)
    scale = jnp.asarray(rng.random(2 * h) + 0.5, jnp.float32)
    gs = jnp.asarray(rng.random((2 * h, Kp // G)) * 0.2, jnp.float16)
    gz = jnp.asarray(-rng.random((2 * h, Kp // G)), jnp.float16)
    return nibbles, pack_int4(nibbles), scale, gs, gz


def numpy_int4(nibbles, scale, gs, gz, N: int, K: int, G: int) -> np.ndarray:
    """The weights [N, K] the int4 format stands for, written out in numpy (independent of the package)."""
    Kp = nibbles.shape[1]
    deq = nibbles.reshape(N, Kp // G, G) * np.asarray(gs, np.float32)[:N, :, None] + np.asarray(gz, np.float32)[:N, :, None]
    return (deq.reshape(N, Kp) * np.asarray(scale)[:N, None])[:, :K]


@pytest.mark.parametrize("M,N,K,blocks", [
    (1, 50, 96, BlockSizes(block_n=16, block_k=32)),  # N and K not multiples of the tiles: masked loads
    (5, 37, 200, BlockSizes(block_n=16, block_k=64, num_splits=2)),  # split-K partials summed
    (20, 130, 128, None),  # default tiles, rows padded 20 -> 32
])
def test_int8_matches_numpy(M, N, K, blocks):
    rng = np.random.default_rng(M * 1000 + N)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.integers(-127, 128, (N, K)).astype(np.int8)
    scale = (rng.random(N) * 0.01).astype(np.float32)
    run = jax.jit(lambda *a: (int8_matmul(*a, block_sizes=blocks, interpret=True), int8_matmul_reference(*a)),
                  compiler_options=FAST_COMPILE)
    out, ref = run(jnp.asarray(x), jnp.asarray(w), jnp.asarray(scale))
    expected = x.astype(np.float64) @ (w.astype(np.float64) * scale[:, None]).T
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(ref), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("M,N,K,G,blocks", [
    (1, 51, 96, 32, BlockSizes(block_n=16)),  # odd N: the last packed row's high nibble is padding
    (3, 64, 200, 64, BlockSizes(block_n=16, num_splits=3)),  # K padded to 256 (a short last group), split-K
    (9, 130, 128, 128, None),
])
def test_int4_matches_numpy(M, N, K, G, blocks):
    rng = np.random.default_rng(M * 1000 + N + G)
    x = rng.standard_normal((M, K)).astype(np.float32)
    nibbles, packed, scale, gs, gz = int4_weight(rng, N, K, G)
    run = jax.jit(lambda *a: (int4_matmul(*a, n=N, block_sizes=blocks, interpret=True),
                              int4_matmul_reference(*a, n=N)), compiler_options=FAST_COMPILE)
    out, ref = run(jnp.asarray(x), packed, scale, gs, gz)
    expected = x.astype(np.float64) @ numpy_int4(nibbles, scale, gs, gz, N, K, G).T
    assert out.shape == (M, N)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(ref), expected, rtol=1e-5, atol=1e-4)


def test_bfloat16_rows_meet_float32_within_bf16_rounding():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 128)).astype(np.float32)
    w = rng.integers(-127, 128, (64, 128)).astype(np.int8)
    scale = (rng.random(64) * 0.01).astype(np.float32)
    out = int8_matmul(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w), jnp.asarray(scale), interpret=True)
    expected = x @ (w.astype(np.float32) * scale[:, None]).T
    assert out.dtype == jnp.bfloat16
    assert np.linalg.norm(np.asarray(out, np.float32) - expected) / np.linalg.norm(expected) < 1e-2


def test_bad_inputs_name_the_problem():
    x = jnp.ones((2, 64))
    with pytest.raises(ValueError, match="w must be int8"):
        int8_matmul(x, jnp.ones((8, 64)), jnp.ones((8,)), interpret=True)
    with pytest.raises(ValueError, match="scale must be"):
        int8_matmul(x, jnp.ones((8, 64), jnp.int8), jnp.ones((4,)), interpret=True)
    with pytest.raises(ValueError, match="x must be"):
        int8_matmul(jnp.ones((2, 3, 64)), jnp.ones((8, 64), jnp.int8), jnp.ones((8,)), interpret=True)
    _, packed, scale, gs, gz = int4_weight(np.random.default_rng(0), 8, 64, 32)
    with pytest.raises(ValueError, match="pack into"):
        int4_matmul(x, packed, scale, gs, gz, n=12, interpret=True)
    with pytest.raises(ValueError, match="group size 16"):
        int4_matmul(x, packed, scale, gs.repeat(2, 1), gz.repeat(2, 1), n=8, interpret=True)
    with pytest.raises(ValueError, match="must be a power of two"):
        BlockSizes(block_n=24)


@pytest.mark.parametrize("bits", [8, 4])
def test_quant_linear_through_the_kernel_equals_the_xla_path(bits):
    """impl="pallas" (what a GPU runs; interpreted here) and impl="xla" (CPU) give the same layer outputs."""
    lin = Linear(96, 40, bias=True, axes=("mlp", "embed"), rngs=nnx.Rngs(2))
    lin.bias[...] = jnp.linspace(-0.5, 0.5, 40)
    ql = QuantLinear.from_linear(lin, QuantSpec.of(bits, 32 if bits == 4 else None), impl="xla")
    x = jnp.asarray(np.random.default_rng(bits).standard_normal((3, 1, 96)), jnp.float32)
    xla = np.asarray(ql(x))
    set_impl(ql, "pallas")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXFORMER_PALLAS_INTERPRET", "1")
        kernel = np.asarray(jax.jit(lambda m, x: m(x), compiler_options=FAST_COMPILE)(ql, x))
    np.testing.assert_allclose(kernel, xla, rtol=1e-5, atol=1e-5)
