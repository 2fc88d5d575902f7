"""Encoder-decoder parity: jaxformer.models.encdec vs torch_ref.encdec (modules, whole model, label-smoothed loss,
gradients) and vs Hugging Face transformers' MarianMTModel (import, export, greedy and beam search).

Marian models are random-init from a MarianConfig (nothing is downloaded), then every learned tensor,
final_logits_bias included, is overwritten with seeded random values; sources carry padding.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jaxformer
import torch_ref
from jaxformer.config import EncDecConfig
from jaxformer.models import attention as jattn
from jaxformer.models import encdec as je
from jaxformer.models.layers import sinusoidal_positions
from jaxformer.seq2seq.beam import beam_search, greedy_decode, strip
from jaxformer.train.losses import label_smoothed_sums
from parity_tests.conftest import (assert_grads_close, assert_hf_close, assert_outputs_close, copy_jax_to_torch,
                                   module_parity, quiet_transformers, random_jax_module)
from torch_ref import attention as tattn
from torch_ref import encdec as te

quiet_transformers()
from transformers import MarianConfig, MarianMTModel  # noqa: E402
from transformers.models.marian.modeling_marian import MarianSinusoidalPositionalEmbedding  # noqa: E402

B, S, T = 2, 13, 9
SMALL = dict(vocab_size=71, d_model=32, n_encoder_layers=2, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64)
CONFIGS = {
    "post_ln_shared_tied": EncDecConfig(**SMALL),
    "pre_ln_unshared_learned_gqa": EncDecConfig(**SMALL, post_norm=False, share_embeddings=False, tie_embeddings=False,
                                                position="learned", logits_bias=True, n_kv_heads=2,
                                                activation="gelu", scale_embedding=False, norm="rmsnorm"),
    "pre_ln_pointer_generator": EncDecConfig(**SMALL, post_norm=False, pointer_generator=True),
}


def _x(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _mask(lengths, n: int) -> np.ndarray:
    return (np.arange(n)[None] < np.asarray(lengths)[:, None]).astype(np.int32)


def _segments(mask: np.ndarray, q_len: int) -> tuple[np.ndarray, np.ndarray]:
    return np.ones((mask.shape[0], q_len), np.int32), mask


# ----------------------------------------------------------------------------- modules

def test_cross_attention_module():
    """Queries from one sequence, keys/values from another with padded keys masked (GQA)."""
    cfg = CONFIGS["pre_ln_unshared_learned_gqa"]
    jmod = random_jax_module(lambda: jattn.Attention(cfg, causal=False, rngs=nnx.Rngs(0)), seed=1)
    tmod = tattn.Attention(cfg, causal=False)
    copy_jax_to_torch(jmod, tmod)
    seg = _segments(_mask([S, 6], S), T)
    module_parity(jmod, tmod, lambda m, x, ctx, seg: m(x, segment_ids=seg, kv=m.project_kv(ctx)),
                  {"x": _x(2, B, T, 32), "ctx": _x(3, B, S, 32), "seg": seg}, diff=("x", "ctx"), seed=4,
                  zero_grads=("k_proj.bias",))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_encoder_layer(name):
    cfg = CONFIGS[name]
    jmod = random_jax_module(lambda: je.EncoderLayer(cfg, rngs=nnx.Rngs(0)), seed=5)
    tmod = te.EncoderLayer(cfg)
    copy_jax_to_torch(jmod, tmod)
    seg = _segments(_mask([S, 4], S), S)
    module_parity(jmod, tmod, lambda m, x, seg: m(x, seg), {"x": _x(6, B, S, 32), "seg": seg}, diff=("x",), seed=7,
                  zero_grads=("k_proj.bias",))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decoder_layer(name):
    cfg = CONFIGS[name]
    jmod = random_jax_module(lambda: je.DecoderLayer(cfg, rngs=nnx.Rngs(0)), seed=8)
    tmod = te.DecoderLayer(cfg)
    copy_jax_to_torch(jmod, tmod)
    seg = _segments(_mask([S, 7], S), T)

    def call(m, y, memory, seg):
        if isinstance(m, nnx.Module):
            return m(y, m.cross_attn.project_kv(memory), seg)
        return m(y, memory, seg)

    module_parity(jmod, tmod, call, {"y": _x(9, B, T, 32), "memory": _x(10, B, S, 32), "seg": seg},
                  diff=("y", "memory"), seed=11, zero_grads=("k_proj.bias",))


def test_sinusoids_are_marians():
    """jaxformer.models.layers.sinusoidal_positions is transformers' MarianSinusoidalPositionalEmbedding table."""
    for dim in (32, 64):
        ref = MarianSinusoidalPositionalEmbedding(512, dim).create_weight().numpy()
        ours = np.asarray(sinusoidal_positions(jnp.arange(512), dim))
        np.testing.assert_allclose(ours, ref, atol=2e-4)  # float32 angles up to 511 rad vs Marian's float64


