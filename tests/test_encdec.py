"""The encoder-decoder model alone: config dispatch and validation, padding invariance, cached decoding,
dropout, saving and loading. Numerical parity with torch_ref and Marian is in parity_tests/test_encdec.py."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxformer
from jaxformer.config import EncDecConfig, ModelConfig, load_config, model_config_from_dict
from jaxformer.interop import native
from jaxformer.models import DecoderLM, count_params, model_class
from jaxformer.models.cache import KVCache
from jaxformer.models.encdec import EncoderDecoder

V, S, T = 53, 11, 9
CFG = EncDecConfig(vocab_size=V, d_model=32, n_encoder_layers=2, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32)
PRE = CFG.replace(post_norm=False, share_embeddings=False, tie_embeddings=False, position="learned",
                  logits_bias=True, n_kv_heads=2, activation="gelu")
COPY = CFG.replace(post_norm=False, pointer_generator=True)


def _model(cfg: EncDecConfig, seed: int = 0) -> EncoderDecoder:
    model = EncoderDecoder(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed + 100)  # biases and norms away from their 0 / 1 init, so they matter
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if var[...].ndim == 1:
            var.set_value(var[...] + 0.1 * jnp.asarray(rng.standard_normal(var.shape), jnp.float32))
    return model


@nnx.jit
def _logits(model, src, tgt, mask=None):
    return model(src, tgt, mask)


@nnx.jit
def _decode_step(model, tok, source, cache):
    return model.extend(tok, source, cache)


def _tokens(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, V, shape).astype(np.int32)


# ----------------------------------------------------------------------------- config

def test_model_section_picks_the_architecture():
    assert type(model_config_from_dict({"d_model": 32, "n_heads": 2})) is ModelConfig
    cfg = model_config_from_dict({"n_encoder_layers": 3, "d_model": 32, "n_heads": 2})
    assert isinstance(cfg, EncDecConfig) and model_class(cfg) is EncoderDecoder
    assert model_class(ModelConfig()) is DecoderLM
    # the paper's base choices are the defaults; init scales with the width
    assert (cfg.position, cfg.norm, cfg.activation, cfg.post_norm, cfg.gated_mlp, cfg.use_bias) == \
        ("sinusoidal", "layernorm", "relu", True, False, True)
    assert cfg.init_std == 32 ** -0.5 and EncDecConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"\['post_norm'\] are encoder-decoder settings"):
        model_config_from_dict({"post_norm": True})
    cfgs = load_config("seq2seq_tiny", ["--model.n_layers=3", "--seq2seq.beam_size=5"])
    assert isinstance(cfgs["model"], EncDecConfig) and cfgs["model"].n_layers == 3 and cfgs["seq2seq"].beam_size == 5
    assert type(load_config("tiny")["model"]) is ModelConfig


@pytest.mark.parametrize("kw, pattern", [
    (dict(n_encoder_layers=0), "n_encoder_layers must be a positive integer"),
    (dict(position="rope"), r"position='rope' is not supported by the encoder-decoder"),
    (dict(dropout=1.0), "dropout"), (dict(eos_id=V), r"eos_id must be a token id in \[0, vocab_size=53\)"),
    (dict(post_norm="yes"), "post_norm must be true or false"), (dict(remat="full"), "remat and scan_layers"),
])
def test_config_errors(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        CFG.replace(**kw)


def test_parameter_names_and_count():
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(nnx.eval_shape(
        lambda: EncoderDecoder(PRE, rngs=nnx.Rngs(0))), nnx.Param))}
    for n in ("embed_tokens.weight", "embed_source_tokens.weight", "embed_positions.weight",
              "embed_source_positions.weight", "encoder.layers.1.self_attn.o_proj.bias", "encoder.layers.0.mlp_norm.bias",
              "decoder.layers.1.cross_attn.k_proj.weight", "decoder.layers.0.cross_attn_norm.weight", "encoder.norm.weight",
              "decoder.norm.bias", "lm_head.weight", "final_logits_bias"):
        assert n in names, n
    D, F, L = 32, 64, 2
    attn, mlp, norm = 4 * (D * D + D), 2 * D * F + F + D, 2 * D
    expected = V * D + L * (attn + mlp + 2 * norm) + L * (2 * attn + mlp + 3 * norm)  # shared + tied, post-LN
    assert count_params(nnx.eval_shape(lambda: EncoderDecoder(CFG, rngs=nnx.Rngs(0)))) == expected


# ----------------------------------------------------------------------------- padding and masks

@pytest.mark.parametrize("cfg", [CFG, PRE, COPY], ids=["post_ln_shared", "pre_ln_unshared", "pointer_generator"])
def test_source_padding_never_changes_outputs(cfg):
    model = _model(cfg)
    lengths = [11, 4, 7, 1]
    src, tgt = _tokens(1, 4, S), _tokens(2, 4, T)
    mask = (np.arange(S)[None] < np.array(lengths)[:, None]).astype(np.int32)
    padded = np.where(mask == 1, src, _tokens(3, 4, S))  # garbage ids under the mask: only the mask may hide them
    batch = np.asarray(_logits(model, jnp.asarray(padded), jnp.asarray(tgt), jnp.asarray(mask)))
    for b, n in enumerate(lengths):
        alone = np.asarray(_logits(model, jnp.asarray(src[b:b + 1, :n]), jnp.asarray(tgt[b:b + 1])))
        np.testing.assert_allclose(batch[b:b + 1], alone, atol=2e-5, rtol=0)
    # encoder outputs at pad positions stay finite, even for a source with no token at all
    empty = mask.copy()
    empty[0] = 0
    assert np.isfinite(np.asarray(model.encode(jnp.asarray(padded), jnp.asarray(empty)))).all()


def test_target_padding_is_causal():
    model = _model(CFG)
    src, tgt = _tokens(4, 2, S), _tokens(5, 2, T)
    full = np.asarray(_logits(model, jnp.asarray(src), jnp.asarray(tgt)))
    short = np.asarray(_logits(model, jnp.asarray(src), jnp.asarray(tgt[:, :5])))
    np.testing.assert_allclose(full[:, :5], short, atol=2e-5, rtol=0)


@pytest.mark.parametrize("cfg", [CFG, PRE, COPY], ids=["post_ln_shared", "pre_ln_unshared", "pointer_generator"])
def test_cached_decoding_equals_full_forward(cfg):
    """One token at a time against the KV cache (what beam search runs) gives the teacher-forced logits."""
    model = _model(cfg, seed=3)
    src, tgt = _tokens(6, 3, S), _tokens(7, 3, T)
    mask = (np.arange(S)[None] < np.array([[S], [5], [8]])).astype(np.int32)
    full = np.asarray(_logits(model, jnp.asarray(src), jnp.asarray(tgt), jnp.asarray(mask)))
    source = model.source(model.encode(jnp.asarray(src), jnp.asarray(mask)), jnp.asarray(src), jnp.asarray(mask))
    cache = KVCache.init(cfg, 3, T)
    steps = []
    for t in range(T):
        logits, cache = _decode_step(model, jnp.asarray(tgt[:, t:t + 1]), source, cache)
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=3e-5, rtol=0)
    assert np.asarray(cache.lengths).tolist() == [T] * 3


def test_dropout_only_with_a_key():
    cfg = CFG.replace(dropout=0.3)
    model = _model(cfg)
    src, tgt = jnp.asarray(_tokens(8, 2, S)), jnp.asarray(_tokens(9, 2, T))
    plain = np.asarray(model(src, tgt))
    np.testing.assert_array_equal(plain, np.asarray(_model(CFG)(src, tgt)))  # no key: the rate does nothing
    a, b = (np.asarray(model(src, tgt, dropout_key=jax.random.key(k))) for k in (1, 2))
    assert np.abs(a - plain).max() > 1e-3 and np.abs(a - b).max() > 1e-3
    np.testing.assert_array_equal(a, np.asarray(model(src, tgt, dropout_key=jax.random.key(1))))


def test_input_errors():
    model = _model(CFG)
    with pytest.raises(ValueError, match="src_tokens must be .batch, seq."):
        model(jnp.zeros((S,), jnp.int32), jnp.zeros((1, T), jnp.int32))
    with pytest.raises(ValueError, match="max_seq_len=32"):
        model(jnp.zeros((1, 40), jnp.int32), jnp.zeros((1, T), jnp.int32))
    with pytest.raises(ValueError, match="src_mask must have the source tokens' shape"):
        model(jnp.zeros((1, S), jnp.int32), jnp.zeros((1, T), jnp.int32), jnp.ones((1, S + 1), jnp.int32))


# ----------------------------------------------------------------------------- files

@pytest.mark.parametrize("as_file", [False, True])
def test_save_and_load_round_trip(tmp_path, as_file):
    model = _model(PRE, seed=5)
    path = native.save(model, tmp_path / ("m.safetensors" if as_file else "m"))
    loaded = jaxformer.load(path)
    assert isinstance(loaded, EncoderDecoder) and loaded.config == PRE
    if not as_file:
        assert json.loads((path / "config.json").read_text())["model"]["n_encoder_layers"] == 2
    src, tgt = jnp.asarray(_tokens(10, 2, S)), jnp.asarray(_tokens(11, 2, T))
    np.testing.assert_array_equal(np.asarray(loaded(src, tgt)), np.asarray(model(src, tgt)))
    assert dataclasses.asdict(native.read_config(path)) == dataclasses.asdict(PRE)


def test_pointer_generator_mixes_vocabulary_and_copy():
    """log-probabilities sum to 1; a closed gate copies only source tokens, an open one is the plain softmax."""
    model = _model(COPY, seed=8)
    src, tgt = _tokens(12, 2, S), _tokens(13, 2, T)
    mask = (np.arange(S)[None] < np.array([[S], [4]])).astype(np.int32)
    args = jnp.asarray(src), jnp.asarray(tgt), jnp.asarray(mask)
    logp = np.asarray(_logits(model, *args))
    np.testing.assert_allclose(np.exp(logp).sum(-1), 1.0, atol=1e-5)
    model.pointer.gate.bias.set_value(jnp.full((1,), -60.0))  # g = 0: everything from the copy attention
    copied = np.exp(np.asarray(_logits(model, *args)))
    for b in range(2):
        in_source = np.zeros(V, bool)
        in_source[src[b][mask[b] == 1]] = True
        assert copied[b][:, ~in_source].max() < 1e-6 and np.allclose(copied[b][:, in_source].sum(-1), 1.0, atol=1e-5)
    model.pointer.gate.bias.set_value(jnp.full((1,), 60.0))  # g = 1: the vocabulary softmax alone
    plain = nnx.merge(*nnx.split(model))
    plain.pointer = None
    np.testing.assert_allclose(np.asarray(_logits(model, *args)), jax.nn.log_softmax(_logits(plain, *args)),
                               atol=2e-5)
