"""Compile for a GPU target here, and read what XLA built: the cubins, their architecture and registers.

`compile_for(fn, args, target)` lowers and compiles `fn` for compile-only devices of `target` with
XLA's kernel cache file switched on (`xla_gpu_kernel_cache_file`), then reads every cubin XLA wrote
into it: an ELF image (machine EM_CUDA) whose e_flags hold the SM version, with a `.text.<kernel>`
section per kernel and, in `.nv.info`, ptxas' register count (EIATTR_REGCOUNT) and stack frame size
(EIATTR_FRAME_SIZE; local memory that, in a Triton kernel, means register spills) per kernel. So a
test can prove that a Pallas kernel became an sm_90 or sm_80 binary, and how many registers it holds.
"""

from __future__ import annotations

import dataclasses
import struct
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from pallas_kernels.targets import GpuTarget, compile_devices, compiling_for, get_target

ELF_MAGIC = b"\x7fELF"
EM_CUDA = 190
SHT_SYMTAB = 2
EIATTR_FRAME_SIZE = 0x11
EIATTR_REGCOUNT = 0x2F
EIFMT_SVAL = 0x04  # records: u8 format, u8 attribute, u16 value, or u16 size + payload for SVAL
# The registers and spills a GPU run gets: XLA's default backend optimization level, whatever XLA_FLAGS this process
# has (the test suite lowers it for its CPU programs; at level 0 ptxas spills a Pallas kernel twice as much)
GPU_RUN_OPTIONS = {"xla_backend_optimization_level": 3}


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One GPU kernel of a cubin: its name, ptxas' registers per thread and stack frame (spill) bytes."""

    name: str
    arch: str  # sm_90, sm_80
    registers: int
    frame_bytes: int


def read_cubins(data: bytes) -> list[Kernel]:
    """Every kernel of every cubin (CUDA ELF image) found in `data`, e.g. an XLA kernel cache file."""
    out, at = [], data.find(ELF_MAGIC)
    while at >= 0:
        if data[at + 4] == 2 and struct.unpack_from("<H", data, at + 18)[0] == EM_CUDA:  # 64-bit, EM_CUDA
            out += _kernels(data, at)
        at = data.find(ELF_MAGIC, at + 4)
    return out


def _kernels(data: bytes, base: int) -> list[Kernel]:
    arch = f"sm_{struct.unpack_from('<I', data, base + 48)[0] & 0xFF}"  # EF_CUDA_SM: low byte of e_flags
    shoff = struct.unpack_from("<Q", data, base + 40)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, base + 58)
    sections = []  # (name offset, type, file offset, size, link)
    for i in range(shnum):
        name, kind, _, _, offset, size, link = struct.unpack_from("<IIQQQQI", data, base + shoff + i * shentsize)
        sections.append((name, kind, base + offset, size, link))
    names = [_cstr(data, sections[shstrndx][2] + s[0]) for s in sections]
    symbols = []
    for (_, kind, offset, size, link) in sections:
        if kind == SHT_SYMTAB:  # Elf64_Sym: u32 name, u8 info, u8 other, u16 shndx, u64 value, u64 size
            symbols = [_cstr(data, sections[link][2] + struct.unpack_from("<I", data, offset + j)[0])
                       for j in range(0, size, 24)]
    info = {EIATTR_REGCOUNT: {}, EIATTR_FRAME_SIZE: {}}
    if ".nv.info" in names:
        _, _, offset, size, _ = sections[names.index(".nv.info")]
        for attr, payload in _records(data[offset:offset + size]):
            if attr in info and len(payload) == 8:
                symbol, value = struct.unpack("<II", payload)
                info[attr][symbols[symbol] if symbol < len(symbols) else symbol] = value
    kernels = [n[len(".text."):] for n in names if n.startswith(".text.")]
    return [Kernel(k, arch, info[EIATTR_REGCOUNT].get(k, 0), info[EIATTR_FRAME_SIZE].get(k, 0)) for k in kernels]


def _records(blob: bytes):
    at = 0
    while at + 4 <= len(blob):
        fmt, attr, value = struct.unpack_from("<BBH", blob, at)
        at += 4
        if fmt == EIFMT_SVAL:
            yield attr, blob[at:at + value]
            at += value


def _cstr(data: bytes, at: int) -> str:
    return data[at:data.index(b"\0", at)].decode("ascii", "replace")


@dataclasses.dataclass
class TargetCompile:
    """What compiling one function for a GPU target produced."""

    target: GpuTarget
    compiled: Any  # jax.stages.Compiled (memory_analysis(), as_text(), ...)
    kernels: list[Kernel]  # every kernel of the executable, Pallas' and XLA's own fusions
    seconds: float

    def kernel(self, name: str) -> Kernel:
        """The kernel called `name` (a Pallas kernel's name= argument); a clear error listing them if absent."""
        found = [k for k in self.kernels if k.name == name]
        if not found:
            raise LookupError(f"no kernel {name!r} among {sorted({k.name for k in self.kernels})}")
        return found[0]


def compile_for(fn: Callable, args: Sequence[Any], target: str | GpuTarget, *, devices: Sequence[Any] | None = None,
                **jit_kwargs) -> TargetCompile:
    """jax.jit(fn, **jit_kwargs) compiled for `target` on ShapeDtypeStruct `args`, with its cubins read back.

    Arguments without a sharding are placed on one compile-only device of the target (or `devices[0]`).
    Raises what XLA raises, e.g. JaxRuntimeError "Shared memory size limit exceeded" for a tile that
    does not fit.
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    target = get_target(target)
    devices = list(devices) if devices is not None else compile_devices(target, "1x1x1")
    one = NamedSharding(jax.sharding.Mesh(devices[:1], ("d",)), PartitionSpec())
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding or one) if isinstance(a, jax.ShapeDtypeStruct)
            else a for a in args]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="jaxformer-cubins-") as tmp, compiling_for(target):
        cache = Path(tmp) / "kernels.bin"
        lowered = jax.jit(fn, **jit_kwargs).lower(*args)
        compiled = lowered.compile(compiler_options={"xla_gpu_kernel_cache_file": str(cache), **GPU_RUN_OPTIONS})
        kernels = read_cubins(cache.read_bytes()) if cache.exists() else []
    return TargetCompile(target, compiled, kernels, time.perf_counter() - start)
