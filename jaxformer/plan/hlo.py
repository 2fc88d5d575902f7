"""Read a compiled (optimized, SPMD-partitioned, per-device) HLO module: matmul FLOPs and collective traffic.

XLA's own cost analysis (`cost_analysis`, which runs HloCostAnalysis on the module) counts a while
loop's body once; a scanned model or gradient accumulation runs it many times. This walker follows
the call graph (fusions, calls, async wrappers, conditionals, while bodies times their
`known_trip_count`) and counts what dominates a step:

  dot FLOPs         2 x output elements x contracted size, for dots inside fusions and cuBLAS calls
  collective bytes  what each device sends per collective on a ring: all-gather (n-1)/n x output,
                    reduce-scatter (n-1)/n x input, all-reduce 2(n-1)/n x size, all-to-all
                    (n-1)/n x size, collective-permute x size; and whether its device groups span hosts

Pallas kernels are custom calls whose FLOPs no HLO analysis sees; callers add them from a model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np

DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
               "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
               "c128": 16}
COLLECTIVES = {op + start: kind for op, kind in [
    ("all-gather", "all-gather"), ("all-reduce", "all-reduce"), ("reduce-scatter", "reduce-scatter"),
    ("all-to-all", "all-to-all"), ("ragged-all-to-all", "all-to-all"), ("collective-permute", "collective-permute")]
    for start in ("", "-start")}  # async pairs: the -start op carries the data, -done only waits

_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \((.*)\) -> .* \{$")
_ARRAY = re.compile(r"([a-z]\w*)\[([\d,]*)\]")


@dataclasses.dataclass
class _Inst:
    name: str
    shape: str  # the result shape text, e.g. bf16[8,1024]{1,0} or a tuple (...)
    op: str
    operands: list[str]
    attrs: str


@dataclasses.dataclass
class ModuleStats:
    """Per-device totals of one step, loop bodies counted as often as they run."""

    dot_flops: float = 0.0
    collective_bytes: dict[str, float] = dataclasses.field(default_factory=dict)  # kind -> bytes sent per device
    cross_host_bytes: float = 0.0  # of which in collectives whose device groups span hosts
    custom_calls: dict[str, int] = dataclasses.field(default_factory=dict)  # target -> executions (e.g. Pallas)

    @property
    def comm_bytes(self) -> float:
        return float(sum(self.collective_bytes.values()))


def arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """[(dtype, dims)] of an HLO shape text (one entry, or one per tuple element)."""
    return [(d, tuple(int(x) for x in dims.split(",") if x)) for d, dims in _ARRAY.findall(shape) if d in DTYPE_BYTES]


def nbytes(shape: str) -> int:
    """Bytes of every array in an HLO shape text."""
    return sum(DTYPE_BYTES[d] * math.prod(dims) for d, dims in arrays(shape))


def parse_module(text: str) -> tuple[dict[str, list[_Inst]], dict[str, dict[str, str]], str]:
    """(computation -> instructions, computation -> {name: shape}, entry computation name)."""
    comps: dict[str, list[_Inst]] = {}
    shapes: dict[str, dict[str, str]] = {}
    entry, current = "", None
    for line in text.splitlines():
        head = _HEADER.match(line)
        if head:
            current = head.group(1)
            comps[current], shapes[current] = [], {}
            for param in _split_top(head.group(2)):
                if ":" in param:
                    name, shape = param.split(":", 1)
                    shapes[current][name.strip().lstrip("%")] = shape.strip()
            if line.startswith("ENTRY"):
                entry = current
            continue
        if current is None or " = " not in line:
            continue
        inst = _parse_inst(line)
        if inst:
            comps[current].append(inst)
            shapes[current][inst.name] = inst.shape
    return comps, shapes, entry


def _parse_inst(line: str) -> _Inst | None:
    lhs, rhs = line.strip().split(" = ", 1)
    name = lhs.removeprefix("ROOT ").strip().lstrip("%")
    if rhs.startswith("("):  # tuple shape: up to its matching parenthesis
        depth, end = 0, 0
        for end, ch in enumerate(rhs):
            depth += (ch == "(") - (ch == ")")
            if depth == 0:
                break
        shape, rest = rhs[:end + 1], rhs[end + 1:].lstrip()
    else:
        shape, _, rest = rhs.partition(" ")
    m = re.match(r"([\w\-]+)\(", rest)
    if not m:
        return None
    depth, end = 0, m.end() - 1
    for end in range(m.end() - 1, len(rest)):
        depth += (rest[end] == "(") - (rest[end] == ")")
        if depth == 0:
            break
    operands = [o.split()[-1].lstrip("%") for o in _split_top(rest[m.end():end]) if o.strip()]
    return _Inst(name, shape, m.group(1), operands, rest[end + 1:])


def _split_top(s: str) -> list[str]:
    """Split on commas outside brackets, braces and parentheses."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            out.append(s[start:i])
            start = i + 1
    out.append(s[start:])
    return [o.strip() for o in out]


def analyze(text: str, *, n_devices: int, devices_per_host: int) -> ModuleStats:
    """Dot FLOPs, collective bytes and custom calls of one execution of the module, per device."""
    comps, shapes, entry = parse_module(text)
    stats = ModuleStats()
    _walk(entry, 1.0, comps, shapes, stats, n_devices, devices_per_host, set())
    return stats