# ----------------------------------------------------------------------------- whole model

def _twins(cfg: EncDecConfig, seed: int):
    jmod = random_jax_module(lambda: je.EncoderDecoder(cfg, rngs=nnx.Rngs(0)), seed)
    tmod = torch_ref.EncoderDecoder(cfg)
    copy_jax_to_torch(jmod, tmod)
    return jmod, tmod


def _batch(cfg: EncDecConfig, seed: int):
    rng = np.random.default_rng(seed)
    src = rng.integers(3, cfg.vocab_size, (B, S)).astype(np.int32)
    tgt_out = rng.integers(3, cfg.vocab_size, (B, T)).astype(np.int32)
    tgt_in = np.concatenate([np.zeros((B, 1), np.int32), tgt_out[:, :-1]], 1)
    return src, _mask([S, 8], S), tgt_in, tgt_out, _mask([T, 5], T).astype(np.float32)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_model_logits_loss_and_gradients(name):
    """Encoder output, decoder logits, the label-smoothed loss and every parameter's gradient."""
    cfg = CONFIGS[name]
    jmod, tmod = _twins(cfg, seed=12)
    src, mask, tgt_in, tgt_out, keep = _batch(cfg, 13)
    smoothing = 0.1
    graphdef, params = nnx.split(jmod)

    @jax.jit
    def run(p):
        def loss_fn(p):
            model = nnx.merge(graphdef, p)
            logits = model(src, tgt_in, mask)
            loss, _, n = label_smoothed_sums(logits, tgt_out, keep, smoothing)
            return loss / n, (logits, model.encode(src, mask))
        return jax.value_and_grad(loss_fn, has_aux=True)(p)

    (loss_j, (logits_j, memory_j)), grads_j = run(params)
    ts, tm = torch.from_numpy(src), torch.from_numpy(mask)
    memory_t = tmod.encode(ts, tm)
    logits_t = tmod.decode(torch.from_numpy(tgt_in), memory_t, tm, ts)
    loss_t = te.label_smoothed_loss(logits_t, torch.from_numpy(tgt_out), torch.from_numpy(keep), smoothing)
    loss_t.backward()
    real = mask.astype(bool)  # the encoder's pad positions are never read (keys masked) but compared anyway
    assert_outputs_close(np.asarray(memory_j)[real], memory_t.detach().numpy()[real], "encoder output")
    assert_outputs_close(logits_j, logits_t, "logits")
    assert abs(float(loss_j) - loss_t.detach().item()) <= 1e-5 * abs(loss_t.detach().item())
    g_j = {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(grads_j)}
    g_t = {k: p.grad for k, p in tmod.named_parameters()}
    assert_grads_close(g_j, g_t, zero=("k_proj.bias",))


def test_label_smoothing_is_torchs():
    rng = np.random.default_rng(14)
    logits, targets = (3 * rng.standard_normal((3, 7, 19))).astype(np.float32), rng.integers(0, 19, (3, 7))
    keep = (rng.random((3, 7)) > 0.3).astype(np.float32)
    for eps in (0.0, 0.1, 0.3):
        loss, nll, n = label_smoothed_sums(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(keep), eps)
        ref = te.label_smoothed_loss(torch.from_numpy(logits), torch.from_numpy(targets), torch.from_numpy(keep), eps)
        ref_nll = te.label_smoothed_loss(torch.from_numpy(logits), torch.from_numpy(targets), torch.from_numpy(keep), 0)
        assert abs(float(loss / n) - float(ref)) <= 1e-5 and abs(float(nll / n) - float(ref_nll)) <= 1e-5


# ----------------------------------------------------------------------------- Hugging Face Marian

MARIAN = {  # (MarianConfig kwargs, the jaxformer config load_hf must produce)
    "shared_tied_swish_scaled": dict(activation_function="swish", scale_embedding=True),
    "unshared_untied_gelu": dict(activation_function="gelu", scale_embedding=False,
                                 share_encoder_decoder_embeddings=False, tie_word_embeddings=False),
}


def marian(kw: dict, seed: int, vocab: int = 61, std: float = 0.2) -> MarianMTModel:
    config = MarianConfig(vocab_size=vocab, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                          decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                          max_position_embeddings=64, pad_token_id=0, decoder_start_token_id=0, eos_token_id=2,
                          forced_eos_token_id=None, **kw)
    torch.manual_seed(seed)
    model = MarianMTModel(config).eval()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_positions" in name:
                continue  # the fixed sinusoid table
            base = 1.0 if name.endswith("layer_norm.weight") else 0.0
            scale = 0.1 if p.ndim == 1 else std
            p.copy_(torch.from_numpy((base + scale * rng.standard_normal(tuple(p.shape))).astype(np.float32)))
        model.final_logits_bias.copy_(torch.from_numpy(rng.standard_normal((1, vocab)).astype(np.float32)))
    return model


