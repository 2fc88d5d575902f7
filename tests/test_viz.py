"""`jaxformer viz`: every figure written and non-blank, index.html links them, and the attention maps are the
model's own attention (recomputed weights reproduce its attention output)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxformer
from jaxformer import cli
from jaxformer.config import ModelConfig
from jaxformer.models.decoder import rope_for, rope_tables
from jaxformer.models.delta_net import DeltaNetState
from jaxformer.viz import analysis
from jaxformer.viz.command import positions_figure
from parity_tests.conftest import random_jax_module

PROMPT = "def add(a, b):\n    return a + b\n"
SMALL = dict(d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=64)
FIGURES = ["tokens", "embeddings", "attention", "positions", "residual_norms", "next_token_loss", "logit_lens",
           "sharding", "flash_tiles"]


@nnx.jit
def mixed_through_o_proj(model, inputs, probs, positions):
    """Per layer: (o_proj of the maps' mix of the values, the layer's own attention output) on its block input."""
    ropes = rope_tables(model.config, positions)
    out = []
    for layer, x, p in zip(model.layers, inputs, probs):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        _, v = attn.project_kv(h)  # [B, T, K, H]
        v = jnp.repeat(v, attn.n_heads // attn.n_kv_heads, axis=2)  # [B, T, N, H]
        mixed = jnp.einsum("bnts,bsnh->btnh", p, v).reshape(*x.shape[:2], -1)
        out.append((attn.o_proj(mixed), attn(h, rope_for(layer, ropes))))
    return out


def random_model(cfg: ModelConfig, seed: int = 1):
    return random_jax_module(lambda: jaxformer.DecoderLM(cfg, rngs=nnx.Rngs(0)), seed)


def assert_not_blank(path) -> None:
    import matplotlib.image

    pixels = matplotlib.image.imread(path)[..., :3]
    assert pixels.shape[0] > 150 and pixels.shape[1] > 400, path
    assert pixels.var() > 1e-3, f"{path} is blank"


def test_viz_writes_every_figure(tokenizer, tmp_path):
    cfg = ModelConfig.llama(vocab_size=tokenizer.vocab_size, **SMALL, n_kv_heads=2)
    src = jaxformer.save(random_model(cfg), tmp_path / "model")
    tokenizer.save(src)
    cli.main(["viz", str(src), "--prompt", PROMPT, "--out", str(tmp_path / "viz")])
    for name in FIGURES:
        assert_not_blank(tmp_path / "viz" / f"{name}.png")
    page = (tmp_path / "viz" / "index.html").read_text()
    assert set(re.findall(r'<img src="([^"]+)"', page)) == {f"{n}.png" for n in FIGURES}
    assert "return a + b" in page


@pytest.mark.parametrize("position", ["learned", "sinusoidal"])
def test_positions_figure_follows_the_model(position, tmp_path):
    """GPT-2's learned table (similarity of its rows) and the sinusoidal table get their own figures."""
    cfg = ModelConfig.gpt2(vocab_size=64, **SMALL) if position == "learned" else ModelConfig.llama(
        vocab_size=64, **SMALL, position="sinusoidal")
    assert_not_blank(positions_figure(random_model(cfg), tmp_path / "positions.png"))


def test_attention_maps_are_the_models_attention():
    """probs @ v through o_proj equals each layer's attention output, for a sandwich-norm model with q/k norms,
    GQA, soft-capped scores and a sliding and a full layer; every map is non-constant; the logit lens's last
    stage is the model's own prediction."""
    cfg = ModelConfig.llama(vocab_size=80, **SMALL, n_kv_heads=2, norm_placement="sandwich", qk_norm="head",
                            attn_logit_softcap=5.0, sliding_window=5,
                            layer_types=("sliding_attention", "full_attention"))
    model = random_model(cfg, seed=3)
    T = 12
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, T)).astype(np.int32)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (2, T))
    hidden, logits = analysis.capture(model, tokens)
    probs = analysis.attention_probs(model, hidden, positions)  # [L, B, N, T, T]
    assert probs.shape == (2, 2, 4, T, T) and np.allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert (probs.reshape(-1, T * T).var(-1) > 0).all()
    assert probs[0, :, :, -1, : T - 5].max() == 0.0  # the sliding layer's last query sees only 5 keys

    for got, want in mixed_through_o_proj(model, analysis.block_inputs(model, hidden), jnp.asarray(probs), positions):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)

    names, top, _ = analysis.logit_lens(model, hidden)
    assert names[-1] == "layers.1" and (top[-1] == np.asarray(jax.device_get(logits)).argmax(-1)).all()


