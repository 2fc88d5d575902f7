"""The dropless MoE's grouped SwiGLU compiles for H100 and A100 to the routed work, without a GPU.

jax 0.10.2's XLA:GPU expands `jax.lax.ragged_dot` densely (every row through every group, masked): G times the
routed matmul FLOPs and gigabytes of temporaries (docs/gpu.md). models/grouped.py's GPU path, `looped_swiglu` (a scan
over tiles of one group's rows, one weight slice at a time, a custom VJP), is what `grouped_swiglu` lowers to for
CUDA. At a DeepSeek-V3-like per-device shape (32 local experts, D 1024, F 512, 16384 routed rows, bf16) the compiled
forward + backward must hold its matmul FLOPs (the optimized HLO's dots, loop bodies times their trip counts:
jaxformer.plan.hlo.analyze) within 1.5x of the routed work and its temporaries within 1.5x of the routed rows'
arrays, on both targets, with gpt-oss's biases and clamped GLU on one; and the whole MoE block (deepseek routing,
a shared expert) the same, once. Measured (jax 0.10.2, both targets): 1.24x the routed FLOPs, 115-117 MiB of
temporaries (ragged_dot: 32x the FLOPs, 3.5 GiB); the block 1.21x and 223 MiB (ragged_dot: 28.5x, 3.0 GiB).
1-2 CPU seconds per compile. Needs the gpu-compile extra.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models.grouped import grouped_swiglu
from jaxformer.models.moe import MoE, glu
from jaxformer.plan.hlo import analyze
from pallas_kernels.targets import INSTALL_HINT, compile_devices, gpu_compiler_missing
from pallas_kernels.targets.cubin import compile_for

pytestmark = pytest.mark.skipif(bool(gpu_compiler_missing()), reason=f"needs the gpu-compile extra: {INSTALL_HINT}")

G, D, F, M = 32, 1024, 512, 16384  # local experts (256 over expert=8), d_model, expert d_ff, routed rows
MiB = 2**20


def compiled_stats(fn, args, target: str) -> tuple[int, float, float]:
    """(temporary bytes, dot FLOPs, CPU seconds) of jit(fn) compiled for one `target` GPU; args a pytree of
    ShapeDtypeStructs."""
    start = time.process_time()
    leaves, tree = jax.tree.flatten(args)
    result = compile_for(lambda *a: fn(*jax.tree.unflatten(tree, a)), leaves, target,
                         devices=compile_devices(target, "1x1x1"))
    stats = analyze(result.compiled.as_text(), n_devices=1, devices_per_host=1)
    return result.compiled.memory_analysis().temp_size_in_bytes, stats.dot_flops, time.process_time() - start


@pytest.mark.parametrize("target,biased", [("h100", False), ("a100", True)], ids=["h100-swiglu", "a100-gpt-oss"])
def test_grouped_swiglu_forward_backward_compiles_to_the_routed_work(target, biased):
    sds = jax.ShapeDtypeStruct
    bf16 = jnp.bfloat16
    args = [sds((M, D), bf16), sds((G,), jnp.int32), sds((G, F, D), bf16), sds((G, F, D), bf16), sds((G, D, F), bf16)]
    if biased:
        args += [sds((G, F), bf16), sds((G, F), bf16)]
    act = functools.partial(glu, act=jax.nn.silu, limit=7.0 if biased else None, alpha=1.702)

    def loss(x, sizes, wg, wu, wd, *biases):
        return grouped_swiglu(x, sizes, wg, wu, wd, act, biases or None).astype(jnp.float32).sum()

    diff = (0, 2, 3, 4) + ((5, 6) if biased else ())
    temps, flops, seconds = compiled_stats(jax.value_and_grad(loss, argnums=diff), args, target)
    routed = 9 * 2 * M * D * F  # 3 matmuls forward, 6 backward, over the M routed rows
    rows = M * (2 * D + 2 * F) * 2  # bf16 [M, D] output and its cotangent, [M, F] gate and up kept for the backward
    print(f"grouped_swiglu {target}{' biased' if biased else ''}: {flops / routed:.2f}x the routed FLOPs, "
          f"temporaries {temps / MiB:.1f} MiB ({temps / rows:.2f}x the routed rows' arrays), {seconds:.1f} CPU s")
    assert 1.0 <= flops / routed <= 1.5, f"{flops / 1e9:.1f} GFLOP of matmuls for {routed / 1e9:.1f} routed"
    assert temps <= 1.5 * rows, f"{temps / MiB:.1f} MiB of temporaries for {rows / MiB:.1f} MiB of routed rows"


def test_deepseek_like_moe_block_compiles_to_the_routed_work():
    """The MoE block, routing included (deepseek router: 8 groups of 4 experts, top-4 groups, top-8 experts; one
    shared expert), forward and backward for one H100 at 2048 tokens (16384 routed rows)."""
    N, k = 2048, 8
    cfg = ModelConfig.llama(vocab_size=256, d_model=D, n_heads=8, n_kv_heads=8, d_ff=4 * F, n_layers=1,
                            max_seq_len=N, param_dtype="bfloat16", compute_dtype="bfloat16",
                            moe=dict(n_experts=G, n_experts_per_token=k, d_ff=F, router="deepseek", n_group=8,
                                     topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True, shared_d_ff=F))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MoE(cfg, rngs=nnx.Rngs(0))))

    def loss(state, x):
        return nnx.merge(graphdef, state)(x).astype(jnp.float32).sum()

    x = jax.ShapeDtypeStruct((2, N // 2, D), jnp.bfloat16)
    temps, flops, seconds = compiled_stats(jax.value_and_grad(loss, argnums=(0, 1)), (state, x), "h100")
    rows = N * k
    model = 9 * 2 * rows * D * F + 9 * 2 * N * D * F + 3 * 2 * N * D * G  # routed experts, shared expert, router
    # the grouped SwiGLU's arrays, plus the sorted rows, the expert outputs in (slot, token) order and its cotangent
    arrays = rows * (5 * D + 2 * F) * 2
    print(f"MoE block h100: {flops / model:.2f}x the model FLOPs, temporaries {temps / MiB:.1f} MiB "
          f"({temps / arrays:.2f}x the routed rows' arrays), {seconds:.1f} CPU s")
    assert 1.0 <= flops / model <= 1.5, f"{flops / 1e9:.1f} GFLOP of matmuls for {model / 1e9:.1f} in the model"
    assert temps <= 1.5 * arrays, f"{temps / MiB:.1f} MiB of temporaries for {arrays / MiB:.1f} MiB of routed rows"
