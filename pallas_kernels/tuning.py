"""Block sizes per GPU target, dtype and head dim: chosen from what the compiler says fits, and checked early.

Defaults. `python -m pallas_kernels.tuning --write` compiles, for each architecture (sm_90: H100/H200,
sm_80: A100), input width (2-byte bf16/fp16, 4-byte fp32) and padded head dim (16 .. 256), candidate
tiles from the largest down, through the real XLA:GPU -> Triton -> ptxas pipeline for that target (no
GPU needed; pallas_kernels.targets), and keeps the first that (1) fits the target's shared memory and
(2) has no register spills (ptxas' stack frame is 0 bytes). One `num_stages` serves the three flash
kernels, so stages are the outer loop; one `num_warps_bwd` serves dK/dV and dQ. The choices, with the
registers ptxas gave each kernel, are data: targets/blocks.json. tests/gpu recompiles them. The latent (MLA)
decode kernel's tiles, measured the same way at DeepSeek's widths, are LATENT_DECODE below.

Early errors. Before anything is compiled, `check_flash_fits` / `check_decode_fits` compare a lower
bound of each kernel's shared memory with the target's per-block limit and raise BlockSizesDoNotFit
naming the kernel, the bytes and the fix. The bound counts what Triton's software pipeline must hold:
num_stages - 1 prefetched copies of every streamed tile, plus the resident tiles that the forward and
dQ matmuls read from shared memory (XLA's reported use was at least this for every tile measured on
sm_80 and sm_90, bf16 and fp32; for bf16 forward and dQ it is exact with one more stage).
`check_latent_decode_fits` does the same for the latent decode kernel (its own bound: latent_decode_floor).

The target is the one `compiling_for` names, else the local GPU's; on CPU (interpret mode) nothing is
checked and the sm_90 defaults are used.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

from pallas_kernels.targets import TARGET_DIR, GpuTarget, compile_target, get_target, target_for_device

TABLE_PATH = TARGET_DIR / "blocks.json"
HEAD_DIMS = (16, 32, 64, 128, 256)  # padded head dims (the kernels pad H to a power of two >= 16)
WIDTHS = {2: "bfloat16", 4: "float32"}  # float16 shares bfloat16's tiles
SEARCH_TARGETS = ("h100", "a100")  # one per architecture: h200 is an sm_90 like h100, a100-40gb an sm_80
# Opt-in shared memory per block of GPUs without a shipped target, by compute capability (CUDA guide, table 21).
SHARED_MEMORY_BY_CC = {(7, 0): 98304, (7, 5): 65536, (8, 0): 166912, (8, 6): 101376, (8, 7): 166912,
                       (8, 9): 101376, (9, 0): 232448, (10, 0): 232448, (12, 0): 101376}

# Candidates, best first: (streamed/resident tile sizes, warps). Bigger tiles do more work per load.
FWD_TILES = [(128, 128, 8), (128, 64, 8), (128, 64, 4), (64, 64, 4), (128, 32, 4), (64, 32, 4), (32, 32, 4),
             (32, 16, 4), (16, 16, 4)]  # (block_q resident, block_k streamed, num_warps)
DKDV_TILES = [(64, 128), (32, 128), (64, 64), (32, 64), (16, 64), (16, 32), (16, 16)]  # (block_q streamed, block_k)
DQ_TILES = [(128, 64), (128, 32), (64, 64), (64, 32), (32, 32), (16, 32), (16, 16)]  # (block_q resident, block_k)
BWD_WARPS = (8, 4)
STAGES = (3, 2, 1)
DECODE_TILES = [(128, 4), (64, 4), (128, 8), (64, 8), (32, 4), (32, 8), (16, 4), (16, 8)]  # (block_k, warps)
DECODE_BLOCK_M = 128  # decode tiles must also compile for the largest query tile (decode_attention)
# latent_decode_attention (MLA, absorbed) at C = 512, R = 64 (DeepSeek-V2/V3): the first spill-free tiles of the decode
# search's order (stages 3 -> 1 outer, then block_k, then warps) at 16 query rows, with and without a window, T = 1
# and 2, the same on sm_90 and sm_80 (registers h100 / a100). 32 or more rows spill at C = 512 in every bf16 tile
# tried (the fp32 accumulator [block_m, 512] alone is 128 registers a thread at 4 warps); fp32 spills at 2-3 stages.
LATENT_DECODE = {"bfloat16": dict(block_m=16, block_k=32, num_warps=4, num_stages=3),  # 254 / 255 registers
                 "float32": dict(block_m=16, block_k=16, num_warps=8, num_stages=1)}  # 88 / 110 registers
LATENT_DECODE_C = 512


class BlockSizesDoNotFit(ValueError):
    """A kernel's tiles cannot fit the target GPU's shared memory."""


# ----------------------------------------------------------------------------------------------------------
# The target and its limits.

def current_target() -> GpuTarget | None:
    """The target of an enclosing compiling_for, else the local GPU's shipped target, else None."""
    target = compile_target()
    if target is not None:
        return target
    return _local()[0]


