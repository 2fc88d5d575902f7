"""matplotlib figures of one prompt through a model; each function writes one PNG and returns its path."""

from __future__ import annotations

from pathlib import Path

import numpy as np

MAX_LAYERS, MAX_HEADS = 12, 8  # an attention grid larger than this shows evenly spaced layers / heads
MAX_LABELS = 40  # token labels on an axis; longer prompts label every k-th token


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _pick(n: int, most: int) -> list[int]:
    """Up to `most` evenly spaced indices of range(n), first and last included."""
    return list(range(n)) if n <= most else sorted({round(i * (n - 1) / (most - 1)) for i in range(most)})


def _ticks(ax, labels: list[str], axis: str) -> None:
    step = max(1, -(-len(labels) // MAX_LABELS))
    idx = list(range(0, len(labels), step))
    fontsize = 7 if len(idx) <= 24 else 5
    if axis == "x":
        ax.set_xticks(idx, [labels[i] for i in idx], rotation=90, fontsize=fontsize)
    else:
        ax.set_yticks(idx, [labels[i] for i in idx], fontsize=fontsize)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def tokens_figure(labels: list[str], ids: list[int], path: Path) -> Path:
    """The prompt as the tokenizer splits it: one box per token, its text above its id."""
    plt = _plt()
    per_row = 16
    rows = -(-len(labels) // per_row)
    fig, ax = plt.subplots(figsize=(14, 0.9 * rows + 0.8))
    colours = plt.get_cmap("tab20")
    for i, (label, tid) in enumerate(zip(labels, ids)):
        r, c = divmod(i, per_row)
        ax.add_patch(plt.Rectangle((c, -r - 0.9), 0.95, 0.85, color=colours(i % 20), alpha=0.55))
        ax.text(c + 0.47, -r - 0.35, label[:10], ha="center", va="center", fontsize=8, family="monospace")
        ax.text(c + 0.47, -r - 0.72, str(tid), ha="center", va="center", fontsize=6, color="0.25")
    ax.set_xlim(0, per_row)
    ax.set_ylim(-rows, 0)
    ax.axis("off")
    ax.set_title(f"the prompt as {len(ids)} tokens (text, and id below)", fontsize=10)
    return _save(fig, path)


def embeddings_figure(vectors: np.ndarray, labels: list[str], table_norms: np.ndarray, path: Path) -> Path:
    """The prompt tokens' embedding vectors [T, D]: their cosine similarity; and every vocabulary row's norm."""
    plt = _plt()
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [1.2, 1]})
    im = a.imshow(unit @ unit.T, cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest")
    _ticks(a, labels, "x")
    _ticks(a, labels, "y")
    a.set_title("cosine similarity of the prompt tokens' embeddings", fontsize=10)
    fig.colorbar(im, ax=a)
    b.hist(table_norms, bins=60, color="tab:blue")
    b.set(title="norm of every row of the embedding table", xlabel="||e_v||", ylabel="tokens")
    return _save(fig, path)


def next_token_loss_figure(nll: np.ndarray, prob: np.ndarray, labels: list[str], path: Path) -> Path:
    """Cross-entropy -log p(next token) at every position of row 0 (the training loss, token by token)."""
    plt = _plt()
    T = len(nll)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.3 * T + 2), 4.2))
    ax.bar(np.arange(T), nll, color=plt.get_cmap("viridis")(prob))
    ax.axhline(nll.mean(), color="black", linestyle="--", linewidth=1, label=f"mean {nll.mean():.2f} nats")
    _ticks(ax, [f"{a} \u2192 {b}" for a, b in zip(labels[:-1], labels[1:])], "x")
    ax.set(title="next-token loss: -log p(actual next token) at each position (colour: p, 0 dark to 1 light)",
           ylabel="nats")
    ax.legend(fontsize=8)
    return _save(fig, path)


