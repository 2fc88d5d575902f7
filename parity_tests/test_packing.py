"""Packed rows: with segment ids and per-document positions, each document's logits equal its logits alone."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

import jaxformer
from jaxformer import ModelConfig
from parity_tests.conftest import assert_outputs_close, jax_logits, random_jax_module

T = 40
CONFIGS = {
    "gpt2": ModelConfig.gpt2(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=T),
    "llama": ModelConfig.llama(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                               max_seq_len=T),
}
# documents per row (lengths); the last row ends in a padding segment (id 0) that must not leak anywhere
ROWS = [[7, 13, 1, 19], [25, 9, 6]]


def pack(rng: np.random.Generator, vocab: int):
    tokens = rng.integers(0, vocab, (len(ROWS), T)).astype(np.int32)
    seg = np.zeros_like(tokens)
    pos = np.zeros_like(tokens)
    docs = []  # (row, start, length)
    for b, lengths in enumerate(ROWS):
        start = 0
        for i, n in enumerate(lengths):
            seg[b, start:start + n] = i + 1
            pos[b, start:start + n] = np.arange(n)
            docs.append((b, start, n))
            start += n
        pos[b, start:] = np.arange(T - start)  # padding tail: its own segment 0
    return tokens, pos, seg, docs


@pytest.mark.parametrize("family", list(CONFIGS))
def test_packed_documents_match_alone(family):
    cfg = CONFIGS[family]
    model = random_jax_module(lambda: jaxformer.DecoderLM(cfg, rngs=nnx.Rngs(0)), seed=21)
    rng = np.random.default_rng(22)
    tokens, pos, seg, docs = pack(rng, cfg.vocab_size)
    packed = jax_logits(model, tokens, pos, seg)  # [B, T, V]

    # each document alone, at the start of a row; the rest of the row is unrelated random tokens, which
    # causal attention keeps from influencing the document (one [N, T] batch: one compiled program)
    alone_tokens = rng.integers(0, cfg.vocab_size, (len(docs), T)).astype(np.int32)
    for i, (b, s, n) in enumerate(docs):
        alone_tokens[i, :n] = tokens[b, s:s + n]
    alone = jax_logits(model, alone_tokens)
    for i, (b, s, n) in enumerate(docs):
        assert_outputs_close(packed[b, s:s + n], alone[i, :n], f"row {b} document at {s}:{s + n}")

    # sanity: with one segment for the whole row, later documents do see their predecessors
    unpacked = jax_logits(model, tokens, pos, np.ones_like(seg))
    b, s, n = docs[1]
    assert np.abs(unpacked[b, s:s + n] - alone[1, :n]).max() > 1e-3
