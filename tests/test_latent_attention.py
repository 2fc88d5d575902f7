"""Multi-head latent attention (models/latent_attention.py): the absorbed form over a latent cache equals the
expanded form the model trains with, through every cache the engine uses and every way a projection is stored.

The expanded form itself is proven against torch_ref and transformers (parity_tests: test_families,
test_hf_families, test_generate_families); here each cached path is compared with the uncached forward of the
same model on fresh random tokens, elementwise relative to max|logit|.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.finetune.lora import LoRAConfig, apply_lora, lora_modules
from jaxformer.models import DecoderLM
from jaxformer.models.cache import KVCache
from jaxformer.models.paged_cache import PagedKVCache
from jaxformer.models.quant import QuantSpec
from jaxformer.models.quant_layers import quantize_model

V = 97
CFG = ModelConfig.llama(vocab_size=V, d_model=48, n_layers=2, n_heads=4, head_dim=20, d_ff=64, max_seq_len=64,
                        latent=dict(kv_rank=24, q_rank=16, rope_dim=8, v_head_dim=12, bias=True),
                        rope=dict(scaling=dict(rope_type="yarn", factor=4.0, mscale=1.0, mscale_all_dim=1.0,
                                               original_max_position_embeddings=16)))


def _tokens(seed: int, T: int = 20) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (2, T)), jnp.int32)


def _model(cfg: ModelConfig = CFG, seed: int = 0) -> DecoderLM:
    """A model with every weight redrawn at 0.3 (1-D weights around 1), so attention is far from uniform."""
    model = DecoderLM(cfg, rngs=nnx.Rngs(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            x = var[...]
            noise = jax.random.normal(next(keys), x.shape, x.dtype)
            var[...] = 1.0 + 0.1 * noise if x.ndim == 1 else 0.3 * noise
    return model


def _cached(model: DecoderLM, tokens: jax.Array, cache) -> np.ndarray:
    """Prefill 13 tokens, then one at a time: the logits of every position."""
    out = model.extend(tokens[:, :13], cache)
    steps = [out.logits]
    for t in range(13, tokens.shape[1]):
        out = model.extend(tokens[:, t:t + 1], out.cache)
        steps.append(out.logits)
    return np.asarray(jnp.concatenate(steps, 1))


def _assert_close(got: np.ndarray, ref: np.ndarray, bound: float = 1e-5) -> None:
    scale = np.abs(ref).max()
    assert scale > 1.0, "logits too small to prove anything"
    assert np.abs(got - ref).max() <= bound * scale, f"max|diff| {np.abs(got - ref).max() / scale:.1e} x max|ref|"


@pytest.mark.parametrize("window", [None, 7])
def test_absorbed_decoding_equals_the_expanded_forward(window):
    cfg = CFG if window is None else CFG.replace(attention=dict(sliding_window=window))
    model, tokens = _model(cfg), _tokens(1)
    _assert_close(_cached(model, tokens, KVCache.init(cfg, 2, 40)), np.asarray(model(tokens)))  # measured 1.5e-7


def test_latent_cache_holds_the_latent_and_the_shared_rope_key_only():
    cache = KVCache.init(CFG, 2, 40)
    assert [c.shape for c in cache.k] == [(2, 1, 40, 24)] * 2 and [c.shape for c in cache.v] == [(2, 1, 40, 8)] * 2
    assert CFG.kv_bytes_per_token(4) == 2 * (24 + 8) * 4  # vs 2 x 4 x (20 + 12) x 4 expanded
    assert cache.nbytes() == 2 * 40 * CFG.kv_bytes_per_token(4)


def test_paged_and_int8_latent_caches():
    model, tokens = _model(), _tokens(2)
    ref = np.asarray(model(tokens))
    paged = PagedKVCache.init(CFG, 2, 40, num_pages=24, page_size=4)
    table = np.zeros((2, 10), np.int32)
    pages = np.random.default_rng(3).permutation(np.arange(1, 24))
    table[0], table[1] = pages[:10], pages[10:20]
    _assert_close(_cached(model, tokens, paged.replace(page_table=jnp.asarray(table))), ref)
    # int8 latents: one scale per position, a quantization error (measured 4e-3 x max|ref|)
    _assert_close(_cached(model, tokens, KVCache.init(CFG, 2, 40, dtype="int8")), ref, bound=3e-2)


def test_absorbed_decoding_reads_lora_and_quantized_projections():
    """kv_b_proj is folded into the queries when decoding: an adapter on it (B moved off zero) and int8 weights
    must reach the absorbed form as they reach the expanded one."""
    model, tokens = _model(), _tokens(4)
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=("kv_b", "q_b", "o")), rngs=nnx.Rngs(5))
    for i, (_, m) in enumerate(lora_modules(model)):
        m.lora_B.weight[...] = 0.2 * jax.random.normal(jax.random.key(10 + i), m.lora_B.weight.shape)
    m.deterministic = True
    _assert_close(_cached(model, tokens, KVCache.init(CFG, 2, 40)), np.asarray(model(tokens)))
    qmodel = quantize_model(_model(), QuantSpec(bits=8))
    _assert_close(_cached(qmodel, tokens, KVCache.init(CFG, 2, 40)), np.asarray(qmodel(tokens)))


def test_latent_config_errors_name_the_field():
    base = dict(vocab_size=V, d_model=48, n_heads=4, head_dim=20)
    with pytest.raises(ValueError, match="latent.rope_dim to an even number"):
        ModelConfig.llama(**base, latent=dict(kv_rank=8, rope_dim=3))
    with pytest.raises(ValueError, match="must be below head_dim"):
        ModelConfig.llama(**base, latent=dict(kv_rank=8, rope_dim=20))
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig.llama(**base, n_kv_heads=2, latent=dict(kv_rank=8, rope_dim=8))
    with pytest.raises(ValueError, match="latent.kv_rank=0"):
        ModelConfig.llama(**base, latent=dict(q_rank=8))
    assert ModelConfig.llama(**base, latent=dict(kv_rank=8, rope_dim=8, v_head_dim=12)).latent.v_head_dim is None
