"""Ring attention: self-attention with the sequence split over the "context" mesh axis.

Liu, Zaharia, Abbeel, "Ring Attention with Blockwise Transformers for Near-Infinite Context" (2023),
https://arxiv.org/abs/2310.01889; the causal load balance is the "zigzag" layout of Llama 3's context
parallelism (Dubey et al. 2024, section 3.3.2).

Layout. With C devices on the ring, a sequence of T tokens is cut into 2C chunks of c = T / (2C) tokens and
device i holds chunks i and 2C-1-i (one from each end), so every device has the same share of the causal
triangle. `load_balanced_order` is that permutation; the LM loss applies it to inputs, targets, positions,
segment ids and the loss mask alike (`to_context_layout`), so RoPE positions and segment ids follow their
tokens and the summed loss is unchanged. Model code calling `attend` under a context mesh must pass
sequences in this layout (the LM loss is the one caller that does).

Ring. Each device keeps its queries [B, 2c, N, H] and passes its keys/values (and their segment ids) around
the ring with `ppermute`; each step's block is merged through its log-sum-exp. Causal step s > 0 brings device
i the chunks of device j = i - s (mod C): if j < i all of i's queries see j's first chunk and nothing of its
second; if j > i only i's second chunk of queries sees anything, all of j's keys. Either way half the block
is computed (a `lax.cond`), the other half never. A sliding window skips the ring steps whose chunks are all
farther apart than the window (the keys jump over them in one `ppermute`). The backward (a custom VJP)
recomputes the ring: K/V travel again, and so do their gradient accumulators dK/dV, which return home after
the last step; K and V are never gathered. GQA groups query heads over their kv head; K/V are not repeated.

Per block: plain XLA einsums (any backend), or the Pallas flash kernel (attention_impl="pallas") through its
`flash_block_forward` / `flash_block_backward`, which return and take the log-sum-exp the ring merges with.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxformer.sharding import fitted_spec, mesh_axis_size
from pallas_kernels.flash_attention import flash_block_backward, flash_block_forward

AXIS = "context"


@dataclasses.dataclass(frozen=True)
class _Static:
    ring: int  # C, devices on the ring
    causal: bool
    scale: float
    window: int | None
    softcap: float | None
    pallas: bool


def context_size() -> int:
    """Devices on the "context" axis of the current (abstract) mesh; 1 without a mesh."""
    return mesh_axis_size(AXIS)


def check_length(seq_len: int, ring: int) -> None:
    """The load-balanced layout needs 2C chunks of equal length: a clear error otherwise."""
    if seq_len % (2 * ring):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2 x mesh.context = {2 * ring}: context "
                         f"parallelism cuts each sequence into 2C equal chunks (one from each end per device); choose "
                         f"--data.seq_len as a multiple of {2 * ring} or a smaller --mesh.context")


def load_balanced_order(seq_len: int, ring: int) -> np.ndarray:
    """Token indices in ring order [T]: device i's slice holds chunks i and 2C-1-i of the sequence."""
    check_length(seq_len, ring)
    chunks = np.arange(seq_len).reshape(2 * ring, seq_len // (2 * ring))
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * ring - 1 - i]]) for i in range(ring)])


