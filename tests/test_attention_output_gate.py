"""Gated attention output (attention.output_gate: Qwen3-Next, Qwen3.5's full-attention layers).

q_proj emits, per head, [query_h | gate_h]; the attention output (all heads, before o_proj) is multiplied by
sigmoid(gate). Chain: transformers' Qwen3NextAttention <- torch_ref's Attention <- jaxformer's Attention (outputs,
dx, every parameter gradient), with per-head (1 + w) q/k norms, partial rotary (0.25) and GQA as Qwen3-Next has
them; then a whole DecoderLM's cached decoding (contiguous, paged, int8 weights, LoRA on q_proj) against its own
full forward. Errors are elementwise, relative to max|ref|; 1-D weights are moved off their init.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from jaxformer.config import ModelConfig  # noqa: E402
from jaxformer.finetune.lora import LoRAConfig, apply_lora, lora_modules, merge_lora  # noqa: E402
from jaxformer.interop.state_dict import to_torch_state_dict  # noqa: E402
from jaxformer.models import DecoderLM  # noqa: E402
from jaxformer.models import layers as jl  # noqa: E402
from jaxformer.models.attention import Attention  # noqa: E402
from jaxformer.models.cache import KVCache  # noqa: E402
from jaxformer.models.paged_cache import PagedKVCache  # noqa: E402
from jaxformer.models.quant import QuantSpec  # noqa: E402
from jaxformer.models.quant_layers import dequantized_model, quantize_model  # noqa: E402
from parity_tests.conftest import max_rel_err  # noqa: E402
from torch_ref import layers as tl  # noqa: E402
from torch_ref.attention import Attention as TorchAttention  # noqa: E402

torch.set_num_threads(1)

D, N, K, H, B, T = 32, 4, 2, 16, 2, 23  # GQA: 2 query heads per kv head
# Qwen3-Next's attention: per-head q/k RMSNorm scaled by (1 + w), a quarter of each head rotated, a gate per head
CFG = ModelConfig.llama(vocab_size=50, d_model=D, n_layers=1, n_heads=N, n_kv_heads=K, head_dim=H, d_ff=64,
                        norm_eps=1e-6, norm_unit_offset=True, rope=dict(partial_factor=0.25),
                        attention=dict(output_gate=True, qk_norm="head"))


def _x(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _hf_module(seed: int = 0):
    """transformers' Qwen3NextAttention (eager), matrices redrawn at 0.3 N(0,1), the zero-init norm weights moved."""
    from transformers.models.qwen3_next import modeling_qwen3_next as hf
    from transformers.models.qwen3_next.configuration_qwen3_next import Qwen3NextConfig

    config = Qwen3NextConfig(hidden_size=D, num_attention_heads=N, num_key_value_heads=K, head_dim=H,
                             num_hidden_layers=1, layer_types=["full_attention"], vocab_size=50, intermediate_size=64,
                             rms_norm_eps=CFG.norm_eps, num_experts=0, partial_rotary_factor=0.25)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    module = hf.Qwen3NextAttention(config, 0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p + 0.3 * torch.randn_like(p) if p.ndim == 1 else 0.3 * torch.randn_like(p))
    return config, hf, module


def _jax_module(state_dict) -> Attention:
    """jaxformer's Attention holding the given (torch, by name) weights."""
    model = Attention(CFG, rngs=nnx.Rngs(0))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        var.set_value(jnp.asarray(state_dict[".".join(map(str, path))].detach().float().numpy()))
    return model


def test_parameters_are_named_and_shaped_as_transformers():
    _, _, hf = _hf_module()
    want = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert want["q_proj.weight"] == (2 * N * H, D) and want["q_norm.weight"] == (H,)
    assert {k: tuple(v.shape) for k, v in TorchAttention(CFG).state_dict().items()} == want
    assert {k: tuple(v.shape) for k, v in to_torch_state_dict(Attention(CFG, rngs=nnx.Rngs(0))).items()} == want