@functools.cache
def _local() -> tuple[GpuTarget | None, int | None]:
    """(shipped target, shared-memory limit) of this process' GPU, or (None, None) without one."""
    import jax

    if jax.default_backend() != "gpu":
        return None, None
    device = jax.devices()[0]
    target = target_for_device(device)
    if target is not None:
        return target, target.shared_memory_per_block_optin
    cc = tuple(int(x) for x in str(getattr(device, "compute_capability", "0.0")).split("."))
    return None, SHARED_MEMORY_BY_CC.get(cc, min(SHARED_MEMORY_BY_CC.values()))


def _limit_and_name(target: GpuTarget | None) -> tuple[int | None, str]:
    if target is not None:
        return target.shared_memory_per_block_optin, f"{target.name} ({target.arch})"
    limit = _local()[1]
    return limit, "this GPU"


def _pad_head_dim(head_dim: int) -> int:
    return max(16, 1 << max(0, int(head_dim) - 1).bit_length())


def _width(dtype) -> str:
    import numpy as np

    return WIDTHS[4 if np.dtype(dtype).itemsize >= 4 else 2]


# ----------------------------------------------------------------------------------------------------------
# Defaults.

@functools.cache
def table() -> dict:
    """targets/blocks.json: {arch: {width: {head_dim: {"flash": fields, "decode": fields, ...}}}}."""
    return json.loads(TABLE_PATH.read_text()) if TABLE_PATH.exists() else {}


def flash_defaults(head_dim: int, dtype, target: GpuTarget | None = None) -> dict[str, int]:
    """BlockSizes fields for flash_attention at this head dim and dtype on `target` (default: current_target())."""
    return _defaults("flash", head_dim, dtype, target)


def decode_defaults(head_dim: int, dtype, target: GpuTarget | None = None) -> dict[str, int]:
    """BlockSizes fields (block_k, num_warps, num_stages) for decode_attention."""
    return _defaults("decode", head_dim, dtype, target)


def _defaults(kernel: str, head_dim: int, dtype, target: GpuTarget | None) -> dict[str, int]:
    target = target or current_target()
    arch = target.arch if target is not None else ("sm_90" if _local()[1] is None else None)
    entry = table().get(arch or "", {}).get(_width(dtype), {}).get(str(_pad_head_dim(head_dim)))
    if entry is not None:
        return dict(entry[kernel])
    limit = _limit_and_name(target)[0] or get_target("h100").shared_memory_per_block_optin
    return _fallback(kernel, _pad_head_dim(head_dim), _itemsize(dtype), limit)


def _itemsize(dtype) -> int:
    import numpy as np

    return np.dtype(dtype).itemsize


