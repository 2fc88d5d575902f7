"""The numbers behind the figures, computed by the model's own modules from its captured residual stream
(each function compiled whole with nnx.jit: op-by-op dispatch would compile every small op separately).

    trace = capture(model, tokens)                # the decoder's `capture`: embed_tokens, layers.{i}, norm
    attention_probs(model, trace, positions)      # [L, B, N, T, T]: each layer's softmax, as its attention sees it
    logit_lens(model, trace)                      # the final norm and head applied after every layer
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flax import nnx

from jaxformer.models.attention import make_mask
from jaxformer.models.latent_attention import LatentAttention
from jaxformer.models.decoder import DecoderLM, rope_for, rope_tables
from jaxformer.models.layers import apply_rope, rope_inv_freq
from jaxformer.sharding import fitted_spec

NEG_INF = -1e30


@nnx.jit
def _capture(model: DecoderLM, tokens: jax.Array):
    hidden: dict[str, jax.Array] = {}
    return hidden, model(tokens, capture=hidden)


def capture(model: DecoderLM, tokens: np.ndarray) -> tuple[dict[str, jax.Array], jax.Array]:
    """(residual stream {name: [B, T, D]} in forward order, logits [B, T, V]) of tokens [B, T]."""
    hidden, logits = _capture(model, jnp.asarray(tokens, jnp.int32))
    order = ["embed_tokens"] + [f"layers.{i}" for i in range(len(model.layers))] + ["norm"]
    return {k: hidden[k] for k in order}, logits  # jit returns the keys sorted: layers.10 before layers.2


def block_inputs(model: DecoderLM, hidden: dict[str, jax.Array]) -> list[jax.Array]:
    """What each block reads: the embedding for block 0, block i-1's output for block i."""
    return [hidden["embed_tokens"]] + [hidden[f"layers.{i}"] for i in range(len(model.layers) - 1)]


def attention_layers(model: DecoderLM) -> list[int]:
    """The blocks that attend (a hybrid's linear_attention / conv blocks have no attention weights)."""
    return [i for i, layer in enumerate(model.layers) if layer.self_attn is not None]


def attention_probs(model: DecoderLM, hidden: dict[str, jax.Array], positions: jax.Array) -> np.ndarray:
    """Each attending layer's weights [L, B, N, T, T] (float32), in attention_layers order; see _attention_probs."""
    return np.asarray(_attention_probs(model, block_inputs(model, hidden), positions))


def delta_net_dynamics(model: DecoderLM, hidden: dict[str, jax.Array]) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(Gated DeltaNet layer ids, each one's per-head decay exp(g) [L, B, T, H], state norm after each token
    [L, B, T, H]): what such a layer keeps of its memory from token to token, and how much it holds."""
    ids = [i for i, layer in enumerate(model.layers) if getattr(layer, "linear_attn", None) is not None]
    if not ids:
        return ids, np.zeros((0,)), np.zeros((0,))
    decay, norm = _delta_net_dynamics(model, [block_inputs(model, hidden)[i] for i in ids], tuple(ids))
    return ids, np.asarray(decay), np.asarray(norm)


@nnx.jit(static_argnums=2)
def _delta_net_dynamics(model: DecoderLM, inputs: list[jax.Array], ids: tuple[int, ...] | list[int]):
    out = [model.layers[i].linear_attn.dynamics(model.layers[i].input_layernorm(x)) for i, x in zip(ids, inputs)]
    return jnp.stack([d for d, _ in out]), jnp.stack([n for _, n in out])


@nnx.jit
def _attention_probs(model: DecoderLM, inputs: list[jax.Array], positions: jax.Array) -> jax.Array:
    """Each layer's attention weights [L, B, N, T, T] (float32), recomputed from its input as Attention computes
    them: the block's input norm, q/k projections (and q/k norms), RoPE, scale, soft-cap, causal/window mask. A
    kv-shared block (Gemma 4) scores its queries against its source block's keys."""
    ropes = rope_tables(model.config, positions)
    out, keys = [], {}
    for i, (layer, x) in enumerate(zip(model.layers, inputs)):
        attn = layer.self_attn
        if attn is None:  # a hybrid's linear_attention / conv block: no attention weights
            continue
        h = x if layer.input_layernorm is None else layer.input_layernorm(x)  # OLMo 2's post-norm blocks: x itself
        if isinstance(attn, LatentAttention):  # DeepSeek: each head's key expanded from the latent, already rotated
            q, k, _ = attn.query_key_value(h, rope_for(layer, ropes))
            scores = jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32), k.astype(jnp.float32)) * attn.scale
            mask = make_mask(x.shape[1], x.shape[1], causal=attn.causal, segment_ids=None, window=attn.window)
            out.append(jax.nn.softmax(jnp.where(mask[:, None], scores, NEG_INF), axis=-1))
            continue
        shared = getattr(layer, "shares_kv", False)
        q, k = attn.project_q(h), None if shared else attn.project_kv(h)[0]  # [B, T, N, H], [B, T, K, H]
        rope = rope_for(layer, ropes)
        if rope is not None:
            q, k = apply_rope(q, *rope), None if shared else apply_rope(k, *rope)
        if attn.qk_norm_after_rope:  # Hunyuan
            q, k = attn.q_norm(q), attn.k_norm(k)
        keys[i] = k = keys[layer.kv_source] if shared else k
        k = jnp.repeat(k, attn.n_heads // attn.n_kv_heads, axis=2)  # GQA: each kv head serves N / K query heads
        scores = jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32), k.astype(jnp.float32)) * attn.scale
        if attn.softcap is not None:
            scores = attn.softcap * jnp.tanh(scores / attn.softcap)
        T = x.shape[1]
        mask = make_mask(T, T, causal=attn.causal, segment_ids=None, window=attn.window)  # [1, T, T]
        scores = jnp.where(mask[:, None], scores, NEG_INF)
        if attn.sinks is not None:  # gpt-oss: each head's sink logit joins the softmax, then its column is dropped
            sink = jnp.broadcast_to(attn.sinks[...].astype(jnp.float32)[None, :, None, None], (*scores.shape[:3], 1))
            out.append(jax.nn.softmax(jnp.concatenate([scores, sink], -1), axis=-1)[..., :-1])
            continue
        out.append(jax.nn.softmax(scores, axis=-1))  # [B, N, T, T]
    return jnp.stack(out)


