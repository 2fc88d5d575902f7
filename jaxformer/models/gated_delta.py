"""The gated delta rule (Gated DeltaNet's token mixer core) as pure JAX functions: a token-by-token scan and a
chunked parallel form.

Yang, Kautz, Hatamizadeh 2024, "Gated Delta Networks: Improving Mamba2 with Delta Rule" (arXiv:2412.06464);
Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence Length" (arXiv:2406.06484).
The specification is transformers' torch_recurrent_gated_delta_rule / torch_chunk_gated_delta_rule
(models/qwen3_next): per token t, with state S [Dk, Dv]

    S <- S * exp(g_t)                              g_t <= 0 is a log-decay
    S <- S + k_t (beta_t (v_t - S^T k_t))^T        the delta rule, beta_t in (0, 1) its step size
    o_t = S^T (q_t * Dk**-0.5)

q and k are optionally l2-normalised first (use_qk_l2norm, transformers' use_qk_l2norm_in_kernel); the query
scaling is always applied inside, as transformers does. Shapes: q, k [B,T,K,Dk], v [B,T,H,Dv], g, beta [B,T,H],
state [B,H,Dk,Dv] float32; the H value heads are grouped over the K query/key heads (each q/k head serves H/K
consecutive value heads, torch's repeat_interleave). Letters here: H value heads and K q/k heads (attention.py's N
and K), N the number of chunks, C the chunk length. Computation is float32 whatever the input dtype; the output takes
q's dtype, the final state stays float32.

segment_ids [B,T] (packed documents): the state is reset to zero before a position whose segment id differs from
the previous position's. Position 0 always continues initial_state (zeros when None): the first segment of a row
is the continuation of the document that initial_state summarises.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

L2NORM_EPS = 1e-6  # as transformers' l2norm (and the FLA library)


def l2norm(x: jax.Array, eps: float = L2NORM_EPS) -> jax.Array:
    """x * rsqrt(sum(x^2) + eps) over the last axis (transformers' l2norm)."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def _prepare(q, k, v, g, beta, initial_state, segment_ids, use_qk_l2norm, scale):
    """float32 [B,H,T,*] inputs, q/k heads repeated over the value heads, q scaled; resets [B,T] bool; S0."""
    B, T, K, Dk = k.shape
    H, Dv = v.shape[-2:]
    if H % K:
        raise ValueError(f"{H} value heads cannot be grouped over {K} query/key heads")
    if q.shape != k.shape or v.shape[:2] != (B, T) or g.shape != (B, T, H) or beta.shape != (B, T, H):
        raise ValueError(f"shapes q {q.shape}, k {k.shape}, v {v.shape}, g {g.shape}, beta {beta.shape} do not agree")
    q, k = (jnp.repeat(x, H // K, axis=2) if H != K else x for x in (q, k))
    q, k, v = (jnp.swapaxes(x, 1, 2).astype(jnp.float32) for x in (q, k, v))  # [B,H,T,D]
    g, beta = (jnp.swapaxes(x, 1, 2).astype(jnp.float32) for x in (g, beta))  # [B,H,T]
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q = q * (Dk ** -0.5 if scale is None else scale)
    if segment_ids is None:
        resets = jnp.zeros((B, T), bool)
    else:  # a reset before t when t starts a new segment; never at t = 0 (initial_state continues there)
        resets = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)))
    S0 = jnp.zeros((B, H, Dk, Dv), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
    return q, k, v, g, beta, resets, S0


def gated_delta_recurrent(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array, *,
                          initial_state: jax.Array | None = None, segment_ids: jax.Array | None = None,
                          use_qk_l2norm: bool = False, scale: float | None = None) -> tuple[jax.Array, jax.Array]:
    """The gated delta rule token by token (lax.scan); (out [B,T,H,Dv], final state [B,H,Dk,Dv] float32)."""
    out_dtype = q.dtype
    q, k, v, g, beta, resets, S0 = _prepare(q, k, v, g, beta, initial_state, segment_ids, use_qk_l2norm, scale)

    def step(S, x):  # S [B,H,Dk,Dv]
        q_t, k_t, v_t, g_t, b_t, r_t = x  # [B,H,Dk], [B,H,Dk], [B,H,Dv], [B,H], [B,H], [B]
        S = jnp.where(r_t[:, None, None, None], 0.0, S) * jnp.exp(g_t)[..., None, None]
        kv_mem = jnp.einsum("bhkv,bhk->bhv", S, k_t)
        delta = (v_t - kv_mem) * b_t[..., None]  # [B,H,Dv]
        S = S + k_t[..., :, None] * delta[..., None, :]
        return S, jnp.einsum("bhkv,bhk->bhv", S, q_t)

    xs = tuple(jnp.moveaxis(x, 2, 0) for x in (q, k, v, g, beta)) + (resets.T,)  # time axis first
    S, out = jax.lax.scan(step, S0, xs)  # out [T,B,H,Dv]
    return jnp.moveaxis(out, 0, 1).astype(out_dtype), S


def gated_delta_state_norms(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array, *,
                            use_qk_l2norm: bool = False) -> jax.Array:
    """The Frobenius norm of each value head's state after every token [B, T, H] (float32): the scan's states,
    never materialised all at once (jaxformer viz's picture of what a layer holds)."""
    q, k, v, g, beta, resets, S0 = _prepare(q, k, v, g, beta, None, None, use_qk_l2norm, None)

    def step(S, x):
        k_t, v_t, g_t, b_t = x
        S = S * jnp.exp(g_t)[..., None, None]
        S = S + k_t[..., :, None] * ((v_t - jnp.einsum("bhkv,bhk->bhv", S, k_t)) * b_t[..., None])[..., None, :]
        return S, jnp.sqrt(jnp.sum(S * S, axis=(-2, -1)))  # [B, H]

    xs = tuple(jnp.moveaxis(x, 2, 0) for x in (k, v, g, beta))  # time axis first
    return jnp.moveaxis(jax.lax.scan(step, S0, xs)[1], 0, 1)  # [B, T, H]


def unit_lower_inverse(L: jax.Array) -> jax.Array:
    """(I + L)^-1 for strictly lower-triangular L [..., C, C], by recursive 2x2 block inversion (matmuls only).

    Doubling the block size s: inv([[A, 0], [L21, D]]) = [[A^-1, 0], [-D^-1 L21 A^-1, D^-1]]. Every block formed is
    a block of the final inverse, so nothing grows beyond it (unlike a Neumann series). XLA:CPU's batched
    triangular_solve runs ~100x slower than this on 64 x 64 chunks. C is padded to a power of two.
    """
    C = L.shape[-1]
    P = (1 << max(C - 1, 0).bit_length()) - C
    L = jnp.pad(L, [(0, 0)] * (L.ndim - 2) + [(0, P), (0, P)])
    inv = jnp.ones(L.shape[:-2] + (C + P, 1, 1), L.dtype)  # [..., nb, s, s]: inverses of the diagonal blocks
    s = 1
    while s < C + P:
        nb = (C + P) // (2 * s)
        blocks = L.reshape(L.shape[:-2] + (nb, 2 * s, nb, 2 * s))
        blocks = jnp.moveaxis(jnp.diagonal(blocks, axis1=-4, axis2=-2), -1, -3)  # [..., nb, 2s, 2s]
        A, D = inv[..., 0::2, :, :], inv[..., 1::2, :, :]
        off = -jnp.einsum("...ij,...jk,...kl->...il", D, blocks[..., s:, :s], A)
        inv = jnp.concatenate([jnp.concatenate([A, jnp.zeros_like(A)], axis=-1),
                               jnp.concatenate([off, D], axis=-1)], axis=-2)
        s *= 2
    return inv[..., 0, :C, :C]


def _chunk_decays(g, resets):
    """Decays inside each chunk, cut at segment resets; g [B,H,N,C], resets [B,N,C] bool.

    Returns A [B,H,N,C,C] = exp(g_{j+1} + ... + g_i) for j <= i in one segment, else 0; read [B,H,N,C] =
    exp(g_0 + ... + g_i) where no reset precedes i in the chunk, else 0 (how much of the carried state position i
    sees); carry [B,H,N] = exp(sum of the chunk's g) when the chunk has no reset, else 0.
    """
    C = g.shape[-1]
    # segsum (as Mamba2's): sum_{j<m<=i} g_m summed directly, not as a difference of cumsums (no cancellation)
    lower = jnp.tril(jnp.ones((C, C), bool), -1)  # [m, j]: m > j
    seg = jnp.cumsum(jnp.where(lower, g[..., :, None], 0.0), axis=-2)  # [B,H,N,C(i),C(j)]
    seg_id = jnp.cumsum(resets, axis=-1)  # [B,N,C] segments inside the chunk, 0 = the one the carried state feeds
    same = seg_id[:, None, :, :, None] == seg_id[:, None, :, None, :]  # [B,1,N,C,C]
    causal = jnp.tril(jnp.ones((C, C), bool))
    A = jnp.exp(jnp.where(causal & same, seg, -jnp.inf))  # where before exp: no inf, no nan in the gradient
    first = (seg_id == 0)[:, None]  # [B,1,N,C]
    read = jnp.where(first, jnp.exp(jnp.cumsum(g, axis=-1)), 0.0)
    carry = jnp.where(first[..., -1], jnp.exp(jnp.sum(g, axis=-1)), 0.0)
    return A, read, carry


def gated_delta_chunked(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array, *,
                        chunk_size: int = 64, initial_state: jax.Array | None = None,
                        segment_ids: jax.Array | None = None, use_qk_l2norm: bool = False,
                        scale: float | None = None) -> tuple[jax.Array, jax.Array]:
    """The gated delta rule in chunks (UT transform inside a chunk, scan over chunks); same results as the scan."""
    out_dtype = q.dtype
    q, k, v, g, beta, resets, S0 = _prepare(q, k, v, g, beta, initial_state, segment_ids, use_qk_l2norm, scale)
    B, H, T, Dk = k.shape
    Dv = v.shape[-1]
    C = chunk_size
    P = -T % C  # padded steps have g = 0, beta = 0, k = 0, no reset: identities on the state
    q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, P), (0, 0))) for x in (q, k, v))
    g, beta = (jnp.pad(x, ((0, 0), (0, 0), (0, P))) for x in (g, beta))
    N = (T + P) // C
    q, k, v = (x.reshape(B, H, N, C, -1) for x in (q, k, v))  # [B,H,N,C,D]
    g, beta = (x.reshape(B, H, N, C) for x in (g, beta))
    resets = jnp.pad(resets, ((0, 0), (0, P))).reshape(B, N, C)

    A, read, carry = _chunk_decays(g, resets)
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    # UT transform: within a chunk u_i = beta_i (v_i - sum_{j<i} A_ij (k_i.k_j) u_j - read_i k_i^T S), i.e.
    # (I + strict_tril(diag(beta) K K^T * A)) [U | W] = [V_beta | K_beta * read]; new values are U - W S
    ut_inv = unit_lower_inverse(jnp.tril(jnp.einsum("bhncd,bhnsd->bhncs", k_beta, k) * A, -1))  # [B,H,N,C,C]
    U = jnp.einsum("bhncs,bhnsv->bhncv", ut_inv, v_beta)  # [B,H,N,C,Dv]
    W = jnp.einsum("bhncs,bhnsd->bhncd", ut_inv, k_beta * read[..., None])  # [B,H,N,C,Dk]
    attn = jnp.einsum("bhncd,bhnsd->bhncs", q, k) * A  # intra-chunk, diagonal included
    q_read = q * read[..., None]  # reads the carried state
    k_write = k * A[..., -1, :, None]  # decay from each position to the chunk's end, within the last segment

    def step(S, x):  # S [B,H,Dk,Dv]
        U_n, W_n, attn_n, q_n, k_n, carry_n = x
        v_new = U_n - jnp.einsum("bhcd,bhdv->bhcv", W_n, S)  # [B,H,C,Dv]
        o = jnp.einsum("bhcd,bhdv->bhcv", q_n, S) + jnp.einsum("bhcs,bhsv->bhcv", attn_n, v_new)
        S = S * carry_n[..., None, None] + jnp.einsum("bhcd,bhcv->bhdv", k_n, v_new)
        return S, o

    xs = tuple(jnp.moveaxis(x, 2, 0) for x in (U, W, attn, q_read, k_write, carry))  # chunk axis first
    S, out = jax.lax.scan(step, S0, xs)  # out [N,B,H,C,Dv]
    out = jnp.moveaxis(out, 0, 2).reshape(B, H, N * C, Dv)[:, :, :T]
    return jnp.swapaxes(out, 1, 2).astype(out_dtype), S