def test_torch_ref_matches_transformers():
    config, hf, module = _hf_module(1)
    ref = TorchAttention(CFG)
    ref.load_state_dict(module.state_dict())
    x = torch.from_numpy(_x(2, B, T, D))
    pos = torch.arange(T)[None].expand(B, T)
    mask = torch.full((T, T), float("-inf")).triu(1)[None, None].expand(B, 1, T, T)  # additive causal
    with torch.no_grad():
        cos, sin = hf.Qwen3NextRotaryEmbedding(config)(x, pos)  # [B, T, H/4]: transformers' own partial rotary
        y_hf, _ = module(x, (cos, sin), mask)
        y = ref(x, tl.rope_cos_sin(pos, CFG.rotary_dim, CFG.rope.theta))
        module64 = module.double()
        y_hf64, _ = module64(x.double(), (cos.double(), sin.double()), mask.double())
    assert cos.shape[-1] == CFG.rotary_dim == H // 4
    # measured (also under taskset -c 0): 0.0 vs transformers in float32 (the same ops), 4.1e-7 vs float64
    assert max_rel_err(y, y_hf) <= 1e-6
    assert max_rel_err(y, y_hf64) <= 2e-6
    # the gate matters: without it the output differs at O(1)
    ref.output_gate = False
    with torch.no_grad():
        q_half = ref.q_proj.weight.view(N, 2, H, D)[:, 0].reshape(N * H, D).clone()
        ref.q_proj.weight = torch.nn.Parameter(q_half)
        y_ungated = ref(x, tl.rope_cos_sin(pos, CFG.rotary_dim, CFG.rope.theta))
    assert max_rel_err(y_ungated, y_hf) > 0.1


def test_jax_matches_torch_ref_outputs_and_gradients():
    _, _, module = _hf_module(3)
    ref = TorchAttention(CFG)
    ref.load_state_dict(module.state_dict())
    model = _jax_module(module.state_dict())
    x, ct = _x(4, B, T, D), _x(5, B, T, D)
    pos = np.broadcast_to(np.arange(T), (B, T))
    seg = np.array([[0] * 9 + [1] * 14, [0] * 23], np.int32)  # row 0: two packed documents

    xt = torch.from_numpy(x).requires_grad_(True)
    y_ref = ref(xt, tl.rope_cos_sin(torch.from_numpy(pos.copy()), CFG.rotary_dim, CFG.rope.theta),
                torch.from_numpy(seg))
    (y_ref * torch.from_numpy(ct)).sum().backward()
    grads_ref = {k: p.grad for k, p in ref.named_parameters()}

    graphdef, params = nnx.split(model, nnx.Param)
    rope = jl.rope_cos_sin(jnp.asarray(pos), CFG.rotary_dim, CFG.rope.theta)

    def loss(params, x):
        y = nnx.merge(graphdef, params)(x, rope, jnp.asarray(seg))
        return jnp.sum(y * ct), y

    (_, y), (g_params, g_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, jnp.asarray(x))
    grads = {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(g_params)}
    assert set(grads) == set(grads_ref) == {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                                            "q_norm.weight", "k_norm.weight"}
    # measured (also under taskset -c 0): output 2.0e-7, dx 3.1e-7, parameters <= 5.2e-7 (k_norm.weight; q_proj
    # 3.5e-7, q_norm 3.8e-7)
    assert max_rel_err(y, y_ref) <= 2e-6
    assert max_rel_err(g_x, xt.grad) <= 2e-6
    errs = {k: max_rel_err(grads[k], grads_ref[k]) for k in grads}
    assert max(errs.values()) <= 3e-6, errs


# ----------------------------------------------------------------------------- cached decoding of a whole model

V = 97
LM_CFG = ModelConfig.llama(vocab_size=V, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=64,
                           max_seq_len=64, rope=dict(partial_factor=0.25),
                           attention={"output_gate": True, "qk_norm": "head"})


def _tokens(seed: int, T: int = 20) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (2, T)), jnp.int32)


