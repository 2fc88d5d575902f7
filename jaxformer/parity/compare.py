"""The numbers of a parity check: per-tensor differences, tolerances, KL between the output distributions,
top-1 agreement, and per-parameter gradient errors. Plain numpy in float64; `ref` is always the reference side.

A tensor agrees when max|diff| <= atol + rtol * max|ref| (bf16: or ||diff|| <= norm_rtol * ||ref||); a gradient
when ||g - g_ref|| <= grad_rtol * ||g_ref||. docs/parity.md gives the measurements behind these:

    float32 vs torch_ref       rtol 5e-5, atol 1e-5             grads 1e-4   (parity_tests' bounds)
    float32 vs transformers    rtol 5e-5, atol 1e-4             grads 1e-4   (parity_tests' bounds)
    bfloat16 vs either         ||diff|| <= 5e-2 ||ref||         grads 1.5e-1 (8 mantissa bits, rounded per op)
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """When two tensors (and two gradients) count as the same."""

    rtol: float  # of max|ref|
    atol: float
    grad_rtol: float  # ||g - g_ref|| / ||g_ref||
    norm_rtol: float | None = None  # bf16: ||diff|| / ||ref|| (a few outliers round far in 8 bits; the bulk must not)

    def allows(self, max_abs: float, scale: float, norm_rel: float) -> bool:
        """max|diff| <= atol + rtol * max|ref|, or (with norm_rtol) ||diff|| <= norm_rtol * ||ref||."""
        return bool(max_abs <= self.atol + self.rtol * scale or
                    (self.norm_rtol is not None and norm_rel <= self.norm_rtol))

    def describe(self, grads: bool = False) -> str:
        parts = [f"max|diff| <= {self.atol:g} + {self.rtol:g} x max|ref|"] if self.atol or self.rtol else []
        if self.norm_rtol is not None:
            parts.append(f"||diff|| <= {self.norm_rtol:g} x ||ref||")
        return " or ".join(parts) + (f"; gradients ||diff|| <= {self.grad_rtol:g} x ||ref||" if grads else "")


# float32 rounding alone puts each side ~4.5e-6 x max|ref| from the exact result on a Gemma model (docs/testing.md)
FLOAT32 = Tolerance(rtol=5e-5, atol=1e-5, grad_rtol=1e-4)
FLOAT32_HF = Tolerance(rtol=5e-5, atol=1e-4, grad_rtol=1e-4)
BFLOAT16 = Tolerance(rtol=0.0, atol=0.0, grad_rtol=1.5e-1, norm_rtol=5e-2)


def tolerance(dtype: str, against_hf: bool, atol: float | None = None) -> Tolerance:
    """The default tolerance of a jaxformer compute dtype against torch_ref or transformers; `atol` overrides."""
    tol = BFLOAT16 if dtype == "bfloat16" else FLOAT32_HF if against_hf else FLOAT32
    return tol if atol is None else dataclasses.replace(tol, atol=atol)


def _f64(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def tensor_row(name: str, got, ref, tol: Tolerance) -> dict:
    """{name, max_abs, rel (max|diff| / max|ref|), cosine, norm_rel (||diff|| / ||ref||), ok} of one tensor."""
    got, ref = _f64(got), _f64(ref)
    if got.shape != ref.shape:
        raise ValueError(f"{name}: shapes differ, {got.shape} on jaxformer's side and {ref.shape} on the reference's")
    max_abs = float(np.abs(got - ref).max()) if got.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    ref_norm = float(np.linalg.norm(ref))
    norms = float(np.linalg.norm(got)) * ref_norm
    cosine = float(np.vdot(got, ref) / norms) if norms > 0 else float(max_abs == 0.0)
    norm_rel = float(np.linalg.norm(got - ref)) / ref_norm if ref_norm > 0 else max_abs
    finite = bool(np.isfinite(got).all() and np.isfinite(ref).all())
    return {"name": name, "max_abs": max_abs, "rel": max_abs / scale if scale > 0 else max_abs, "cosine": cosine,
            "norm_rel": norm_rel, "ok": finite and tol.allows(max_abs, scale, norm_rel)}


def log_softmax(logits) -> np.ndarray:
    x = _f64(logits)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl_per_position(ref_logits, got_logits) -> np.ndarray:
    """KL(p_ref || p_got) at every position [B, T], in nats."""
    lp, lq = log_softmax(ref_logits), log_softmax(got_logits)
    return np.maximum((np.exp(lp) * (lp - lq)).sum(-1), 0.0)  # round-off can dip a hair below 0


def logits_summary(got, ref) -> dict:
    """logits_max_abs, kl_mean, kl_max (KL(p_ref || p_got) over positions) and top1_agreement."""
    kl = kl_per_position(ref, got)
    return {"logits_max_abs": float(np.abs(_f64(got) - _f64(ref)).max()), "kl_mean": float(kl.mean()),
            "kl_max": float(kl.max()), "top1_agreement": float((_f64(got).argmax(-1) == _f64(ref).argmax(-1)).mean())}


def matching_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens two greedy continuations share before they first differ."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def natural_key(name: str) -> list:
    """layers.2 before layers.10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def grad_rows(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], tol: Tolerance) -> list[dict]:
    """{name, rel, max_abs, cosine, ok} per parameter both sides have, in natural order.

    rel is ||g - g_ref|| / ||g_ref||; a parameter whose true gradient is zero (the key bias without RoPE:
    softmax cancels it) is measured against the largest gradient norm instead, as parity_tests does.
    """
    shared = sorted(set(got) & set(ref), key=natural_key)
    largest = max((float(np.linalg.norm(_f64(ref[k]))) for k in shared), default=0.0)
    rows = []
    for k in shared:
        g, r = _f64(got[k]), _f64(ref[k])
        if g.shape != r.shape:
            raise ValueError(f"gradient of {k}: shapes differ, {g.shape} and {r.shape}")
        diff, norm = float(np.linalg.norm(g - r)), float(np.linalg.norm(r))
        rel = diff / (norm if norm > 1e-6 * largest else max(largest, 1e-30))
        norms = float(np.linalg.norm(g)) * norm
        rows.append({"name": k, "rel": rel, "max_abs": float(np.abs(g - r).max()),
                     "cosine": float(np.vdot(g, r) / norms) if norms > 0 else float(diff == 0.0),
                     "ok": bool(np.isfinite(g).all()) and rel <= tol.grad_rtol})
    return rows
