"""`jaxformer viz SOURCE --prompt TEXT --out DIR`: what a decoder LM does with one prompt, as PNGs and index.html."""

from __future__ import annotations

import argparse
import html
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxformer.config import EncDecConfig
from jaxformer.data.tokenizer import load_tokenizer_for
from jaxformer.interop.auto import load_any
from jaxformer.models.layers import sinusoidal_positions
from jaxformer.viz import analysis, figures
from pallas_kernels.flash_attention import BlockSizes

EXAMPLE_MESH = {"data": 2, "fsdp": 2, "tensor": 2}

CAPTIONS = {
    "tokens": "The prompt as the tokenizer splits it (byte-level BPE: frequent character runs become one token).",
    "embeddings": "Each token id picks a row of the embedding table: how alike the prompt's token vectors are "
                  "(left; a repeated token matches itself), and how long the table's rows are (right).",
    "attention": "Attention weights of every layer (rows) and head (columns): row t is how query token t spreads its "
                 "attention over the key tokens (causal: nothing right of the diagonal; sliding layers: a band).",
    "positions": "How the model encodes positions.",
    "residual_norms": "Norm of the residual stream after the embedding, after each block and after the final norm: "
                      "how much each block writes into the stream, position by position.",
    "next_token_loss": "The training loss token by token: -log p(the actual next token) at each position, the "
                       "quantity the optimizer minimises (averaged over every position of every batch).",
    "sharding": "How the weights would split over a mesh of 8 devices (data 2 x fsdp 2 x tensor 2): each weight's "
                "logical axes (vocab, embed, heads, mlp) map onto mesh axes through jaxformer.sharding's one table.",
    "flash_tiles": "How the Pallas FlashAttention kernel walks causal attention in tiles: tiles above the diagonal "
                   "are never computed, so a long context costs about half of the full T x T.",
    "delta_net": "Gated DeltaNet layers (linear attention, Qwen3.5 / Qwen3-Next): instead of attention weights, each "
                 "value head keeps one matrix of memory. Left: the decay exp(g) that scales it before each token is "
                 "written (near 1 remembers, near 0 forgets); right: how large the matrix is after each token.",
    "logit_lens": "Logit lens: the final norm and output head applied after every block. Each cell is the token "
                  "that stage would predict next, shaded by its probability; the last row is the model's output.",
}
POSITION_CAPTIONS = {
    "rope": "Rotary position embedding (RoPE): each pair of query/key dimensions rotates by p * theta_i at position "
            "p; fast pairs tell neighbours apart, slow pairs carry long distances, and q.k depends only on the "
            "distance (right).",
    "sinusoidal": "Sinusoidal position encodings added to the embeddings (Vaswani et al. 2017): sin on the first "
                  "half of the dimensions, cos on the second, wavelengths growing geometrically.",
    "learned": "Learned position embeddings (GPT-2): neighbouring positions learn similar vectors (left).",
}


def run(args: argparse.Namespace) -> None:
    """Write the figures and index.html; print where they are."""
    paths = visualize(args.source, args.prompt, args.out, tokenizer=args.tokenizer)
    for name, path in paths.items():
        print(f"{name}: {path}")