def lens_logits(model: DecoderLM, x: jax.Array) -> jax.Array:
    """The model's final norm and output head (and logit scale, soft-cap) applied to a residual stream [B, T, D]."""
    return model._logits(x)


def logit_lens(model: DecoderLM, hidden: dict[str, jax.Array]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(stage names, top token ids [S, B, T], their probabilities [S, B, T]) after the embedding and each block
    (nostalgebraist 2020, "interpreting GPT: the logit lens"); the last stage is the model's own prediction."""
    names = ["embed_tokens"] + [f"layers.{i}" for i in range(len(model.layers))]
    top, prob = _lens_top(model, [hidden[n] for n in names])
    return names, np.asarray(top), np.asarray(prob)


@nnx.jit
def _lens_top(model: DecoderLM, stages: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
    probs = [jax.nn.softmax(lens_logits(model, x), axis=-1) for x in stages]  # S x [B, T, V]
    return jnp.stack([p.argmax(-1) for p in probs]), jnp.stack([p.max(-1) for p in probs])


def next_token_loss(logits: jax.Array, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(-log p, p) of each actual next token [B, T - 1]: the training loss position by position."""
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits[:, :-1], jnp.float32), axis=-1))
    picked = np.take_along_axis(logp, np.asarray(tokens)[:, 1:, None], axis=-1)[..., 0]
    return -picked, np.exp(picked)


def residual_norms(hidden: dict[str, jax.Array]) -> tuple[list[str], np.ndarray]:
    """(stage names, L2 norm of every position's residual vector [S, B, T])."""
    return list(hidden), np.stack([np.linalg.norm(np.asarray(v, np.float32), axis=-1) for v in hidden.values()])


def rope_frequencies(cfg, seq_len: int) -> dict[str, np.ndarray]:
    """RoPE's rotation frequencies [H/2] (radians per position): first those of full-attention layers (scaled as
    the config says), then the unscaled base and the sliding layers' own base where they differ."""
    def freq(theta, scaling, layer_type="full_attention"):  # heads of the layer type's size (Gemma 4's full layers)
        dim = cfg.type_rotary_dim(layer_type)
        return np.asarray(rope_inv_freq(dim, theta, scaling, cfg.max_seq_len, seq_len)[0])

    scaled = "" if cfg.rope.scaling is None else f", {cfg.rope.scaling.rope_type} scaling"
    out = {f"full layers (base {cfg.rope.theta:g}{scaled})": freq(cfg.rope.theta, cfg.rope.scaling)}
    if cfg.rope.scaling is not None:
        out["without scaling"] = freq(cfg.rope.theta, None)
    if cfg.rope.local_theta is not None:
        out[f"sliding layers (base {cfg.rope.local_theta:g})"] = freq(cfg.rope.local_theta, None, "sliding_attention")
    return out


def sharding_layout(model: DecoderLM, mesh_shape: dict[str, int]) -> list[tuple[str, tuple, tuple, tuple]]:
    """(name, shape, mesh axes per dim, shape held per device) of the embedding, block 0 and the head's weights on
    a mesh of `mesh_shape`, by jaxformer.sharding's one table (the other blocks repeat block 0)."""
    cfg = model.config
    counts = {"heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads}
    rows = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = ".".join(map(str, path))
        if name.startswith("layers.") and not name.startswith("layers.0."):
            continue
        axes = var.get_metadata().get("logical_axes") or (None,) * len(var.shape)
        spec = tuple(fitted_spec(axes, var.shape, mesh_shape, counts))
        spec = spec + (None,) * (len(var.shape) - len(spec))
        split = [int(np.prod([mesh_shape[a] for a in ((s,) if isinstance(s, str) else s or ())])) for s in spec]
        rows.append((name, tuple(var.shape), spec, tuple(d // n for d, n in zip(var.shape, split))))
    return rows


def flash_tiles(length: int, block_q: int, block_k: int, window: int | None) -> np.ndarray:
    """Per (query tile, key tile) of causal attention over `length` tokens: 0 skipped (fully masked), 1 computed
    with a mask inside (the diagonal, a window's edge), 2 computed whole; as FlashAttention walks the tiles."""
    mask = np.asarray(make_mask(length, length, causal=True, segment_ids=None, window=window))[0]  # [T, S]
    nq, nk = -(-length // block_q), -(-length // block_k)
    out = np.zeros((nq, nk), np.int32)
    for i in range(nq):
        for j in range(nk):
            tile = mask[i * block_q:(i + 1) * block_q, j * block_k:(j + 1) * block_k]
            out[i, j] = 0 if not tile.any() else 2 if tile.all() else 1
    return out