def attention_maps(probs: np.ndarray, labels: list[str], path: Path, kv_group: int = 1,
                   layer_ids: list[int] | None = None) -> Path:
    """Grid of attention maps (rows: layers, columns: heads) of batch row 0; probs [L, B, N, T, T] of the blocks
    layer_ids (default: 0..L-1; a hybrid's attending blocks); heads h and h' share a key/value head when
    h // kv_group == h' // kv_group (GQA)."""
    layer_ids = list(range(probs.shape[0])) if layer_ids is None else layer_ids
    plt = _plt()
    layers, heads = _pick(probs.shape[0], MAX_LAYERS), _pick(probs.shape[2], MAX_HEADS)
    T = probs.shape[-1]
    cell = max(1.6, min(3.2, 0.09 * T))
    fig, axes = plt.subplots(len(layers), len(heads), figsize=(cell * len(heads) + 1.5, cell * len(layers) + 1.0),
                             squeeze=False)
    for r, li in enumerate(layers):
        for c, hi in enumerate(heads):
            ax = axes[r, c]
            ax.imshow(probs[li, 0, hi], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"layer {layer_ids[li]} head {hi}" + (f" (kv {hi // kv_group})" if kv_group > 1 else ""),
                         fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                _ticks(ax, labels, "y")
            if r == len(layers) - 1:
                _ticks(ax, labels, "x")
    fig.suptitle("attention weights (row: query token, column: key token; softmax, 0 to 1)", fontsize=10)
    fig.supxlabel("key token", fontsize=9)
    fig.supylabel("query token", fontsize=9)
    return _save(fig, path)


def delta_net_figure(layer_ids: list[int], decay: np.ndarray, norm: np.ndarray, labels: list[str],
                     path: Path) -> Path:
    """Gated DeltaNet layers over the prompt (batch row 0): per value head, the decay exp(g_t) that scales its state
    before token t is written (left; 1: keeps everything, 0: forgets) and the state's Frobenius norm after token t
    (right). decay, norm [L, B, T, H]."""
    plt = _plt()
    rows = _pick(len(layer_ids), MAX_LAYERS)
    T = decay.shape[2]
    fig, axes = plt.subplots(len(rows), 2, figsize=(max(8.0, 0.2 * T + 4), 1.2 + 1.6 * len(rows)), squeeze=False)
    for r, li in enumerate(rows):
        for c, (data, title, cmap, vmax) in enumerate(((decay, "decay exp(g)", "viridis", 1.0),
                                                       (norm, "state norm", "magma", None))):
            ax = axes[r, c]
            im = ax.imshow(data[li, 0].T, aspect="auto", cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest")
            ax.set_title(f"layer {layer_ids[li]}: {title}", fontsize=8)
            ax.set_ylabel("value head", fontsize=7)
            fig.colorbar(im, ax=ax, fraction=0.03)
            if r == len(rows) - 1:
                _ticks(ax, labels, "x")
            else:
                ax.set_xticks([])
    fig.suptitle("Gated DeltaNet layers: what each head keeps of its memory, and how much it holds", fontsize=10)
    return _save(fig, path)


def rope_figure(freqs: dict[str, np.ndarray], head_dim: int, max_pos: int, path: Path) -> Path:
    """RoPE: frequency per dimension pair, the rotation cos(p * theta_i) over positions (of the first entry of
    `freqs`), and the relative-position kernel mean_i cos(d * theta_i) that a query-key dot product of constant
    vectors follows (Su et al. 2021)."""
    plt = _plt()
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.2))
    for name, f in freqs.items():
        a.semilogy(np.arange(len(f)), f, marker=".", label=name)
    a.set(title="rotation frequency per dimension pair", xlabel=f"pair i (of head_dim / 2 = {head_dim // 2})",
          ylabel="theta_i (radians per position)")
    a.legend(fontsize=8)
    name, used = next(iter(freqs.items()))  # what full-attention layers use
    pos = np.arange(max_pos)
    im = b.imshow(np.cos(pos[:, None] * used[None, :]), aspect="auto", cmap="RdBu", vmin=-1, vmax=1,
                  interpolation="nearest")
    b.set(title=f"rotation cos(p * theta_i) ({name})", xlabel="pair i", ylabel="position p")
    fig.colorbar(im, ax=b)
    d = np.arange(max_pos)
    for label, f in freqs.items():
        c.plot(d, np.cos(d[:, None] * f[None, :]).mean(-1), label=label)
    c.set(title="relative-position kernel mean_i cos(d * theta_i)", xlabel="query - key distance d",
          ylabel="q.k of constant vectors (relative)")
    c.legend(fontsize=8)
    return _save(fig, path)


def table_figure(table: np.ndarray, title: str, xlabel: str, path: Path, cmap: str = "RdBu") -> Path:
    """One heatmap [positions, columns] (the sinusoidal table)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    vmax = float(np.abs(table).max())
    im = ax.imshow(table, aspect="auto", cmap=cmap, vmin=-vmax, vmax=vmax, interpolation="nearest")
    ax.set(title=title, xlabel=xlabel, ylabel="position")
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def learned_positions_figure(table: np.ndarray, path: Path) -> Path:
    """Learned position embeddings [P, D]: their cosine similarity, and each one's norm."""
    plt = _plt()
    unit = table / np.maximum(np.linalg.norm(table, axis=-1, keepdims=True), 1e-12)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.8))
    im = a.imshow(unit @ unit.T, cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest")
    a.set(title="cosine similarity of learned position embeddings", xlabel="position", ylabel="position")
    fig.colorbar(im, ax=a)
    b.plot(np.linalg.norm(table, axis=-1))
    b.set(title="norm of each position's embedding", xlabel="position", ylabel="||p||")
    return _save(fig, path)


def residual_norms_figure(names: list[str], norms: np.ndarray, labels: list[str], path: Path) -> Path:
    """Residual-stream norms [S, B, T] of batch row 0: mean (and range) per stage, and every position's."""
    plt = _plt()
    n = norms[:, 0]  # [S, T]
    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw={"width_ratios": [1, 1.6]})
    x = np.arange(len(names))
    a.plot(x, n.mean(-1), marker="o", label="mean over positions")
    a.fill_between(x, n.min(-1), n.max(-1), alpha=0.25, label="min to max")
    a.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    a.set(title="residual-stream norm ||x|| per stage", ylabel="L2 norm")
    a.legend(fontsize=8)
    from matplotlib.colors import LogNorm

    im = b.imshow(n, aspect="auto", cmap="magma", interpolation="nearest",
                  norm=LogNorm(vmin=max(float(n.min()), 1e-6), vmax=float(n.max())))
    b.set_yticks(x, names, fontsize=8)
    _ticks(b, labels, "x")
    b.set(title="||x|| at every position (log colour scale)")
    fig.colorbar(im, ax=b)
    return _save(fig, path)


