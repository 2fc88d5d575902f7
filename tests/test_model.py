"""DecoderLM behaviour (not parity): shapes, causality, input checks, bf16 compute, jit and grad."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer import DecoderLM, ModelConfig
from jaxformer.interop.state_dict import expected_shapes, from_state_dict, to_numpy_state_dict

FAMILIES = {
    "llama": ModelConfig.llama(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                               max_seq_len=24),
    "gpt2": ModelConfig.gpt2(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=24),
}


@functools.cache
def _model(family: str, seed: int = 0) -> DecoderLM:  # shared: tests only read the model
    """Random weights from numpy (norms near 1, nonzero biases): avoids compiling every init op eagerly."""
    cfg = FAMILIES[family]
    rng = np.random.default_rng(seed)
    weights = {k: ((1.0 if "norm" in k and k.endswith("weight") else 0.0) + 0.05 * rng.standard_normal(shape))
               .astype(np.float32) for k, shape in expected_shapes(cfg).items()}
    return from_state_dict(cfg, weights)


@nnx.jit
def _forward(model: DecoderLM, tokens, positions=None, segment_ids=None) -> jax.Array:
    # eager dispatch compiles every op separately (slow); input checks run at trace time either way
    return model(tokens, positions, segment_ids)


def _tokens(cfg: ModelConfig, shape=(2, 16), seed: int = 1) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 0, cfg.vocab_size, dtype=jnp.int32)


def _rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("family", FAMILIES)
def test_output_shape_and_dtype(family):
    model = _model(family)
    cfg = model.config
    logits = _forward(model, _tokens(cfg))  # (2, 16): the shape other tests compile too
    assert logits.shape == (2, 16, cfg.vocab_size)
    assert logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    assert float(jnp.std(logits)) > 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("t", [0, 7, 15])
def test_causal(family, t):
    model = _model(family)
    cfg = model.config
    tokens = _tokens(cfg)
    changed = tokens.at[:, t].set((tokens[:, t] + 1 + jnp.arange(tokens.shape[0])) % cfg.vocab_size)
    a, b = np.asarray(_forward(model, tokens)), np.asarray(_forward(model, changed))
    np.testing.assert_allclose(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert np.abs(a[:, t:] - b[:, t:]).max(axis=-1).min() > 1e-6  # the change reaches t and every later step


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_documents_are_isolated(family):
    model = _model(family)
    cfg = model.config
    tokens = _tokens(cfg, (1, 16))
    cut = 6
    positions = jnp.concatenate([jnp.arange(cut), jnp.arange(16 - cut)])[None].astype(jnp.int32)
    segment_ids = jnp.concatenate([jnp.zeros(cut), jnp.ones(16 - cut)])[None].astype(jnp.int32)
    packed = _forward(model, tokens, positions, segment_ids)
    np.testing.assert_allclose(packed[:, :cut], _forward(model, tokens[:, :cut]), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(packed[:, cut:], _forward(model, tokens[:, cut:]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_too_long_sequence_names_both_lengths(family):
    model = _model(family)
    cfg = model.config
    assert _forward(model, _tokens(cfg, (1, cfg.max_seq_len))).shape[1] == cfg.max_seq_len
    with pytest.raises(ValueError, match=rf"{cfg.max_seq_len + 1}.*max_seq_len={cfg.max_seq_len}"):
        model(_tokens(cfg, (1, cfg.max_seq_len + 1)))
    with pytest.raises(ValueError, match=rf"{cfg.max_seq_len + 1}.*max_seq_len={cfg.max_seq_len}"):
        _forward(model, _tokens(cfg, (1, cfg.max_seq_len + 1)))  # under jit too


def test_float_tokens_rejected():
    model = _model("llama")
    with pytest.raises(ValueError, match="integer"):
        model(jnp.zeros((2, 8), jnp.float32) + 3.0)


def test_tokens_must_be_2d():
    model = _model("llama")
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        model(jnp.arange(8, dtype=jnp.int32))


@pytest.mark.parametrize("name", ["positions", "segment_ids"])
@pytest.mark.parametrize("shape", [(2, 7), (1, 8), (8,)])
def test_mismatched_positions_or_segments_rejected(name, shape):
    model = _model("llama")
    tokens = _tokens(model.config, (2, 8))
    with pytest.raises(ValueError, match=rf"{name}.*\(2, 8\)"):
        model(tokens, **{name: jnp.zeros(shape, jnp.int32)})


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_compute_close_to_fp32(family):
    ref_model = _model(family)
    cfg16 = ref_model.config.replace(compute_dtype="bfloat16")
    model16 = from_state_dict(cfg16, to_numpy_state_dict(ref_model))
    assert model16.layers[0].self_attn.q_proj.weight[...].dtype == jnp.float32  # params stay fp32
    tokens = _tokens(ref_model.config)
    ref, out = _forward(ref_model, tokens), _forward(model16, tokens)
    assert out.dtype == jnp.float32  # logits come back in float32 whatever the compute dtype
    err = _rel_err(out, ref)  # ||out - ref|| / ||ref||: a norm of the whole tensor, so no cancellation
    # > 0: bf16 really was used. bf16 rounds each activation to 2^-8 ~ 3.9e-3 of itself, and two layers compound
    # such roundings: measured 7.1e-3 (gpt2) and 6.8e-3 (llama); 3e-2 keeps 4x over that, and a float32 step lost
    # to bf16 by mistake (softmax, norms, the residual) would show as 1e-1 or more
    assert 0 < err <= 3e-2, err


def test_jit_matches_eager():
    model = _model("llama")
    tokens = _tokens(model.config, (1, 5))
    np.testing.assert_allclose(_forward(model, tokens), model(tokens), rtol=1e-5, atol=1e-5)


def _loss(model: DecoderLM, tokens: jax.Array) -> jax.Array:
    logits = model(tokens[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()


@pytest.mark.parametrize("family", FAMILIES)
def test_grad(family):
    model = _model(family)
    tokens = _tokens(model.config, (2, 17))
    grads = nnx.jit(nnx.grad(_loss))(model, tokens)
    loss_fn = nnx.jit(_loss)
    loss = float(loss_fn(model, tokens))
    assert np.isfinite(loss) and loss > 0

    params = nnx.state(model, nnx.Param)
    g_leaves = jax.tree.leaves(grads)
    p_leaves = jax.tree.leaves(params)
    assert len(g_leaves) == len(p_leaves) and len(p_leaves) > 0
    for g, p in zip(g_leaves, p_leaves):
        assert g.shape == p.shape and g.dtype == p.dtype
        assert bool(jnp.all(jnp.isfinite(g)))
    assert all(float(jnp.abs(g).max()) > 0 for g in g_leaves)  # every parameter influences the loss

    # central difference along the gradient: (L(p + eg) - L(p - eg)) / 2e ~= |g|^2
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    eps = 1e-3
    shifted = [nnx.merge(graphdef, jax.tree.map(lambda p, g, s=s: p + s * eps * g, params, grads), rest)
               for s in (1.0, -1.0)]
    fd = (float(loss_fn(shifted[0], tokens)) - float(loss_fn(shifted[1], tokens))) / (2 * eps)
    g2 = float(sum(jnp.sum(jnp.square(g)) for g in g_leaves))
    assert fd == pytest.approx(g2, rel=2e-2)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scan_over_mixed_layer_types_matches_the_unrolled_model(remat):
    """Gemma-2-style sliding/full pairs scan as a two-block body; logits and gradients equal the plain loop."""
    cfg = ModelConfig.llama(vocab_size=97, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=24,
                            sliding_window=5, layer_types=("sliding_attention", "full_attention") * 2,
                            rope_local_theta=100.0, norm_placement="sandwich", attn_logit_softcap=3.0)
    rng = np.random.default_rng(3)
    weights = {k: (0.3 * rng.standard_normal(shape)).astype(np.float32) for k, shape in expected_shapes(cfg).items()}
    tokens = _tokens(cfg, (2, 17))
    runs = []
    for scan in (False, True):
        model = from_state_dict(cfg.replace(scan_layers=scan, remat=remat), weights)
        loss, grads = nnx.jit(nnx.value_and_grad(_loss))(model, tokens)
        runs.append((float(loss), {k: np.asarray(v) for k, v in
                                   jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param))}))
    assert runs[1][0] == pytest.approx(runs[0][0], rel=1e-5)  # a mean of positive terms: no cancellation
    for k, g in runs[0][1].items():  # the gradient rule (docs/testing.md); measured 9.5e-7
        assert np.linalg.norm(runs[1][1][k] - g) <= 1e-4 * np.linalg.norm(g), k
