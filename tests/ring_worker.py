"""Context parallelism checks on 8 fake CPU devices, all in one process (XLA reads XLA_FLAGS once, at import).

usage: python tests/ring_worker.py OUT.json
  Writes one JSON object: per case the loss on one device and on the mesh, and the largest gradient error
  relative to that gradient's largest entry; the Pallas-interpret ring against the xla one (output and input gradients); the ppermutes a
  sliding window saves; the bad-length error's message.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer import sharding
from jaxformer.config import MeshConfig, ModelConfig
from jaxformer.models import DecoderLM
from jaxformer.models.ring_attention import ring_attention, to_context_layout
from jaxformer.train.step import lm_loss

# GQA (4 query heads over 2 kv heads), a sliding-window layer then a full one, packed documents
MODEL = ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=128,
                    sliding_window=12, layer_types=("sliding_attention", "full_attention"))
B, T = 2, 64


def random_batch(seed: int) -> dict[str, np.ndarray]:
    """[B, T] packed rows of random tokens: three documents each (positions restart), some tokens unmasked."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, MODEL.vocab_size, (B, T + 1)).astype(np.int32)
    t = np.arange(T)[None, :]
    cuts = np.sort(rng.integers(4, T - 4, (B, 2)), axis=1)
    seg = 1 + (t >= cuts[:, :1]) + (t >= cuts[:, 1:])
    start = np.where(seg == 1, 0, np.where(seg == 2, cuts[:, :1], cuts[:, 1:]))
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg.astype(np.int32),
            "positions": (t - start).astype(np.int32), "loss_mask": (rng.random((B, T)) > 0.1).astype(np.float32)}


def loss_and_grads(params, graphdef, batch, mesh) -> tuple[float, dict[str, np.ndarray]]:
    """Mean token loss and its gradients with params and batch laid out on `mesh` by the logical-axis table."""
    loss = lm_loss(graphdef, packed=True)

    def mean_loss(p, b):
        _, (ce, n) = loss(p, b, (), None)
        return ce / n

    with jax.set_mesh(mesh):
        p_sh = sharding.param_shardings(params, mesh, MODEL)
        value, grads = jax.jit(jax.value_and_grad(mean_loss), out_shardings=(None, p_sh))(
            jax.device_put(params, p_sh), sharding.global_batch(batch, mesh))
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    return float(value), {".".join(str(k.key) for k in path if hasattr(k, "key")): np.asarray(g) for path, g in flat}


def model_cases() -> dict:
    graphdef, params = nnx.split(DecoderLM(MODEL, rngs=nnx.Rngs(0)), nnx.Param)
    rng = np.random.default_rng(1)  # norm weights away from their init (ones)
    params = jax.tree.map(lambda p: p + 0.3 * rng.standard_normal(p.shape).astype(p.dtype) if p.ndim == 1 else p,
                          params)
    batch = random_batch(2)
    one = sharding.make_mesh(MeshConfig(), MODEL, devices=jax.devices()[:1])
    loss_one, g_one = loss_and_grads(params, graphdef, batch, one)
    out = {}
    for name, mcfg in (("context8", MeshConfig(context=8)), ("context2_fsdp2_tensor2",
                                                             MeshConfig(context=2, fsdp=2, tensor=2))):
        mesh = sharding.make_mesh(mcfg, MODEL)
        loss, g = loss_and_grads(params, graphdef, batch, mesh)
        errs = {k: float(np.abs(g[k] - g_one[k]).max() / np.abs(g_one[k]).max()) for k in g_one}
        out[name] = {"loss_one": loss_one, "loss": loss, "params": sorted(g), "grad_rel": errs}
    return out


def attention_inputs(seed: int, T: int, N: int = 4, K: int = 2, H: int = 16):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((1, T, n, H)), jnp.float32) for n in (N, K, K))
    seg = jnp.asarray(np.where(np.arange(T)[None] < rng.integers(T // 4, 3 * T // 4), 1, 2), jnp.int32)
    w = jnp.asarray(rng.standard_normal((1, T, N, H)), jnp.float32)  # a random cotangent
    return q, k, v, seg, w


def pallas_case() -> dict:
    """Ring attention (context 2, causal, packed, GQA) with Pallas-interpret blocks vs xla blocks: the output
    elementwise and the input gradients, each as max|diff| / max|xla| (no reduced scalar: its sum cancels)."""
    q, k, v, seg, w = attention_inputs(3, T=32)
    mesh = sharding.make_mesh(MeshConfig(context=2, data=4))

    def run(impl):
        def out_and_grads(q, k, v):
            out, vjp = jax.vjp(lambda q, k, v: ring_attention(q, k, v, causal=True, segment_ids=(seg, seg),
                                                              scale=0.25, impl=impl), q, k, v)
            return out, vjp(w)  # w: a random cotangent
        with jax.set_mesh(mesh):
            return jax.jit(out_and_grads)(q, k, v)

    (ox, gx), (op, gp) = run("xla"), run("pallas")
    rel = lambda a, b: float(jnp.abs(a - b).max() / jnp.abs(b).max())  # noqa: E731
    return {"out_rel": rel(op, ox), "grad_rel": [rel(a, b) for a, b in zip(gp, gx)]}


def window_case() -> dict:
    """collective-permutes in the lowered fwd+bwd ring (context 8, T 128: chunks of 8) with and without a window."""
    q, k, v, seg, _ = attention_inputs(4, T=128)
    mesh = sharding.make_mesh(MeshConfig(context=8))
    counts = {}
    for window in (None, 6):
        def f(q, k, v):
            return ring_attention(q, k, v, causal=True, segment_ids=None, scale=0.25, window=window).sum()
        with jax.set_mesh(mesh):
            text = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(q, k, v).as_text()
        counts[str(window)] = text.count("collective_permute")
    return counts


def bad_length_case() -> str:
    """The error for a sequence the 2C chunks cannot split (72 tokens, context 8)."""
    mesh = sharding.make_mesh(MeshConfig(context=8))
    batch = {"inputs": jnp.zeros((2, 72), jnp.int32)}
    try:
        with jax.set_mesh(mesh):
            jax.jit(to_context_layout)(batch)
    except ValueError as e:
        return str(e)
    return ""


def main() -> None:
    report = {"devices": jax.device_count(), "models": model_cases(), "windows": window_case(),
              "bad_length": bad_length_case()}
    os.environ["JAXFORMER_PALLAS_INTERPRET"] = "1"
    report["pallas"] = pallas_case()
    with open(sys.argv[1], "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
