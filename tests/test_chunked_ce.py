"""The chunked cross-entropy (train/chunked_ce.py) against the whole-logits loss written in plain jnp: values and
gradients, through lm_loss on tied / soft-capped / scaled / MoE models, and the compiled step's memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxformer.config import ModelConfig, ScalesConfig, TrainConfig
from jaxformer.models import DecoderLM
from jaxformer.models.layers import OutputHead
from jaxformer.train.chunked_ce import chunked_cross_entropy_sums
from jaxformer.train.step import lm_loss
from tests.test_families_train import FAMILIES


def _whole_logits_loss(h, w, targets, mask, scale, softcap, z_loss):
    """The reference: every logit at once, plain jnp + optax (float32)."""
    z = jnp.einsum("btd,vd->btv", h, w) * scale
    if softcap is not None:
        z = softcap * jnp.tanh(z / softcap)
    ce = optax.softmax_cross_entropy_with_integer_labels(z, targets)
    lse = jax.nn.logsumexp(z, axis=-1)
    return jnp.sum((ce + z_loss * lse ** 2) * mask), jnp.sum(ce * mask)


@pytest.mark.parametrize("scale, softcap, z_loss, chunk", [(1.0, None, 0.0, 64), (0.7, 4.0, 1e-2, 50),
                                                           (1.0, 30.0, 0.0, 2), (1.3, None, 1e-3, 10_000)])
def test_chunked_loss_and_gradients_match_whole_logits(scale, softcap, z_loss, chunk):
    """Chunks that divide T, that do not (a padded last chunk), of one position, and one chunk for everything."""
    rng = np.random.default_rng(int(chunk))
    B, T, D, V = 3, 37, 16, 97
    h = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    w = jnp.asarray(0.4 * rng.standard_normal((V, D)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    mask = jnp.asarray(rng.random((B, T)) > 0.25, jnp.float32)

    def chunked(h, w):
        objective, ce, n = chunked_cross_entropy_sums(h, OutputHead(w, scale, softcap), targets, mask, z_loss, chunk)
        return objective, (ce, n)

    (want, want_ce), want_grads = jax.value_and_grad(
        lambda h, w: _whole_logits_loss(h, w, targets, mask, scale, softcap, z_loss), argnums=(0, 1),
        has_aux=True)(h, w)
    (got, (got_ce, n)), got_grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True))(h, w)
    assert float(n) == float(mask.sum())
    np.testing.assert_allclose(float(got), float(want), rtol=2e-6)
    np.testing.assert_allclose(float(got_ce), float(want_ce), rtol=2e-6)
    for g, r in zip(got_grads, want_grads):
        assert float(jnp.abs(g - r).max()) <= 1e-5 * float(jnp.abs(r).max())
    evaluated = jax.jit(chunked)(h, w)  # no differentiation: the loss alone
    np.testing.assert_allclose(float(evaluated[0]), float(want), rtol=2e-6)


def _batch(rng, B, T, V):
    tok = rng.integers(0, V, (B, T + 1)).astype(np.int32)
    return {"inputs": tok[:, :-1], "targets": tok[:, 1:], "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
            "segment_ids": np.sort(rng.integers(1, 3, (B, T)), axis=1).astype(np.int32),
            "loss_mask": (rng.random((B, T)) > 0.2).astype(np.float32)}


BASE = dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=24)
MODELS = {
    "untied": ModelConfig.llama(**BASE),
    "tied_softcap_scaled": ModelConfig.llama(**BASE, tie_embeddings=True, final_logit_softcap=5.0,
                                             scales=ScalesConfig(logits=0.5)),
    "moe": ModelConfig.llama(**BASE, moe=dict(n_experts=4, n_experts_per_token=2, d_ff=32,
                                              aux_loss_coef=0.1, z_loss_coef=0.01)),
}
# the blocks with their own embedding and final-hidden hooks: AltUp streams, per-layer inputs
MODELS.update({family: ModelConfig.llama(**{**BASE, "vocab_size": 512, **FAMILIES[family]})
               for family in ("gemma3n", "gemma4")})


@pytest.mark.parametrize("name", list(MODELS))
def test_lm_loss_chunked_equals_whole_logits(name):
    """lm_loss with loss_chunk (hidden states -> chunked loss) against the model's whole logits: the objective, the
    reported CE and token count, every parameter's gradient; z-loss on."""
    graphdef, params = nnx.split(DecoderLM(MODELS[name], rngs=nnx.Rngs(0)))
    batch = jax.tree.map(jnp.asarray, _batch(np.random.default_rng(1), 4, 24, 96))
    results = []
    for chunk in (0, 40):  # 40 tokens: 10 positions of the 4 rows a chunk, the last of 24 padded
        fn = lm_loss(graphdef, packed=True, z_loss=1e-3, loss_chunk=chunk)
        results.append(jax.jit(jax.value_and_grad(lambda p: fn(p, batch, (), None), has_aux=True))(params))
    ((want, want_aux), want_grads), ((got, got_aux), got_grads) = results
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    np.testing.assert_allclose(float(got_aux[0]), float(want_aux[0]), rtol=1e-5)
    assert float(got_aux[1]) == float(want_aux[1])
    for g, r in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        assert float(jnp.abs(g - r).max()) <= 2e-5 * max(float(jnp.abs(r).max()), 1e-30)