def visualize(source: str | Path, prompt: str, out: str | Path, *, tokenizer: str | None = None) -> dict[str, Path]:
    """The figures of `prompt` through the model at `source`, and the index.html that shows them; {name: path}."""
    model = load_any(source, attention_impl="xla", compute_dtype="float32", remat="none", scan_layers=False)
    cfg = model.config
    if isinstance(cfg, EncDecConfig):
        raise ValueError(f"{source} is an encoder-decoder; viz draws decoder-only language models "
                         "(`jaxformer parity` checks encoder-decoders)")
    if cfg.block == "gemma3n":  # its blocks attend from AltUp's prediction of the streams, which the capture omits
        raise ValueError(f"{source} is a Gemma 3n model: viz does not draw its AltUp streams (attention maps and the "
                         "logit lens would be of the active stream alone); `jaxformer parity` checks it layer by layer")
    tok = load_tokenizer_for(source, tokenizer)
    ids = tok.encode_prompt(prompt)
    if len(ids) < 2:
        raise ValueError(f"the prompt gives {len(ids)} token(s); attention maps need at least 2")
    if len(ids) > cfg.max_seq_len:
        raise ValueError(f"the prompt has {len(ids)} tokens, more than the model's max_seq_len={cfg.max_seq_len}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokens = np.asarray([ids], np.int32)
    positions = jnp.arange(len(ids), dtype=jnp.int32)[None]
    labels = [token_label(tok.token_text(i)) for i in ids]
    hidden, logits = analysis.capture(model, tokens)
    table = np.asarray(model.embed_tokens.weight[...], np.float32)  # [V, D]

    paths = {"tokens": figures.tokens_figure(labels, ids, out / "tokens.png"),
             "embeddings": figures.embeddings_figure(table[ids], labels, np.linalg.norm(table, axis=-1),
                                                     out / "embeddings.png"),
             "attention": figures.attention_maps(analysis.attention_probs(model, hidden, positions), labels,
                                                 out / "attention.png", kv_group=cfg.n_heads // cfg.n_kv_heads,
                                                 layer_ids=analysis.attention_layers(model))}
    delta_ids, decay, state_norm = analysis.delta_net_dynamics(model, hidden)
    if delta_ids:  # Qwen3.5 / Qwen3-Next: their linear_attention layers have a decay and a state, not a softmax
        paths["delta_net"] = figures.delta_net_figure(delta_ids, decay, state_norm, labels, out / "delta_net.png")
    if cfg.position in POSITION_CAPTIONS:
        paths["positions"] = positions_figure(model, out / "positions.png")
    paths["residual_norms"] = figures.residual_norms_figure(*analysis.residual_norms(hidden), labels,
                                                            out / "residual_norms.png")
    nll, p = analysis.next_token_loss(logits, tokens)
    paths["next_token_loss"] = figures.next_token_loss_figure(nll[0], p[0], labels, out / "next_token_loss.png")
    names, top, prob = analysis.logit_lens(model, hidden)
    paths["logit_lens"] = figures.logit_lens_figure(names, top, prob, lambda i: token_label(tok.token_text(i)),
                                                    labels, out / "logit_lens.png")
    paths["sharding"] = figures.sharding_figure(analysis.sharding_layout(model, EXAMPLE_MESH), EXAMPLE_MESH,
                                                out / "sharding.png")
    paths["flash_tiles"] = flash_tiles_figure(cfg, out / "flash_tiles.png")
    paths["index"] = write_index(out, source, prompt, cfg, paths)
    return paths


def positions_figure(model, path: Path) -> Path:
    """The figure of whichever positional encoding the model uses (RoPE, sinusoidal table, learned table)."""
    cfg = model.config
    span = min(cfg.max_seq_len, 256)
    if cfg.position == "rope":
        return figures.rope_figure(analysis.rope_frequencies(cfg, span), cfg.head_dim, span, path)
    if cfg.position == "sinusoidal":
        table = np.asarray(sinusoidal_positions(jnp.arange(span), cfg.d_model))
        return figures.table_figure(table, "sinusoidal position encodings", "dimension", path)
    return figures.learned_positions_figure(np.asarray(model.embed_positions.weight[...][:span], np.float32), path)


def flash_tiles_figure(cfg, path: Path) -> Path:
    """The flash kernel's tiles at this model's context and at 2048 tokens (its default tiles for head_dim)."""
    blocks = BlockSizes.default(cfg.head_dim, jnp.bfloat16)
    window = cfg.attention.sliding_window if cfg.layer_type(0) == "sliding_attention" else None
    panels = []
    for length in dict.fromkeys([cfg.max_seq_len, 2048]):
        b = blocks.fitted(length, length)
        panels.append((f"{length} tokens" + (f", window {window}" if window else ""),
                       analysis.flash_tiles(length, b.block_q, b.block_k, window), b.block_q, b.block_k))
    return figures.flash_tiles_figure(panels, path)


def token_label(text: str) -> str:
    """A token as an axis label: escapes visible (\\n, \\t), spaces as a middle dot."""
    shown = repr(text)[1:-1].replace(" ", "\u00b7")
    return shown or "\u2205"


def write_index(out: Path, source, prompt: str, cfg, paths: dict[str, Path]) -> Path:
    """index.html: the prompt, the model in one line, and every figure with its caption."""
    captions = {**CAPTIONS, "positions": POSITION_CAPTIONS.get(cfg.position, "")}
    sections = "\n".join(f'<h2>{name.replace("_", " ")}</h2>\n<p>{html.escape(captions[name])}</p>\n'
                         f'<a href="{p.name}"><img src="{p.name}" alt="{name}" style="max-width:100%"></a>'
                         for name, p in paths.items())
    model_line = (f"{cfg.family or 'custom'} family, {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads "
                  f"({cfg.n_kv_heads} kv), {cfg.position} positions, vocabulary {cfg.vocab_size}")
    page = (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>jaxformer viz: {html.escape(str(source))}"
            f"</title></head>\n<body style=\"font-family:sans-serif;max-width:1400px;margin:auto\">\n"
            f"<h1>{html.escape(str(source))}</h1>\n<p>{html.escape(model_line)}</p>\n"
            f"<p>prompt: <code>{html.escape(prompt)}</code></p>\n{sections}\n</body></html>\n")
    path = out / "index.html"
    path.write_text(page)
    return path