def to_context_layout(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Every [B, T, ...] entry of a batch reordered to load_balanced_order (a no-op without a context axis)."""
    ring = context_size()
    if ring == 1:
        return batch
    order = {}
    for name, x in batch.items():
        if x.ndim < 2:
            continue
        T = x.shape[1]
        if T not in order:
            order[T] = jnp.asarray(load_balanced_order(T, ring))
        batch = {**batch, name: jnp.take(x, order[T], axis=1)}
    return batch


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool,
                   segment_ids: tuple[jax.Array, jax.Array] | None, scale: float, window: int | None = None,
                   softcap: float | None = None, impl: str = "xla") -> jax.Array:
    """Self-attention of q [B,T,N,H], k/v [B,T,K,H] in the load-balanced layout, over the mesh's context ring."""
    mesh = jax.sharding.get_abstract_mesh()
    ring = dict(mesh.shape)[AXIS]
    B, T, N, H = q.shape
    if k.shape[1] != T:
        raise ValueError(f"ring attention is self-attention: queries ({T}) and keys ({k.shape[1]}) must have the "
                         "same length")
    check_length(T, ring)
    if window is not None and not causal:
        raise ValueError("a sliding window needs causal attention")
    pallas = impl == "pallas"
    if pallas and window is not None:
        _warn_once("ring attention runs sliding-window layers with the xla block (the Pallas block kernel's mask "
                   "is aligned to the block, not to the ring's chunk positions)")
        pallas = False
    st = _Static(ring, bool(causal), float(scale), window, softcap, pallas)
    kv_spec = fitted_spec(("batch", "seq", "act_kv_heads", None), k.shape, mesh.shape)
    q_spec = fitted_spec(("batch", "seq", "act_heads", None), q.shape, mesh.shape)
    q_spec = jax.sharding.PartitionSpec(*q_spec[:2], kv_spec[2], None)  # heads split only with their kv heads
    seg_spec = jax.sharding.PartitionSpec(*q_spec[:2])
    q_seg, kv_seg = (None, None) if segment_ids is None else segment_ids
    fn = jax.shard_map(functools.partial(_ring, st=st), mesh=mesh, check_vma=False,
                       in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec), out_specs=q_spec)
    return fn(q, k, v, q_seg, kv_seg)


@functools.cache
def _warn_once(msg: str) -> None:
    warnings.warn(msg, stacklevel=3)


# ----------------------------------------------------------------------------------------------------------
# The ring, per device (inside shard_map): local q [B, 2c, N, H], k/v [B, 2c, K, H], segment ids [B, 2c].

def _ring_steps(st: _Static, chunk: int) -> list[int]:
    """Ring steps s (keys from device i - s) at which some device's queries see some of the keys."""
    if not st.causal or st.window is None:
        return list(range(st.ring))
    C, W = st.ring, st.window
    steps = []
    for s in range(C):
        for i in range(C):
            j = (i - s) % C
            gaps = [(a - b - 1) * chunk + 1 for a in (i, 2 * C - 1 - i) for b in (j, 2 * C - 1 - j) if a > b]
            if s == 0 or any(g < W for g in gaps):  # nearest pair of a query chunk after a key chunk
                steps.append(s)
                break
    return steps


def _positions(i, chunk: int, ring: int) -> jax.Array:
    """Sequence positions [2c] of device i's tokens: chunks i and 2C-1-i."""
    t = jnp.arange(2 * chunk)
    return jnp.where(t < chunk, i * chunk + t, (2 * ring - 1 - i) * chunk + t - chunk)


def _shift(tree, by: int, ring: int):
    """Every array of `tree` sent `by` places along the ring (device d's goes to d + by)."""
    if by % ring == 0:
        return tree
    perm = [(d, (d + by) % ring) for d in range(ring)]
    return jax.tree.map(lambda x: lax.ppermute(x, AXIS, perm), tree)


def _slice(x, lo: int, hi: int):
    return None if x is None else x[:, lo:hi]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _ring(q, k, v, q_seg, kv_seg, st: _Static):
    return _ring_fwd(q, k, v, q_seg, kv_seg, st)[0]


