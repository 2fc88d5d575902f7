"""The encoder-decoder's loss for the shared train step (jaxformer.train.step), and its FLOP count.

The logged `loss` and `val_loss` are the plain per-token cross-entropy (perplexity = exp); the gradient
is that of the label-smoothed loss (Szegedy et al. 2016; Vaswani et al. 2017 use 0.1).
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from jaxformer.config import EncDecConfig
from jaxformer.seq2seq.data import Pairs
from jaxformer.train.losses import label_smoothed_sums
from jaxformer.train.step import LossFn

Batch = dict[str, jax.Array]  # see jaxformer.seq2seq.data: src, src_mask, tgt_in, tgt_out, loss_mask, rows, index


def seq2seq_loss(graphdef: nnx.GraphDef, *, label_smoothing: float) -> LossFn:
    """Label-smoothed cross-entropy over target tokens; `extra` is the step's dropout key (None: no dropout).

    Micro-batch i of an accumulated step draws its dropout from fold_in(key, i).
    """

    def loss_fn(params, batch: Batch, key: jax.Array | None, micro):
        key = key if isinstance(key, jax.Array) else None  # evaluation passes no key
        if key is not None and micro is not None:
            key = jax.random.fold_in(key, micro)
        model = nnx.merge(graphdef, params)
        logits = model(batch["src"], batch["tgt_in"], batch["src_mask"], dropout_key=key)  # [B, T, V]
        loss, nll, n = label_smoothed_sums(logits, batch["tgt_out"], batch["loss_mask"], label_smoothing)
        return loss, (nll, n)

    return loss_fn


def flops_per_target_token(cfg: EncDecConfig, pairs: Pairs) -> float:
    """Training FLOPs per target token: 6 x matmul weights per token (encoder weights once per source
    token), plus attention scores/values, at the split's mean lengths."""
    S = float(np.mean([len(s) for s in pairs.src]))
    T = float(np.mean([len(t) for t in pairs.tgt]))
    D, F, V, NH = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_heads * cfg.head_dim
    attn = 2 * D * NH + 2 * D * cfg.n_kv_heads * cfg.head_dim
    mlp = D * F * (3 if cfg.gated_mlp else 2)
    enc = cfg.n_encoder_layers * (attn + mlp)
    dec = cfg.n_layers * (2 * attn + mlp) + D * V
    return 6.0 * (dec + enc * S / T) + 12.0 * NH * (cfg.n_encoder_layers * S * S / T + cfg.n_layers * (T + S))
