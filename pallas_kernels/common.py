"""Helpers shared by the kernels: where Pallas may run, padding, block arithmetic, attention options."""

from __future__ import annotations

import functools
import math
import numbers
import os

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.targets import compile_target

INTERPRET_ENV = "JAXFORMER_PALLAS_INTERPRET"


class PallasUnavailableError(RuntimeError):
    """A Pallas kernel was called where it can neither compile nor was asked to interpret."""


def interpret_requested() -> bool:
    """True when JAXFORMER_PALLAS_INTERPRET is set to a true value (1/true/yes/on)."""
    return os.environ.get(INTERPRET_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def resolve_interpret(interpret: bool, kernel: str = "this Pallas kernel") -> bool:
    """The interpret flag a kernel should use; raises PallasUnavailableError where it cannot run."""
    if interpret or interpret_requested():
        return True
    if jax.default_backend() != "gpu" and compile_target() is None:  # compiling_for(target): compile, never run
        raise PallasUnavailableError(
            f"{kernel} compiles through Pallas' Triton backend and needs an NVIDIA GPU, but JAX's default "
            f"backend is {jax.default_backend()!r}. To run it on CPU in (slow) interpret mode pass "
            f"interpret=True, or set {INTERPRET_ENV}=1 for the whole process; for models, "
            "attention_impl='xla' is the portable choice.")
    return False


MAX_ELEMENTS = 2 ** 31  # Pallas' Triton lowering computes element offsets in int32


def check_addressable(name: str, shape: tuple[int, ...]) -> None:
    """Raise if an operand (as padded for the kernel) has more elements than int32 offsets reach."""
    size = 1
    for d in shape:
        size *= d
    if size > MAX_ELEMENTS:
        raise ValueError(f"{name} would have {size} elements {shape} after padding, more than the 2**31 that "
                         "Triton's int32 offsets address; split the batch into smaller calls")


def is_power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def fit_block(block: int, length: int) -> int:
    """A power-of-two block no longer than needed for `length` (Triton's dot wants >= 16)."""
    return min(block, max(16, next_power_of_2(length)))


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    """x padded at the end of `axis` to `size` (a no-op when it already has that size)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def idiv(n, d: int):
    """n // d for non-negative n: Python ints stay Python; traced ints divide in their own dtype.

    lax.div (which Triton lowers, unlike floor_divide) wants equal dtypes, and with jax_enable_x64 a
    Python divisor would become int64 against an int32 program id.
    """
    if isinstance(n, int):
        return n // d
    n = jnp.asarray(n)
    return lax.div(n, jnp.asarray(d, n.dtype))


def floor_blocks(n, block: int):
    """floor(max(n, 0) / block) for a Python or traced integer n."""
    if isinstance(n, int):
        return max(n, 0) // block
    return idiv(jnp.maximum(n, 0), block)


def ceil_blocks(n, block: int):
    """ceil(max(n, 0) / block), same contract as floor_blocks."""
    if isinstance(n, int):
        return -(-max(n, 0) // block)
    return idiv(jnp.maximum(n, 0) + (block - 1), block)


def imin(a, b):
    """min of two Python or traced ints (stays a Python int when both are)."""
    return min(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.minimum(a, b)


def imax(a, b):
    """max of two Python or traced ints (stays a Python int when both are)."""
    return max(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.maximum(a, b)


# ----------------------------------------------------------------------------------------------------------
# Tile bands: a loop over tiles [lo, hi) whose edges [lo, clear_lo) and [clear_hi, hi) need a mask and whose
# middle [clear_lo, clear_hi) every row sees whole. Tiles outside [lo, hi) are never visited.

def clamp_band(lo, clear_lo, clear_hi, hi):
    """(lo, clear_lo, clear_hi, hi) forced into lo <= clear_lo <= clear_hi <= hi (an empty middle stays empty)."""
    lo = imin(lo, hi)
    clear_lo = imin(imax(clear_lo, lo), hi)
    clear_hi = imin(imax(clear_hi, clear_lo), hi)
    return lo, clear_lo, clear_hi, hi


def band_loop(band, step, carry):
    """carry after step(i, carry, masked=...) over the band's tiles: masked edges, an unmasked middle."""
    lo, clear_lo, clear_hi, hi = band
    for start, stop, masked in ((lo, clear_lo, True), (clear_lo, clear_hi, False), (clear_hi, hi, True)):
        if isinstance(start, int) and isinstance(stop, int) and start >= stop:
            continue  # statically empty: no loop at all
        carry = lax.fori_loop(start, stop, functools.partial(step, masked=masked), carry)
    return carry


def check_window_softcap(window, softcap, causal: bool = True) -> tuple[int | None, float | None]:
    """(window, softcap) as a Python int / float (or None) after checking them; raises ValueError naming the fix."""
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
            raise ValueError(f"window must be a Python int >= 1 (the keys a query sees, its own position "
                             f"included) or None for no sliding window; got {window!r}")
        if not causal:
            raise ValueError(f"window={window} is a sliding window over past keys and needs causal=True; "
                             "pass causal=True or drop the window")
        window = int(window)
    if softcap is not None:
        if (isinstance(softcap, bool) or not isinstance(softcap, numbers.Real)
                or not math.isfinite(softcap) or softcap <= 0):
            raise ValueError(f"softcap must be a finite Python float > 0 (scores become softcap * "
                             f"tanh(scores / softcap)) or None for no cap; got {softcap!r}")
        softcap = float(softcap)
    return window, softcap


def check_chunk(chunk, causal: bool = True) -> int | None:
    """chunk as a Python int (or None) after checking it; raises ValueError naming the fix."""
    if chunk is None:
        return None
    if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1:
        raise ValueError(f"chunk must be a Python int >= 1 (a query at position p sees the keys s <= p of its own "
                         f"chunk, s // chunk == p // chunk) or None for no chunking; got {chunk!r}")
    if not causal:
        raise ValueError(f"chunk={chunk} is chunked causal attention (Llama 4) and needs causal=True; pass "
                         "causal=True or drop the chunk")
    return int(chunk)


def check_sinks(sinks, n_heads: int) -> jax.Array | None:
    """sinks [N] as float32 (or None) after checking shape and dtype; raises ValueError naming the fix."""
    if sinks is None:
        return None
    if getattr(sinks, "shape", None) != (n_heads,) or not jnp.issubdtype(sinks.dtype, jnp.floating):
        raise ValueError(f"sinks must be a float array of shape ({n_heads},): one logit per query head; got "
                         f"{getattr(sinks, 'dtype', type(sinks))} {getattr(sinks, 'shape', '')}")
    return sinks.astype(jnp.float32)


def chunk_start(p, chunk: int):
    """(p // chunk) * chunk, the first position of p's chunk, for a Python or traced int p (0 for p < 0: such a
    query sits before every key and sees none anyway). Non-negative operands: Triton lowers lax.div only."""
    return idiv(imax(p, 0), chunk) * chunk


def check_block(name: str, value: int) -> None:
    if not isinstance(value, int) or not is_power_of_2(value) or value < 16:
        raise ValueError(f"{name} must be a power of two >= 16 (Triton tiles), got {value!r}")