def _ring_fwd(q, k, v, q_seg, kv_seg, st: _Static):
    C, c = st.ring, q.shape[1] // 2
    i = lax.axis_index(AXIS)
    pos = _positions(i, c, C)
    steps = _ring_steps(st, c)
    o, lse = _block_fwd(q, k, v, pos, pos, q_seg, kv_seg, st, diagonal=True)  # o [B,T,N,H] f32, lse [B,N,T]
    kv, at = (k, v, kv_seg), 0
    for s in steps[1:]:
        kv, at = _shift(kv, s - at, C), s  # the next shift needs only these K/V: XLA overlaps it with this block
        kb, vb, kv_seg_b = kv
        j = (i - s) % C
        kv_pos = _positions(j, c, C)
        if not st.causal:
            ob, lb = _block_fwd(q, kb, vb, pos, kv_pos, q_seg, kv_seg_b, st)
        else:
            def lower(kb, vb, kv_seg_b):  # j < i: all queries see j's first chunk
                return _block_fwd(q, kb[:, :c], vb[:, :c], pos, kv_pos[:c], q_seg, _slice(kv_seg_b, 0, c), st)

            def upper(kb, vb, kv_seg_b):  # j > i: i's second query chunk sees all of j's keys
                ob, lb = _block_fwd(q[:, c:], kb, vb, pos[c:], kv_pos, _slice(q_seg, c, 2 * c), kv_seg_b, st)
                return (jnp.concatenate([jnp.zeros_like(ob), ob], axis=1),
                        jnp.concatenate([jnp.full_like(lb, -jnp.inf), lb], axis=2))

            ob, lb = lax.cond(j < i, lower, upper, kb, vb, kv_seg_b)
        o, lse = _merge(o, lse, ob, lb)
    o = o.astype(q.dtype)
    return o, (q, k, v, q_seg, kv_seg, o, lse)


def _merge(o, lse, ob, lb):
    """Two partial softmaxes [B,T,N,H] with their log-sum-exps [B,N,T] -> the softmax over both."""
    new = jnp.logaddexp(lse, lb)
    safe = jnp.where(jnp.isfinite(new), new, 0.0)
    w, wb = (jnp.exp(x - safe).transpose(0, 2, 1)[..., None] for x in (lse, lb))  # [B, T, N, 1]
    return o * w + ob * wb, new


def _ring_bwd(st: _Static, res, do):
    q, k, v, q_seg, kv_seg, o, lse = res
    C, c = st.ring, q.shape[1] // 2
    i = lax.axis_index(AXIS)
    pos = _positions(i, c, C)
    steps = _ring_steps(st, c)
    delta = (o.astype(jnp.float32) * do.astype(jnp.float32)).sum(-1).transpose(0, 2, 1)  # [B, N, T]
    dq, dk, dv = _block_bwd(q, k, v, do, lse, delta, pos, pos, q_seg, kv_seg, st, diagonal=True)
    kv, dkv, at = (k, v, kv_seg), (dk, dv), 0
    for s in steps[1:]:
        kv, dkv, at = _shift(kv, s - at, C), _shift(dkv, s - at, C), s
        kb, vb, kv_seg_b = kv
        j = (i - s) % C
        kv_pos = _positions(j, c, C)
        if not st.causal:
            g = _block_bwd(q, kb, vb, do, lse, delta, pos, kv_pos, q_seg, kv_seg_b, st)
        else:
            def lower(kb, vb, kv_seg_b):  # all queries x j's first key chunk
                gq, gk, gv = _block_bwd(q, kb[:, :c], vb[:, :c], do, lse, delta, pos, kv_pos[:c], q_seg,
                                        _slice(kv_seg_b, 0, c), st)
                pad = lambda x: jnp.concatenate([x, jnp.zeros_like(x)], axis=1)  # noqa: E731
                return gq, pad(gk), pad(gv)

            def upper(kb, vb, kv_seg_b):  # i's second query chunk x all of j's keys
                gq, gk, gv = _block_bwd(q[:, c:], kb, vb, do[:, c:], lse[:, :, c:], delta[:, :, c:], pos[c:],
                                        kv_pos, _slice(q_seg, c, 2 * c), kv_seg_b, st)
                return jnp.concatenate([jnp.zeros_like(gq), gq], axis=1), gk, gv

            g = lax.cond(j < i, lower, upper, kb, vb, kv_seg_b)
        dq = dq + g[0]
        dkv = (dkv[0] + g[1], dkv[1] + g[2])
    dk, dv = _shift(dkv, -at, C)  # the accumulators go home
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


# ----------------------------------------------------------------------------------------------------------
# One block: q [B,Tq,N,H] against k/v [B,Sk,K,H] at sequence positions q_pos [Tq], kv_pos [Sk].