def test_viz_on_gemma4(tokenizer, tmp_path):
    """Gemma 4's kv-shared layers score their queries against their source layer's keys: each map mixes the source's
    values into the layer's own attention output; the command writes every figure for such a model."""
    from jaxformer.models import model_class

    cfg = ModelConfig.llama(vocab_size=tokenizer.vocab_size, **{**SMALL, "n_layers": 4}, n_kv_heads=2, block="gemma4",
                            norm_placement="sandwich", layer_types=("sliding_attention", "full_attention") * 2,
                            per_layer_dim=4, kv_shared_layers=2, activation="gelu_tanh",
                            rope=dict(theta=1e6, local_theta=1e4,
                                      scaling=dict(rope_type="proportional", partial_rotary_factor=0.25)),
                            attention=dict(qk_norm="head", v_norm=True, scale=1.0, sliding_window=5,
                                           global_head_dim=16, global_kv_heads=1, k_eq_v=True))
    model = random_jax_module(lambda: model_class(cfg)(cfg, rngs=nnx.Rngs(0)), 3)
    T = 12
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, T)).astype(np.int32)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (2, T))
    hidden, _ = analysis.capture(model, tokens)
    inputs = analysis.block_inputs(model, hidden)
    probs = analysis.attention_probs(model, hidden, positions)  # [L, B, N, T, T]
    ropes = rope_tables(cfg, positions)
    kv = {}
    for i, (layer, x, p) in enumerate(zip(model.layers, inputs, probs)):
        attn, h = layer.self_attn, layer.input_layernorm(x)
        if layer.shares_kv:
            k, v = kv[layer.kv_source]
            want = attn.reuse(h, rope_for(layer, ropes), None, (k, v))
        else:
            want, (k, v) = attn(h, rope_for(layer, ropes), return_kv=True)
            kv[i] = (k, v)
        mixed = jnp.einsum("bnts,bsnh->btnh", p, jnp.repeat(v, attn.n_heads // v.shape[2], axis=2))
        got, want = np.asarray(attn.o_proj(mixed.reshape(2, T, -1))), np.asarray(want)
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()  # measured <= 3.9e-7 relative
    src = jaxformer.save(model, tmp_path / "model")
    tokenizer.save(src)
    cli.main(["viz", str(src), "--prompt", PROMPT, "--out", str(tmp_path / "viz")])
    for name in FIGURES:
        assert_not_blank(tmp_path / "viz" / f"{name}.png")


def test_viz_on_latent_attention(tokenizer, tmp_path):
    """DeepSeek's latent attention: each map, mixing the values expanded from the latent, gives the layer's own
    attention output; the command writes every figure for a DeepSeek-V3-like model (a dense layer, then experts)."""
    cfg = ModelConfig.llama(vocab_size=tokenizer.vocab_size, **SMALL, head_dim=12,
                            latent=dict(kv_rank=16, q_rank=12, rope_dim=4, v_head_dim=8),
                            moe=dict(n_experts=4, n_experts_per_token=2, router="deepseek", n_group=2, topk_group=1,
                                     shared_d_ff=16, dense_layers=(0,)))
    model = random_model(cfg, seed=3)
    T = 12
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, T)).astype(np.int32)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (2, T))
    hidden, _ = analysis.capture(model, tokens)
    probs = analysis.attention_probs(model, hidden, positions)  # [L, B, N, T, T]
    assert probs.shape == (2, 2, 4, T, T) and (probs.reshape(-1, T * T).var(-1) > 0).all()
    ropes = rope_tables(cfg, positions)
    for layer, x, p in zip(model.layers, analysis.block_inputs(model, hidden), probs):
        attn, h = layer.self_attn, layer.input_layernorm(x)
        _, _, v = attn.query_key_value(h, rope_for(layer, ropes))  # [B, T, N, dv]
        got = np.asarray(attn.o_proj(jnp.einsum("bnts,bsnh->btnh", p, v).reshape(2, T, -1)))
        want = np.asarray(attn(h, rope_for(layer, ropes)))
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    src = jaxformer.save(model, tmp_path / "model")
    tokenizer.save(src)
    cli.main(["viz", str(src), "--prompt", PROMPT, "--out", str(tmp_path / "viz")])
    for name in FIGURES:
        assert_not_blank(tmp_path / "viz" / f"{name}.png")