def _model(cfg: ModelConfig = LM_CFG, seed: int = 0) -> DecoderLM:
    """Every weight redrawn at 0.3 (1-D weights around 1), so attention and the gates are far from uniform."""
    model = DecoderLM(cfg, rngs=nnx.Rngs(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            x = var[...]
            noise = jax.random.normal(next(keys), x.shape, x.dtype)
            var[...] = 1.0 + 0.1 * noise if x.ndim == 1 else 0.3 * noise
    return model


@nnx.jit
def _extend(model: DecoderLM, tokens: jax.Array, cache):
    return model.extend(tokens, cache)  # compiled once per shape: eager dispatch is the slow part on CPU


@nnx.jit
def _forward(model: DecoderLM, tokens: jax.Array) -> jax.Array:
    return model(tokens)


def _cached(model: DecoderLM, tokens: jax.Array, cache) -> np.ndarray:
    """Prefill 13 tokens, then one at a time: the logits of every position."""
    out = _extend(model, tokens[:, :13], cache)
    steps = [out.logits]
    for t in range(13, tokens.shape[1]):
        out = _extend(model, tokens[:, t:t + 1], out.cache)
        steps.append(out.logits)
    return np.asarray(jnp.concatenate(steps, 1))


def _assert_close(got: np.ndarray, ref: np.ndarray, bound: float = 1e-5) -> None:
    scale = np.abs(ref).max()
    assert scale > 1.0, "logits too small to prove anything"
    assert np.abs(got - ref).max() <= bound * scale, f"max|diff| {np.abs(got - ref).max() / scale:.1e} x max|ref|"


def _paged(cfg: ModelConfig = LM_CFG) -> PagedKVCache:
    paged = PagedKVCache.init(cfg, 2, 40, num_pages=24, page_size=4)
    table = np.zeros((2, 10), np.int32)
    pages = np.random.default_rng(3).permutation(np.arange(1, 24))
    table[0], table[1] = pages[:10], pages[10:20]
    return paged.replace(page_table=jnp.asarray(table))


def test_cached_and_paged_decoding_equal_the_full_forward():
    model, tokens = _model(), _tokens(1)
    assert model.layers[0].self_attn.q_proj.weight[...].shape == (2 * 4 * 16, 48)
    ref = np.asarray(_forward(model, tokens))
    # measured (also under taskset -c 0): 6.7e-7 (contiguous) and 4.5e-7 (paged) x max|logit|
    _assert_close(_cached(model, tokens, KVCache.init(LM_CFG, 2, 40)), ref, bound=5e-6)
    _assert_close(_cached(model, tokens, _paged()), ref, bound=5e-6)


def test_lora_on_the_wide_q_proj():
    """q_proj is twice as wide: a LoRA adapter on it (B moved off zero) must split with it into query and gate, in
    the cached path and when merged into the base weight."""
    model, tokens = _model(seed=2), _tokens(4)
    base = np.asarray(_forward(model, tokens))
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=("q", "o")), rngs=nnx.Rngs(5))
    mods = list(lora_modules(model))
    for i, (_, m) in enumerate(mods):
        m.lora_B.weight[...] = 0.2 * jax.random.normal(jax.random.key(10 + i), m.lora_B.weight.shape)
        m.deterministic = True
    assert any(m.lora_B.weight[...].shape[0] == 2 * 4 * 16 for _, m in mods)
    ref = np.asarray(_forward(model, tokens))
    _assert_close(_cached(model, tokens, KVCache.init(LM_CFG, 2, 40)), ref, bound=5e-6)  # measured 9.2e-7
    _assert_close(np.asarray(_forward(merge_lora(model), tokens)), ref, bound=5e-6)  # measured 9.1e-7
    assert np.abs(ref - base).max() > 0.1 * np.abs(base).max()  # the adapter does change the model


def test_int8_weights_on_the_wide_q_proj():
    """One scale per output row of q_proj, query and gate rows alike: the int8 model is the float model holding its
    dequantized weights, and its cached decoding equals its own full forward."""
    qmodel, tokens = quantize_model(_model(seed=3), QuantSpec(bits=8)), _tokens(6)
    assert qmodel.layers[0].self_attn.q_proj.weight[...].shape == (2 * 4 * 16, 48)
    ref = np.asarray(_forward(qmodel, tokens))
    _assert_close(np.asarray(_forward(dequantized_model(qmodel), tokens)), ref, bound=5e-6)  # measured 9.2e-7
    _assert_close(_cached(qmodel, tokens, _paged()), ref, bound=5e-6)  # measured 7.6e-7 (int8 both sides)


def test_output_gate_with_latent_attention_is_refused():
    with pytest.raises(ValueError, match="attention.output_gate"):
        ModelConfig.llama(vocab_size=V, d_model=48, n_heads=4, head_dim=20, latent=dict(kv_rank=8, rope_dim=8),
                          attention=dict(output_gate=True))