def _mask(q_pos, kv_pos, q_seg, kv_seg, st: _Static):
    """[B|1, 1, 1, Tq, Sk] True where the query may see the key (positions are sequence indices)."""
    mask = jnp.ones((1, q_pos.shape[0], kv_pos.shape[0]), bool)
    if st.causal:
        d = q_pos[:, None] - kv_pos[None, :]
        mask = mask & (d >= 0)[None]
        if st.window is not None:
            mask = mask & (d < st.window)[None]
    if q_seg is not None:
        mask = mask & (q_seg[:, :, None] == kv_seg[:, None, :])
    return mask[:, None, None]


def _scores(q, k, st: _Static):
    """(scores [B,K,G,Tq,Sk] f32, tanh of the capped scores or None)."""
    B, T, N, H = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, N // K, H)  # query heads grouped by their kv head
    s = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * st.scale
    if st.softcap is None:
        return s, None
    t = jnp.tanh(s / st.softcap)
    return st.softcap * t, t


def _block_fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, st: _Static, diagonal: bool = False):
    """(o [B,Tq,N,H] f32 normalised within the block, lse [B,N,Tq] f32, -inf for rows that see no key)."""
    if st.pallas:
        seg = None if q_seg is None else (q_seg, kv_seg)
        o, lse = flash_block_forward(q, k, v, causal=st.causal and diagonal, segment_ids=seg, sm_scale=st.scale,
                                     softcap=st.softcap)
        return o.astype(jnp.float32), lse
    B, T, N, H = q.shape
    s, _ = _scores(q, k, st)
    mask = _mask(q_pos, kv_pos, q_seg, kv_seg, st)
    s = jnp.where(mask, s, -jnp.inf)
    m = s.max(-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)  # [B, K, G, Tq, Sk]
    l = p.sum(-1, keepdims=True)
    o = jnp.einsum("bkgts,bskh->btkgh", p, v.astype(jnp.float32)) / jnp.where(l > 0, l, 1.0).transpose(0, 3, 1, 2, 4)
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)[..., 0]  # [B, K, G, Tq]
    return o.reshape(B, T, N, H), lse.reshape(B, N, T)


def _block_bwd(q, k, v, do, lse, delta, q_pos, kv_pos, q_seg, kv_seg, st: _Static, diagonal: bool = False):
    """(dq, dk, dv) f32 of one block, given the merged softmax's lse and delta = rowsum(dO * O) [B,N,Tq]."""
    if st.pallas:
        seg = None if q_seg is None else (q_seg, kv_seg)
        g = flash_block_backward(q, k, v, do, lse, delta, causal=st.causal and diagonal, segment_ids=seg,
                                 sm_scale=st.scale, softcap=st.softcap)
        return tuple(x.astype(jnp.float32) for x in g)
    B, T, N, H = q.shape
    K = k.shape[2]
    G = N // K
    s, t = _scores(q, k, st)
    mask = _mask(q_pos, kv_pos, q_seg, kv_seg, st)
    p = jnp.where(mask, jnp.exp(s - lse.reshape(B, K, G, T)[..., None]), 0.0)  # [B, K, G, Tq, Sk]
    dog = do.astype(jnp.float32).reshape(B, T, K, G, H)
    qg = q.astype(jnp.float32).reshape(B, T, K, G, H)
    dv = jnp.einsum("bkgts,btkgh->bskh", p, dog)
    dp = jnp.einsum("btkgh,bskh->bkgts", dog, v.astype(jnp.float32))
    ds = p * (dp - delta.reshape(B, K, G, T)[..., None])
    if t is not None:
        ds = ds * (1.0 - t * t)  # d(C tanh(x / C))/dx
    dq = jnp.einsum("bkgts,bskh->btkgh", ds, k.astype(jnp.float32)).reshape(B, T, N, H) * st.scale
    dk = jnp.einsum("bkgts,btkgh->bskh", ds, qg) * st.scale
    return dq, dk, dv