def _fallback(kernel: str, H: int, itemsize: int, limit: int) -> dict[str, int]:
    """No measured entry (a GPU or head dim the table lacks): the first candidates whose bound, plus a
    quarter for Triton's layout scratch, fits `limit` and whose accumulators leave room in 255 registers."""
    ok = lambda floor, acc: floor * 5 // 4 <= limit and acc <= 128  # noqa: E731
    if kernel == "decode":
        for bk, w in DECODE_TILES:
            for s in (2, 1):
                if ok(decode_floor(bk, DECODE_BLOCK_M, H, itemsize, s), DECODE_BLOCK_M * H // (32 * w)):
                    return dict(block_k=bk, num_warps=w, num_stages=s)
        return dict(block_k=16, num_warps=4, num_stages=1)
    for s in STAGES:
        fwd = [dict(block_q=bq, block_k=bk, num_warps=w) for bq, bk, w in FWD_TILES
               if ok(flash_floors(_blocks(block_q=bq, block_k=bk, num_stages=s), H, itemsize)["forward"],
                     (bq * H + bq * bk) // (32 * w))]
        for w in BWD_WARPS:
            dkdv = [dict(block_q_dkv=bq, block_k_dkv=bk) for bq, bk in DKDV_TILES
                    if ok(flash_floors(_blocks(block_q_dkv=bq, block_k_dkv=bk, num_stages=s), H, itemsize)["dkdv"],
                          (2 * bk * H + 2 * bq * bk) // (32 * w))]
            dq = [dict(block_q_dq=bq, block_k_dq=bk) for bq, bk in DQ_TILES
                  if ok(flash_floors(_blocks(block_q_dq=bq, block_k_dq=bk, num_stages=s), H, itemsize)["dq"],
                        (bq * H + 2 * bq * bk) // (32 * w))]
            if fwd and dkdv and dq:
                return {**fwd[0], **dkdv[0], **dq[0], "num_warps_bwd": w, "num_stages": s}
    return dict(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=16, block_q_dq=16, block_k_dq=16, num_warps=4,
                num_warps_bwd=4, num_stages=1)


class _Blocks(dict):
    __getattr__ = dict.__getitem__


def _blocks(**fields) -> Any:
    base = dict(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=16, block_q_dq=16, block_k_dq=16, num_warps=4,
                num_warps_bwd=4, num_stages=1)
    return _Blocks({**base, **fields})


def latent_decode_defaults(latent_dim: int, rope_dim: int, dtype, target: GpuTarget | None = None) -> dict[str, int]:
    """BlockSizes fields (block_m, block_k, num_warps, num_stages) for latent_decode_attention: LATENT_DECODE's tiles,
    block_m scaled by 512 / C up to 64 for narrower latents (bf16 measured spill-free at C = 32-256 on both
    architectures), block_k by 512 / C down to 16 for wider ones (they spill: no MLA model has them), then stages and
    block_k cut while the shared-memory bound, plus a quarter, exceeds the target's limit."""
    fields = dict(LATENT_DECODE[_width(dtype)])
    C = _pad_head_dim(latent_dim)
    if C < LATENT_DECODE_C:
        fields["block_m"] = min(64, fields["block_m"] * LATENT_DECODE_C // C)
    elif C > LATENT_DECODE_C:  # C = 1024 at 16 x 16 spills ~400-700 bytes, and at 3 stages overflows sm_80
        fields.update(block_k=max(16, fields["block_k"] * LATENT_DECODE_C // C),
                      num_stages=min(2, fields["num_stages"]))
    limit = _limit_and_name(target or current_target())[0] or get_target("h100").shared_memory_per_block_optin
    blocks = _Blocks(fields)
    while latent_decode_floor(blocks, latent_dim, rope_dim, _itemsize(dtype)) * 5 // 4 > limit:
        if blocks["num_stages"] > 1:
            blocks["num_stages"] -= 1
        elif blocks["block_k"] > 16:
            blocks["block_k"] //= 2
        else:
            break
    return dict(blocks)


# ----------------------------------------------------------------------------------------------------------
# Shared-memory lower bounds and the early check.

def flash_floors(blocks, head_dim: int, itemsize: int) -> dict[str, int]:
    """Lower bounds (bytes) of each flash kernel's shared memory: (stages - 1) x streamed tiles (+ resident tiles)."""
    H, s, it = _pad_head_dim(head_dim), blocks.num_stages, itemsize
    pre = max(s - 1, 0)
    return {
        "forward": pre * 2 * blocks.block_k * H * it + blocks.block_q * H * it,  # streams k, v; holds q
        "dkdv": pre * 2 * blocks.block_q_dkv * H * it,  # streams q, dO (its k, v may stay in registers)
        "dq": pre * 2 * blocks.block_k_dq * H * it + 2 * blocks.block_q_dq * H * it,  # streams k, v; holds q, dO
    }


def accumulator_registers(kernel: str, blocks, head_dim: int, itemsize: int, warps: int) -> int:
    """32-bit registers per thread for a kernel's fp32 tiles (accumulators, scores; with 4-byte inputs also
    the operand tiles the full-precision matmuls keep in registers): above 255 it must spill."""
    H, fp32 = _pad_head_dim(head_dim), itemsize >= 4
    if kernel == "forward":
        bq, bk = blocks.block_q, blocks.block_k
        values = bq * H + bq * bk + fp32 * bq * H  # acc [bq, H], scores [bq, bk], q
    elif kernel == "dkdv":
        bq, bk = blocks.block_q_dkv, blocks.block_k_dkv
        values = 2 * bk * H + 2 * bq * bk + fp32 * 2 * bk * H  # dk, dv [bk, H], p and ds [bq, bk], k, v
    else:
        bq, bk = blocks.block_q_dq, blocks.block_k_dq
        values = bq * H + 2 * bq * bk + fp32 * 2 * bq * H  # dq [bq, H], p and ds, q and dO
    return values // (32 * warps)


def decode_floor(block_k: int, block_m: int, head_dim: int, itemsize: int, num_stages: int) -> int:
    """Lower bound (bytes) of the decode kernel's shared memory: streamed k, v tiles and the resident queries."""
    H = _pad_head_dim(head_dim)
    return max(num_stages - 1, 0) * 2 * block_k * H * itemsize + block_m * H * itemsize


def latent_decode_floor(blocks, latent_dim: int, rope_dim: int, itemsize: int) -> int:
    """Lower bound (bytes) of latent_decode_attention's shared memory: num_stages buffers of the [block_k, C] latent
    and [block_k, R] rope tiles. XLA requested more for every tile measured on sm_90 and sm_80 (bf16 and fp32, C 512
    and 1024: 1.2-2.4x; the latent is read by two matmuls in two layouts)."""
    width = (_pad_head_dim(latent_dim) + _pad_head_dim(rope_dim)) * itemsize
    return max(blocks.num_stages, 1) * blocks.block_k * width


def check_flash_fits(blocks, head_dim: int, dtype, target: GpuTarget | None = None) -> None:
    """Raise BlockSizesDoNotFit when a flash kernel's tiles certainly overflow the target's shared memory."""
    limit, where = _limit_and_name(target or current_target())
    if limit is None:
        return
    for kernel, floor in flash_floors(blocks, head_dim, _itemsize(dtype)).items():
        if floor > limit:
            raise BlockSizesDoNotFit(
                f"flash_attention's {kernel} kernel with {blocks} at head_dim {head_dim} ({_width(dtype)}-sized "
                f"inputs) needs at least {floor} bytes of shared memory per block, more than the {limit} of "
                f"{where}: use smaller tiles or fewer num_stages for that kernel, or block_sizes=None for the "
                f"target's defaults ({flash_defaults(head_dim, dtype, target)})")


def check_decode_fits(blocks, block_m: int, head_dim: int, dtype, target: GpuTarget | None = None,
                      kernel: str = "decode_attention") -> None:
    """Raise BlockSizesDoNotFit when the decode kernel's tiles certainly overflow the target's shared memory
    (also paged_decode_attention's, whose cache tile is its page or a slice of it: `kernel` names the caller)."""
    limit, where = _limit_and_name(target or current_target())
    if limit is None:
        return
    floor = decode_floor(blocks.block_k, block_m, head_dim, _itemsize(dtype), blocks.num_stages)
    if floor > limit:
        raise BlockSizesDoNotFit(
            f"{kernel} with {blocks} ({block_m} query rows per program, head_dim {head_dim}) needs at "
            f"least {floor} bytes of shared memory per block, more than the {limit} of {where}: use a smaller "
            f"block_k or num_stages, or block_sizes=None ({decode_defaults(head_dim, dtype, target)})")


def check_latent_decode_fits(blocks, latent_dim: int, rope_dim: int, dtype, target: GpuTarget | None = None) -> None:
    """Raise BlockSizesDoNotFit when latent_decode_attention's tiles certainly overflow the target's shared memory."""
    limit, where = _limit_and_name(target or current_target())
    if limit is None:
        return
    floor = latent_decode_floor(blocks, latent_dim, rope_dim, _itemsize(dtype))
    if floor > limit:
        raise BlockSizesDoNotFit(
            f"latent_decode_attention with {blocks} (latent width {latent_dim}, rope width {rope_dim}) needs at "
            f"least {floor} bytes of shared memory per block, more than the {limit} of {where}: use a smaller "
            f"block_k or num_stages, or block_sizes=None "
            f"({latent_decode_defaults(latent_dim, rope_dim, dtype, target)})")


# ----------------------------------------------------------------------------------------------------------
# The search (compiles; no GPU needed).

@dataclasses.dataclass
class Trial:
    """One candidate compiled for a target: did it compile, and what ptxas made of the kernel."""

    fields: dict
    compiled: bool
    registers: int = 0
    frame_bytes: int = 0  # stack frame: register spills
    error: str = ""

    @property
    def fits(self) -> bool:
        return self.compiled and self.frame_bytes == 0


# The masking variants a candidate must compile without spills in: every option on (causal band loops,
# segment ids, window, soft-cap), and the non-causal loop with a soft-cap (a different register allocation).
FLASH_VARIANTS = (dict(causal=True, segments=True, window=512, softcap=30.0),
                  dict(causal=False, segments=False, window=None, softcap=50.0))
FLASH_T = 1000  # not a multiple of any tile: the masked tail tiles are compiled too (they hold more registers)


def _variants(dtype) -> list[tuple[dict, Any]]:
    """(variant, dtype) pairs a candidate must compile in: fp16 shares bf16's tiles, so 2-byte candidates are
    also compiled in fp16 (whose conversions ptxas allocates differently) with every option on."""
    import jax.numpy as jnp

    pairs = [(v, dtype) for v in FLASH_VARIANTS]
    return pairs + [(FLASH_VARIANTS[0], jnp.float16)] if _itemsize(dtype) == 2 else pairs
DECODE_VARIANTS = (dict(window=1024, softcap=30.0), dict(window=None, softcap=None))


def try_flash(target: GpuTarget, kernel: str, fields: dict, head_dim: int, dtype) -> Trial:
    """Compile flash attention (forward, or forward+backward for dkdv/dq) with `kernel` at the candidate tiles
    (the others at 16 x 16) in each of FLASH_VARIANTS, stopping at the first that spills or fails."""
    trial = None
    for variant, dt in _variants(dtype):
        trial = _flash_trial(target, kernel, {**_blocks(), **fields}, head_dim, dt, variant, fields)
        if not trial.fits:
            break
    return trial


def _flash_trial(target, kernel: str, blocks: dict, head_dim: int, dtype, variant: dict, fields: dict) -> Trial:
    import jax
    import jax.numpy as jnp

    from pallas_kernels.flash_attention import BlockSizes, flash_attention

    q, kv = _qkv(head_dim, dtype)
    seg = jax.ShapeDtypeStruct((1, FLASH_T), jnp.int32)

    def attn(q, k, v, s):
        return flash_attention(q, k, v, causal=variant["causal"], segment_ids=(s, s) if variant["segments"] else None,
                               window=variant["window"], softcap=variant["softcap"], block_sizes=BlockSizes(**blocks))

    fn = attn if kernel == "forward" else jax.grad(lambda *a: attn(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    return _trial(fn, [q, kv, kv, seg], target, f"flash_attention_{kernel}", fields)


def try_decode(target: GpuTarget, fields: dict, head_dim: int, dtype, block_m: int) -> Trial:
    """Compile decode_attention with `block_m` query rows per program (Tq x G, G = 8) in each of DECODE_VARIANTS."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.decode_attention import BlockSizes, decode_attention

    q = jax.ShapeDtypeStruct((2, block_m // 8, 8, head_dim), dtype)
    cache = jax.ShapeDtypeStruct((2, 4096, 1, head_dim), dtype)
    lengths = jax.ShapeDtypeStruct((2,), jnp.int32)
    trial = None
    for variant in DECODE_VARIANTS:
        fn = functools.partial(decode_attention, block_sizes=BlockSizes(**fields), **variant)
        trial = _trial(fn, [q, cache, cache, lengths], target, "decode_attention_split", fields)
        if not trial.fits:
            break
    return trial


def verify(target: str | GpuTarget, entry: dict, head_dim: int, dtype, log: Callable[[str], None] = print) -> bool:
    """Whether a table entry's tiles compile in every variant with no more spills than it records (one
    forward+backward compile per variant holds all three flash kernels)."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.flash_attention import BlockSizes, flash_attention
    from pallas_kernels.targets.cubin import compile_for

    target, allowed = get_target(target), entry.get("spills", {})
    seg = jax.ShapeDtypeStruct((1, FLASH_T), jnp.int32)
    for v, dt in _variants(dtype):
        q, kv = _qkv(head_dim, dt)

        def loss(q, k, v_, s, v=v):
            return flash_attention(q, k, v_, causal=v["causal"], segment_ids=(s, s) if v["segments"] else None,
                                   window=v["window"], softcap=v["softcap"],
                                   block_sizes=BlockSizes(**entry["flash"])).astype(jnp.float32).sum()
        try:
            result = compile_for(jax.grad(loss, argnums=(0, 1, 2)), [q, kv, kv, seg], target)
        except Exception as e:  # noqa: BLE001
            log(f"  verify {v}: " + " ".join(str(e).split())[:120])
            return False
        for kernel in ("forward", "dkdv", "dq"):
            k = result.kernel(f"flash_attention_{kernel}")
            if k.frame_bytes > allowed.get(kernel, 0):
                log(f"  verify {kernel} {v}: spills {k.frame_bytes} bytes")
                return False
    trial = try_decode(target, entry["decode"], head_dim, dtype, 16)
    if not trial.compiled or trial.frame_bytes > allowed.get("decode", 0):
        _show(log, "verify decode", trial)
        return False
    return True


def _qkv(head_dim: int, dtype) -> tuple[Any, Any]:
    """Query (2 heads) and key/value (1 head: GQA) shapes for the search's compiles."""
    import jax

    return (jax.ShapeDtypeStruct((1, FLASH_T, 2, head_dim), dtype),
            jax.ShapeDtypeStruct((1, FLASH_T, 1, head_dim), dtype))


def _trial(fn: Callable, args: list, target: GpuTarget, kernel: str, fields: dict) -> Trial:
    from pallas_kernels.targets.cubin import compile_for

    try:
        k = compile_for(fn, args, target).kernel(kernel)
    except Exception as e:  # noqa: BLE001 - XLA's JaxRuntimeError: shared memory exceeded, Triton failures
        return Trial(fields, False, error=re.sub(r"\s+", " ", str(e))[:200])
    return Trial(fields, True, k.registers, k.frame_bytes)


def _show(log, kernel: str, trial: Trial) -> None:
    verdict = "fits" if trial.fits else "spills" if trial.compiled else "no"
    log(f"  {kernel} {trial.fields}: {verdict} registers={trial.registers} frame={trial.frame_bytes} "
        f"{trial.error[:90]}")


def search(target: str | GpuTarget, head_dim: int, dtype, log: Callable[[str], None] = print) -> dict:
    """The table entry for (target, head dim, dtype): per kernel, the first candidate that compiles without
    spills. Where no candidate avoids spills (fp32's full-precision matmuls at large head dims), the one with
    the fewest spill bytes, recorded under "spills"; fewer stages are tried only while tiles are refused for
    shared memory (stages change what is buffered, hardly the registers)."""
    target = get_target(target)
    it, limit = _itemsize(dtype), target.shared_memory_per_block_optin
    best, best_score = None, None

    def pick(kernel: str, candidates: list[dict]) -> tuple[Trial | None, bool]:
        """(first spill-free trial, else the least-spilling compiled one; whether any was refused for memory)."""
        compiled, refused = [], False
        for fields in candidates:
            blocks = _blocks(**fields)
            if flash_floors(blocks, head_dim, it)[kernel] > limit:  # certainly too big: no compile
                refused = True
                continue
            warps = blocks.num_warps if kernel == "forward" else blocks.num_warps_bwd
            if accumulator_registers(kernel, blocks, head_dim, it, warps) > 255:  # certainly spills: no compile
                continue
            trial = try_flash(target, kernel, fields, head_dim, dtype)
            _show(log, kernel, trial)
            if trial.fits:
                return trial, refused
            if trial.compiled:
                compiled.append(trial)
            else:
                refused = True
        return (min(compiled, key=lambda t: t.frame_bytes) if compiled else None), refused

    for s in STAGES:
        fwd, refused = pick("forward", [dict(block_q=bq, block_k=bk, num_warps=w, num_stages=s)
                                        for bq, bk, w in FWD_TILES])
        for w in BWD_WARPS if fwd else ():
            dkdv, r1 = pick("dkdv", [dict(block_q_dkv=bq, block_k_dkv=bk, num_warps_bwd=w, num_stages=s)
                                     for bq, bk in DKDV_TILES])
            dq, r2 = pick("dq", [dict(block_q_dq=bq, block_k_dq=bk, num_warps_bwd=w, num_stages=s)
                                 for bq, bk in DQ_TILES]) if dkdv else (None, False)
            refused = refused or r1 or r2
            if not (dkdv and dq):
                continue
            trials = {"forward": fwd, "dkdv": dkdv, "dq": dq}
            score = (sum(not t.fits for t in trials.values()), sum(t.frame_bytes for t in trials.values()))
            if best_score is None or score < best_score:
                best, best_score = trials, score
            if score[0] == 0:
                break
        if best_score is not None and (best_score[0] == 0 or not refused):
            break
    if best is None:
        raise RuntimeError(f"no candidate tiles compile for {target.name} at head_dim {head_dim}, {_width(dtype)}")
    return _entry(best, _search_decode(target, head_dim, dtype, log))


def _entry(flash: dict[str, Trial], decode: Trial) -> dict:
    trials = {**flash, "decode": decode}
    entry = {"flash": {k: v for t in flash.values() for k, v in t.fields.items()}, "decode": decode.fields,
             "registers": {k: t.registers for k, t in trials.items()}}
    spills = {k: t.frame_bytes for k, t in trials.items() if t.frame_bytes}
    return {**entry, "spills": spills} if spills else entry


def _search_decode(target: GpuTarget, head_dim: int, dtype, log) -> Trial:
    """The first decode tiles without spills at 16 query rows (one token, G <= 16) that also compile at
    DECODE_BLOCK_M rows (where holding a [128, H] fp32 accumulator may spill at large H); failing that,
    the compiling tiles with the fewest spill bytes at 16 rows."""
    spilled = []
    for s in STAGES:
        for bk, w in DECODE_TILES:
            fields = dict(block_k=bk, num_warps=w, num_stages=s)
            if decode_floor(bk, DECODE_BLOCK_M, head_dim, _itemsize(dtype), s) > target.shared_memory_per_block_optin:
                continue
            small = try_decode(target, fields, head_dim, dtype, 16)
            _show(log, "decode (16 rows)", small)
            if not small.compiled:
                continue
            large = try_decode(target, fields, head_dim, dtype, DECODE_BLOCK_M)
            _show(log, f"decode ({DECODE_BLOCK_M} rows)", large)
            if large.compiled and small.fits:
                return small
            if large.compiled:
                spilled.append(small)
        if spilled:  # fewer stages would not remove register spills
            return min(spilled, key=lambda t: t.frame_bytes)
    raise RuntimeError(f"no decode tile compiles for {target.name} at head_dim {head_dim}")


def main(argv: list[str] | None = None) -> None:
    """Regenerate targets/blocks.json by compiling candidates (minutes per target; no GPU needed)."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--targets", nargs="+", default=list(SEARCH_TARGETS))
    p.add_argument("--head-dims", type=int, nargs="+", default=list(HEAD_DIMS))
    p.add_argument("--widths", nargs="+", default=list(WIDTHS.values()), choices=list(WIDTHS.values()))
    p.add_argument("--write", action="store_true", help=f"merge the results into {TABLE_PATH}")
    p.add_argument("--force", action="store_true", help="measure entries the table already has again")
    p.add_argument("--table", default=str(TABLE_PATH), help="the JSON table to merge into")
    args = p.parse_args(argv)
    path = Path(args.table)
    import jax
    import jax.numpy as jnp

    out = json.loads(path.read_text()) if path.exists() else {}
    out["_about"] = (f"written by `python -m pallas_kernels.tuning --write` with jax {jax.__version__}: first "
                     "candidate tiles that compile for the architecture within its shared memory and without "
                     "register spills; registers are ptxas' per thread")
    for name in args.targets:
        target = get_target(name)
        for width in args.widths:
            for H in args.head_dims:
                known = out.get(target.arch, {}).get(width, {}).get(str(H))
                if known and not args.force and verify(target, known, H, jnp.dtype(width)):
                    print(f"{target.name} {width} head_dim {H}: the table's tiles still hold", flush=True)
                    continue
                start = time.perf_counter()
                print(f"{target.name} {target.arch} {width} head_dim {H}", flush=True)
                entry = search(target, H, jnp.dtype(width), log=lambda m: print(m, flush=True))
                out.setdefault(target.arch, {}).setdefault(width, {})[str(H)] = entry
                print(f"  -> {entry} ({time.perf_counter() - start:.0f} s)", flush=True)
                if args.write:  # merged into the file as it is now: several searches may run at once
                    now = json.loads(path.read_text()) if path.exists() else {}
                    now.setdefault(target.arch, {}).setdefault(width, {})[str(H)] = entry
                    path.write_text(json.dumps({**now, "_about": out["_about"]}, indent=1, sort_keys=True) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
