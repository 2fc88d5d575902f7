"""GPU targets as data: the NVIDIA devices jaxformer compiles for without having one (H100, H200, A100).

A target is `<name>.txtpb`, a GpuTargetConfigProto (the device properties XLA:GPU compiles against:
SMs, shared memory, registers, memory, compute capability), plus its published peaks in specs.toml.
With the `gpu-compile` extra installed (jax-cuda12-plugin and nvidia-cuda-nvcc-cu12, whose ptxas and
libdevice XLA uses), `compile_devices("h100", "1x1x8")` gives eight compile-only H100s: put
ShapeDtypeStructs on them and `jax.jit(f).lower(...).compile()` runs the whole XLA:GPU pipeline,
Pallas' Triton kernels included, down to cubins, on a machine with no GPU.

    with compiling_for("h100"):          # Pallas kernels compile (no interpret-mode refusal) and take
        exe = jax.jit(f).lower(*args).compile()   # the target's default block sizes

On a machine without an NVIDIA driver JAX must run with jax_platforms="cpu" (else the CUDA plugin
fails to start and no topology can be made); compile_devices sets it when JAX has not started yet.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib.util
import re
import tomllib
from pathlib import Path
from typing import Iterator

TARGET_DIR = Path(__file__).resolve().parent
INSTALL_HINT = "pip install -e '.[gpu-compile]'  (jax-cuda12-plugin==<jaxlib version> and nvidia-cuda-nvcc-cu12)"


class GpuCompileUnavailable(RuntimeError):
    """Compiling for a GPU target needs the gpu-compile extra, or JAX was started in a way that rules it out."""


@dataclasses.dataclass(frozen=True)
class GpuTarget:
    """One NVIDIA GPU model: what kernels may use, what memory holds, and how fast it computes and moves data."""

    name: str  # h100, h200, a100, a100-40gb
    description: str
    device_kind: str  # what jax.Device.device_kind reports on the real part
    compute_capability: tuple[int, int]
    sm_count: int
    shared_memory_per_block_optin: int  # bytes one thread block may use (opt-in maximum)
    shared_memory_per_sm: int
    registers_per_sm: int  # 32-bit registers
    registers_per_block: int
    threads_per_sm: int
    memory_bytes: int  # HBM
    hbm_bandwidth: float  # bytes/s
    l2_cache_bytes: int
    clock_ghz: float
    peak_bf16_flops: float  # dense tensor-core FLOP/s
    peak_tf32_flops: float
    peak_fp32_flops: float
    nvlink_bandwidth: float  # bytes/s per GPU, each direction, within a host
    network_bandwidth: float  # bytes/s per GPU, each direction, between hosts
    config_text: str = dataclasses.field(repr=False, compare=False)  # the GpuTargetConfigProto

    @property
    def arch(self) -> str:
        """The cubin architecture, e.g. 'sm_90'."""
        return f"sm_{self.compute_capability[0]}{self.compute_capability[1]}"

    def peak_flops(self, dtype) -> float:
        """Dense matmul peak for a compute dtype: bf16/fp16 on tensor cores; float32 as TF32 (XLA's default)."""
        import numpy as np

        return self.peak_bf16_flops if np.dtype(dtype).itemsize <= 2 else self.peak_tf32_flops


def target_names() -> list[str]:
    """Names of the targets shipped with the package."""
    return sorted(p.stem for p in TARGET_DIR.glob("*.txtpb"))


def get_target(name: str | GpuTarget) -> GpuTarget:
    """The GpuTarget called `name` (case-insensitive: h100, h200, a100, a100-40gb)."""
    if isinstance(name, GpuTarget):
        return name
    key = str(name).strip().lower()
    if key not in target_names():
        raise ValueError(f"unknown GPU target {name!r}; known targets: {', '.join(target_names())} "
                         f"(data files in {TARGET_DIR})")
    return _load(key)


@functools.cache
def _load(name: str) -> GpuTarget:
    text = (TARGET_DIR / f"{name}.txtpb").read_text()
    info = _proto_fields(text)
    specs = tomllib.loads((TARGET_DIR / "specs.toml").read_text())[name]
    cc = re.search(r"cuda_compute_capability\s*\{\s*major:\s*(\d+)\s*minor:\s*(\d+)", text)
    return GpuTarget(
        name=name, description=specs["description"], device_kind=info["device_description_str"],
        compute_capability=(int(cc.group(1)), int(cc.group(2))), sm_count=int(info["core_count"]),
        shared_memory_per_block_optin=int(info["shared_memory_per_block_optin"]),
        shared_memory_per_sm=int(info["shared_memory_per_core"]), registers_per_sm=int(info["registers_per_core_limit"]),
        registers_per_block=int(info["registers_per_block_limit"]), threads_per_sm=int(info["threads_per_core_limit"]),
        memory_bytes=int(info["device_memory_size"]), hbm_bandwidth=float(info["memory_bandwidth"]),
        l2_cache_bytes=int(info["l2_cache_size"]), clock_ghz=float(info["clock_rate_ghz"]),
        peak_bf16_flops=float(specs["peak_bf16_flops"]), peak_tf32_flops=float(specs["peak_tf32_flops"]),
        peak_fp32_flops=float(specs["peak_fp32_flops"]), nvlink_bandwidth=float(specs["nvlink_bandwidth"]),
        network_bandwidth=float(specs["network_bandwidth"]), config_text=text)


def _proto_fields(text: str) -> dict[str, str]:
    """`key: value` scalars of a text proto (nesting ignored; our files hold each key once)."""
    out = {}
    for key, value in re.findall(r"^\s*(\w+):\s*(\"[^\"]*\"|[-+0-9.eE]+)\s*$", text, re.MULTILINE):
        out[key] = value.strip('"')
    return out


def target_for_device(device) -> GpuTarget | None:
    """The shipped target a real jax GPU device is (by device_kind, else by compute capability), or None."""
    if getattr(device, "platform", None) != "gpu":
        return None
    targets = [get_target(n) for n in target_names()]
    for t in targets:
        if t.device_kind == device.device_kind:
            return t
    cc = tuple(int(x) for x in str(getattr(device, "compute_capability", "0.0")).split("."))
    same = [t for t in targets if t.compute_capability == cc]
    return max(same, key=lambda t: t.memory_bytes) if same else None


# ----------------------------------------------------------------------------------------------------------
# Compiling for a target that is not here.

_COMPILE_TARGET: contextvars.ContextVar[GpuTarget | None] = contextvars.ContextVar("compile_target", default=None)


@contextlib.contextmanager
def compiling_for(target: str | GpuTarget) -> Iterator[GpuTarget]:
    """Within this block Pallas kernels are traced for `target`: compiled (not refused on a CPU host) and
    given that target's default block sizes."""
    token = _COMPILE_TARGET.set(get_target(target))
    try:
        yield _COMPILE_TARGET.get()
    finally:
        _COMPILE_TARGET.reset(token)


def compile_target() -> GpuTarget | None:
    """The target set by an enclosing `compiling_for`, else None."""
    return _COMPILE_TARGET.get()


def nvidia_driver_present() -> bool:
    """True when this machine has an NVIDIA kernel driver (a GPU JAX could run on)."""
    return Path("/proc/driver/nvidia/version").exists()


def gpu_compiler_missing() -> list[str]:
    """The packages of the gpu-compile extra that are not installed (empty when compiling is possible)."""
    needed = {"jax_cuda12_plugin": "jax-cuda12-plugin", "nvidia.cuda_nvcc": "nvidia-cuda-nvcc-cu12"}
    missing = []
    for module, package in needed.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a missing parent package (nvidia)
            found = False
        if not found:
            missing.append(package)
    return missing


def check_topology(topology: str) -> tuple[int, int, int]:
    """'PxHxD' (partitions x hosts x devices per host) as ints; a clear error otherwise."""
    m = re.fullmatch(r"\s*(\d+)x(\d+)x(\d+)\s*", str(topology))
    if not m or min(int(g) for g in m.groups()) < 1:
        raise ValueError(f"topology must look like 'PxHxD' (partitions x hosts x devices per host, e.g. '1x1x8' "
                         f"for one 8-GPU host, '1x4x8' for four), got {topology!r}")
    return tuple(int(g) for g in m.groups())


def compile_devices(target: str | GpuTarget, topology: str = "1x1x1") -> list:
    """Compile-only jax devices of `target` laid out as `topology` ('PxHxD'); needs the gpu-compile extra."""
    import jax
    from jax._src import xla_bridge
    from jax.experimental import topologies

    target = get_target(target)
    check_topology(topology)
    missing = gpu_compiler_missing()
    if missing:
        raise GpuCompileUnavailable(f"compiling for {target.name} without the GPU needs {', '.join(missing)}: "
                                    f"{INSTALL_HINT}")
    started = getattr(xla_bridge, "backends_are_initialized", lambda: True)()
    if not started and not nvidia_driver_present() and not jax.config.jax_platforms:
        jax.config.update("jax_platforms", "cpu")  # no driver: the CUDA plugin may only compile, never start
    try:
        desc = topologies.get_topology_desc(platform="cuda", target_config=target.config_text, topology=topology)
    except NotImplementedError as e:
        raise GpuCompileUnavailable(
            f"JAX's CUDA plugin did not start ({e}); on a machine without an NVIDIA driver set JAX_PLATFORMS=cpu "
            "(or jax.config.update('jax_platforms', 'cpu')) before JAX initialises its backends") from None
    return list(desc.devices)