def test_viz_on_a_hybrid(tokenizer, tmp_path):
    """Qwen3.5-like layers with an LFM2-like conv layer: attention maps for the attending block only; each Gated
    DeltaNet layer's decay is exp(-exp(A_log) softplus(x W_a + dt_bias)) (numpy, float64) and its state norm after
    token t that of the final state of the layer's own chunked form run over the first t tokens."""
    cfg = ModelConfig.llama(vocab_size=tokenizer.vocab_size, **{**SMALL, "n_layers": 3}, head_dim=8,
                            layer_types=("linear_attention", "conv", "full_attention"), conv=dict(kernel=3),
                            attention=dict(output_gate=True, qk_norm="head"),
                            linear=dict(key_heads=2, value_heads=4, key_head_dim=8, value_head_dim=8, chunk_size=4))
    model = random_model(cfg, seed=4)
    T = 11
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, T)).astype(np.int32)
    positions = jnp.arange(T, dtype=jnp.int32)[None]
    hidden, _ = analysis.capture(model, tokens)
    assert analysis.attention_layers(model) == [2]
    assert analysis.attention_probs(model, hidden, positions).shape == (1, 1, 4, T, T)
    ids, decay, norm = analysis.delta_net_dynamics(model, hidden)
    assert ids == [0] and decay.shape == norm.shape == (1, 1, T, 4)
    layer = model.layers[0]
    h = layer.input_layernorm(analysis.block_inputs(model, hidden)[0])  # [1, T, D]
    net = layer.linear_attn
    a = np.asarray(h, np.float64) @ np.asarray(net.in_proj_a.weight[...], np.float64).T  # [1, T, H]
    softplus = np.log1p(np.exp(a + np.asarray(net.dt_bias[...], np.float64)))
    want = np.exp(-np.exp(np.asarray(net.A_log[...], np.float64)) * softplus)
    np.testing.assert_allclose(decay[0], want, rtol=1e-5, atol=1e-6)
    assert 0 < decay.min() and decay.max() < 1
    for t in (1, 5, T):
        _, state = net(h[:, :t], state=DeltaNetState.init(cfg, 1))
        s = np.linalg.norm(np.asarray(state.recurrent, np.float64), axis=(-2, -1))[0]  # [H]
        np.testing.assert_allclose(norm[0, 0, t - 1], s, rtol=1e-5)
    src = jaxformer.save(model, tmp_path / "model")
    tokenizer.save(src)
    cli.main(["viz", str(src), "--prompt", PROMPT, "--out", str(tmp_path / "viz")])
    for name in FIGURES + ["delta_net"]:
        assert_not_blank(tmp_path / "viz" / f"{name}.png")


def test_viz_refuses_gemma3n_by_name(tokenizer, tmp_path, capsys):
    from jaxformer.models import model_class
    from tests.test_cli import main_in_process

    cfg = ModelConfig.llama(vocab_size=tokenizer.vocab_size, **{**SMALL, "n_layers": 2}, n_kv_heads=2, block="gemma3n",
                            norm_placement="sandwich", per_layer_dim=4, laurel_rank=2, altup=dict(inputs=2),
                            attention=dict(qk_norm="head", v_norm=True, scale=1.0))
    src = jaxformer.save(random_jax_module(lambda: model_class(cfg)(cfg, rngs=nnx.Rngs(0)), 3), tmp_path / "model")
    tokenizer.save(src)
    code, _, err = main_in_process(capsys, "viz", src, "--prompt", PROMPT, "--out", tmp_path / "viz")
    assert code == 2 and "Gemma 3n model: viz does not draw its AltUp streams" in err, err