def logit_lens_figure(names: list[str], top: np.ndarray, prob: np.ndarray, decode, labels: list[str],
                      path: Path) -> Path:
    """The top token the model would predict after each stage, at each position (row 0, the first 40 positions);
    colour is its probability."""
    plt = _plt()
    T = min(top.shape[-1], MAX_LABELS)
    top, prob = top[:, 0, :T], prob[:, 0, :T]
    fig, ax = plt.subplots(figsize=(max(8.0, 0.62 * T + 2), 0.5 * len(names) + 2))
    im = ax.imshow(prob, aspect="auto", cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    for s in range(len(names)):
        for t in range(T):
            ax.text(t, s, decode(int(top[s, t]))[:6], ha="center", va="center", fontsize=6,
                    color="white" if prob[s, t] > 0.6 else "black")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    _ticks(ax, labels[:T], "x")
    ax.set(title="logit lens: the next token each stage predicts (text), and its probability (colour)",
           xlabel="input token (the prediction is for the token after it)")
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def sharding_figure(rows: list[tuple], mesh_shape: dict[str, int], path: Path) -> Path:
    """Share of each weight one device holds on `mesh_shape`, labelled shape -> mesh axes -> shard shape."""
    plt = _plt()
    n = len(rows)
    fig, ax = plt.subplots(figsize=(13, 0.34 * n + 1.6))
    shares = [int(np.prod(shard)) / int(np.prod(shape)) for _, shape, _, shard in rows]
    ax.barh(np.arange(n), shares, color=[plt.get_cmap("viridis")(0.15 + 0.7 * s) for s in shares])
    for i, (_, shape, spec, shard) in enumerate(rows):
        axes = ", ".join("-" if a is None else a if isinstance(a, str) else "+".join(a) for a in spec)
        ax.text(shares[i] + 0.01, i, f"{list(shape)} split over ({axes}) -> {list(shard)} per device", va="center",
                fontsize=7)
    ax.set_yticks(np.arange(n), [r[0] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.6)
    ax.set_xticks([0, 0.125, 0.25, 0.5, 1.0], ["0", "1/8", "1/4", "1/2", "1"])
    mesh = " x ".join(f"{k} {v}" for k, v in mesh_shape.items())
    ax.set(xlabel="share of the weight on one device",
           title=f"parameters on a mesh of {mesh} (sharding.RULES; the other blocks repeat block 0)")
    return _save(fig, path)


def flash_tiles_figure(panels: list[tuple[str, np.ndarray, int, int]], path: Path) -> Path:
    """FlashAttention's tiles over the causal mask: skipped, computed with a mask inside, computed whole."""
    plt = _plt()
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap(["#f0f0f0", "#f4a259", "#2a6f97"])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5.6), squeeze=False)
    for ax, (title, tiles, bq, bk) in zip(axes[0], panels):
        ax.imshow(tiles, cmap=cmap, vmin=0, vmax=2, interpolation="nearest")
        ax.set_xticks(np.arange(tiles.shape[1]))
        ax.set_yticks(np.arange(tiles.shape[0]))
        ax.tick_params(labelsize=7)
        ax.set_xticks(np.arange(-0.5, tiles.shape[1]), minor=True)
        ax.set_yticks(np.arange(-0.5, tiles.shape[0]), minor=True)
        ax.grid(which="minor", color="white", linewidth=1)
        done = int((tiles > 0).sum())
        ax.set(title=f"{title}\n{done} of {tiles.size} tiles computed ({bq} queries x {bk} keys each)",
               xlabel="key tile", ylabel="query tile")
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(i)) for i in range(3)]
    fig.legend(handles, ["skipped (all masked)", "computed, masked inside", "computed whole"], loc="upper center",
               bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=9)
    return _save(fig, path)