def _hf_logits(model, src, mask, tgt):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(src).long(), attention_mask=torch.from_numpy(mask).long(),
                     decoder_input_ids=torch.from_numpy(tgt).long()).logits.numpy()


@pytest.mark.parametrize("name", list(MARIAN))
def test_marian_import_and_export(name, tmp_path):
    hf = marian(MARIAN[name], seed=20)
    hf.save_pretrained(tmp_path / "hf")
    model = jaxformer.load_hf(tmp_path / "hf")
    cfg = model.config
    assert isinstance(model, je.EncoderDecoder) and cfg.family == "marian" and cfg.logits_bias and cfg.post_norm
    assert (cfg.share_embeddings, cfg.tie_embeddings) == (name.startswith("shared"), name.startswith("shared"))
    src, mask, tgt_in, _, _ = _batch(cfg, 21)
    ours = np.asarray(jax.jit(lambda s, t, m: model(s, t, m))(src, tgt_in, mask))
    assert_hf_close(ours, _hf_logits(hf, src, mask, tgt_in))
    jaxformer.save_hf(model, tmp_path / "out")  # and back: transformers loads what jaxformer writes
    again = MarianMTModel.from_pretrained(tmp_path / "out").eval()
    assert_hf_close(ours, _hf_logits(again, src, mask, tgt_in))


def test_marian_export_of_a_trained_config(tmp_path):
    """A jaxformer-born post-LN model (no logits bias) exports to Marian; pre-LN or a copy head has no Marian twin."""
    cfg = EncDecConfig(**SMALL, activation="relu")
    model = random_jax_module(lambda: je.EncoderDecoder(cfg, rngs=nnx.Rngs(0)), seed=22)
    jaxformer.save_hf(model, tmp_path)
    hf = MarianMTModel.from_pretrained(tmp_path).eval()
    src, mask, tgt_in, _, _ = _batch(cfg, 23)
    assert_hf_close(np.asarray(model(jnp.asarray(src), jnp.asarray(tgt_in), jnp.asarray(mask))),
                    _hf_logits(hf, src, mask, tgt_in))
    with pytest.raises(jaxformer.UnsupportedCheckpointError, match="post_norm"):
        jaxformer.save_hf(random_jax_module(lambda: je.EncoderDecoder(dataclasses.replace(cfg, post_norm=False),
                                                                      rngs=nnx.Rngs(0)), seed=1), tmp_path / "x")
    copying = dataclasses.replace(cfg, pointer_generator=True)
    copying_model = random_jax_module(lambda: je.EncoderDecoder(copying, rngs=nnx.Rngs(0)), seed=1)
    with pytest.raises(jaxformer.UnsupportedCheckpointError, match="pointer_generator"):
        jaxformer.save_hf(copying_model, tmp_path / "y")


def test_greedy_and_beam_search_match_marian_generate(tmp_path):
    """Token-identical outputs and equal beam scores against transformers' own generate()."""
    hf = marian(MARIAN["shared_tied_swish_scaled"], seed=24, vocab=40, std=0.3)
    with torch.no_grad():
        hf.final_logits_bias[0, 2] += 1.5  # EOS often enough that some outputs end early
    hf.save_pretrained(tmp_path)
    model = jaxformer.load_hf(tmp_path)
    rng = np.random.default_rng(25)
    src = rng.integers(3, 40, (4, 10)).astype(np.int32)
    mask = _mask([10, 6, 3, 8], 10)
    L = 12
    gen = dict(input_ids=torch.from_numpy(src).long(), attention_mask=torch.from_numpy(mask).long(),
               do_sample=False, max_new_tokens=L, min_length=0)
    with torch.no_grad():
        ref = hf.generate(**gen, num_beams=1).numpy()[:, 1:]  # drop the decoder start token
    tokens, _ = greedy_decode(model, src, mask, max_len=L)
    assert [strip(t, 2) for t in tokens] == [strip(t, 2) for t in ref]
    K = 3
    with torch.no_grad():
        out = hf.generate(**gen, num_beams=K, num_return_sequences=K, length_penalty=0.8, early_stopping="never",
                          output_scores=True, return_dict_in_generate=True)
    ref_seqs = out.sequences.numpy()[:, 1:].reshape(4, K, -1)
    beam = beam_search(model, src, mask, beam_size=K, max_len=L, length_penalty=0.8)
    assert [[strip(t, 2) for t in row] for row in beam.tokens] == [[strip(t, 2) for t in row] for row in ref_seqs]
    np.testing.assert_allclose(beam.scores, out.sequences_scores.numpy().reshape(4, K), atol=1e-4)