def test_chunked_loss_never_holds_the_whole_logits():
    """Compiled forward + backward at a 16k vocabulary, 1,024 tokens: the whole-logits loss needs its 64 MiB of
    float32 logits (and more) in temporaries; the chunked one (64 tokens a chunk) stays under a third of that."""
    B, T, D, V = 4, 256, 64, 16384
    h = jax.ShapeDtypeStruct((B, T, D), jnp.float32)
    w = jax.ShapeDtypeStruct((V, D), jnp.float32)
    targets, mask = jnp.zeros((B, T), jnp.int32), jnp.ones((B, T), jnp.float32)
    whole = jax.grad(lambda h, w: _whole_logits_loss(h, w, targets, mask, 1.0, None, 0.0)[0], argnums=(0, 1))
    chunked = jax.grad(lambda h, w: chunked_cross_entropy_sums(h, OutputHead(w), targets, mask, 0.0, 64)[0],
                       argnums=(0, 1))
    logits_bytes = B * T * V * 4
    temp = {name: jax.jit(f).lower(h, w).compile().memory_analysis().temp_size_in_bytes
            for name, f in (("whole", whole), ("chunked", chunked))}
    assert temp["whole"] >= logits_bytes, temp
    assert temp["chunked"] < logits_bytes / 3, temp


def test_loss_chunk_must_be_a_token_count():
    assert TrainConfig(loss_chunk=4096).loss_chunk == 4096
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="loss_chunk"):
            TrainConfig(loss_chunk=bad)


def test_a_run_with_loss_chunk_trains_as_the_whole_logits_run(tmp_path, shards_dir):
    """`--train.loss_chunk` through the training loop: the same losses, gradient norms and validation loss, step by
    step, as the run that takes the whole logits."""
    from jaxformer.train.lm import train
    from jaxformer.train.metrics import read_metrics
    from tests.conftest import tiny_run

    records = {}
    for chunk in (0, 40):
        train(tiny_run(tmp_path / f"chunk{chunk}", shards_dir, steps=4, eval_every=4, ckpt_every=4, loss_chunk=chunk),
              progress=False)
        records[chunk] = read_metrics(tmp_path / f"chunk{chunk}")
    pick = lambda rs, kind, key: [r[key] for r in rs if r["kind"] == kind]  # noqa: E731
    for kind, key in (("train", "loss"), ("train", "grad_norm"), ("eval", "val_loss")):
        got, want = pick(records[40], kind, key), pick(records[0], kind, key)
        assert len(got) == len(want) > 0
        np.testing.assert_allclose(got, want, rtol=1e-4, err_msg=f"{kind} {key}")


@pytest.mark.parametrize("name, bits", [("untied", None), ("tied_softcap_scaled", None), ("untied", 8),
                                        ("tied_softcap_scaled", 4)])
def test_output_head_is_the_models_own_head(name, bits):
    """output_head() (the one dense matrix the chunked loss multiplies) gives the logits the model's head modules
    give, plain, tied, and quantized (int8 lm_head; int4 tied table, read narrow by the model)."""
    from jaxformer.infer.quant import quantize

    model = DecoderLM(MODELS[name], rngs=nnx.Rngs(3))
    if bits:
        model = quantize(model, bits)
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 96, (2, 12)), jnp.int32)
    want = np.asarray(model(tokens))
    got = np.asarray(model.output_head().logits(model.hidden(tokens)))
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