def _walk(comp: str, times: float, comps, shapes, stats: ModuleStats, n_devices: int, per_host: int, stack) -> None:
    if comp not in comps or comp in stack:
        return
    stack = stack | {comp}
    for inst in comps[comp]:
        if inst.op == "dot":
            stats.dot_flops += times * _dot_flops(inst, shapes[comp])
        elif inst.op == "custom-call":
            target = re.search(r'custom_call_target="([^"]+)"', inst.attrs)
            target = target.group(1) if target else "?"
            if target.startswith("__cublas"):
                stats.dot_flops += times * _cublas_flops(inst, shapes[comp])
            else:
                stats.custom_calls[target] = stats.custom_calls.get(target, 0) + int(times)
        elif inst.op in COLLECTIVES:
            kind = COLLECTIVES[inst.op]
            sent, crosses = _collective_bytes(inst, kind, n_devices, per_host)
            stats.collective_bytes[kind] = stats.collective_bytes.get(kind, 0.0) + times * sent
            stats.cross_host_bytes += times * sent * crosses
        trips = 1.0
        if inst.op == "while":
            m = re.search(r'"known_trip_count":\{"n":"(\d+)"', inst.attrs)
            trips = float(m.group(1)) if m else 1.0
        for callee in _callees(inst):
            _walk(callee, times * trips, comps, shapes, stats, n_devices, per_host, stack)


def _callees(inst: _Inst) -> list[str]:
    names = re.findall(r"(?:calls|to_apply|body)=%?([\w.\-]+)", inst.attrs)
    branches = re.search(r"branch_computations=\{([^}]*)\}", inst.attrs)
    if branches:
        names += [b.strip().lstrip("%") for b in branches.group(1).split(",")]
    return names


def _dims(attrs: str, key: str) -> list[int]:
    m = re.search(key + r"=\{([\d,]*)\}", attrs)
    return [int(x) for x in m.group(1).split(",") if x] if m else []


def _dot_flops(inst: _Inst, shapes: dict[str, str]) -> float:
    out = arrays(inst.shape)
    lhs = arrays(shapes.get(inst.operands[0], "")) if inst.operands else []
    if not out or not lhs:
        return 0.0
    contracted = math.prod(lhs[0][1][d] for d in _dims(inst.attrs, "lhs_contracting_dims"))
    return 2.0 * math.prod(out[0][1]) * contracted


def _cublas_flops(inst: _Inst, shapes: dict[str, str]) -> float:
    out = arrays(inst.shape)
    lhs = arrays(shapes.get(inst.operands[0], "")) if inst.operands else []
    m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', inst.attrs)
    if not out or not lhs or not m:
        return 0.0
    contracted = math.prod(lhs[0][1][int(json.loads(d))] for d in m.group(1).split(",") if d.strip())
    return 2.0 * math.prod(out[0][1]) * contracted


def _collective_bytes(inst: _Inst, kind: str, n_devices: int, per_host: int) -> tuple[float, bool]:
    """(bytes one device sends, whether the device groups span hosts) of one collective."""
    outs = inst.shape
    if inst.op.endswith("-start") and kind != "all-reduce":  # async results are (inputs, outputs, ...)
        parts = _split_top(inst.shape[1:-1]) if inst.shape.startswith("(") else [inst.shape]
        ins, outs = (parts[0], parts[1]) if len(parts) >= 2 else (parts[0], parts[0])
    if kind == "collective-permute":
        m = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", inst.attrs)
        pairs = re.findall(r"\{(\d+),(\d+)\}", m.group(1)) if m else []
        return float(nbytes(outs)), any(int(a) // per_host != int(b) // per_host for a, b in pairs)
    groups = replica_groups(inst.attrs, n_devices)
    n = len(groups[0])
    if n <= 1:
        return 0.0, False
    crosses = any(len({d // per_host for d in g}) > 1 for g in groups)
    if kind == "reduce-scatter":  # the full input: n times each device's output
        size = nbytes(ins) if inst.op.endswith("-start") else n * nbytes(outs)
    else:  # all-gather: the gathered output; all-reduce, all-to-all: the buffer
        size = nbytes(outs)
    return size * (2 if kind == "all-reduce" else 1) * (n - 1) / n, crosses


def replica_groups(attrs: str, n_devices: int) -> list[list[int]]:
    """The device groups of a collective: explicit {{0,1},{2,3}}, or the iota form [G,N]<=[dims]T(perm)."""
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
    if m:
        g, n = int(m.group(1)), int(m.group(2))
        dims = [int(x) for x in m.group(3).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(4):
            ids = ids.transpose([int(x) for x in m.group(4).split(",")])
        return ids.reshape(g, n).tolist()
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)  # mesh['a'=8,'b'=1] {'a'}
    if m:
        axes = re.findall(r"'([^']+)'=(\d+)", m.group(1))
        names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
        over = [names.index(a) for a in re.findall(r"'([^']+)'", m.group(2))]
        ids = np.arange(math.prod(sizes)).reshape(sizes)
        ids = ids.transpose([i for i in range(len(sizes)) if i not in over] + over)
        return ids.reshape(-1, math.prod(sizes[i] for i in over)).tolist()
    m = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", attrs)
    if m and m.group(1):
        return [[int(x) for x in grp.split(",") if x] for grp in re.findall(r"\{([\d,]*)\}", m.group(1))]
    return [list(range(n_devices))]
