"""`jaxformer plan`: does this config fit that cluster, how fast would it run, and what would make it fit.

plan_train / plan_decode compile the real step for the topology (jaxformer.plan.steps) and report,
per device: parameter, optimizer, batch / KV-cache and temporary bytes against what JAX may use of
the GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION, 75% by default); FLOPs per step from XLA's cost
analysis and from the HLO's matmuls next to the 6·N·tokens estimate; a roofline step time (compute,
HBM and collective traffic, perfectly overlapped: a lower bound) with its MFU / tokens per second;
the largest batch that fits (a search over compiles seeded by a linear fit of memory in the batch);
and, when the step does not fit, which knob (chunked loss, remat, fsdp, batch) makes it fit, each tried by a
compile.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, Callable

from jaxformer import sharding
from jaxformer.config import EncDecConfig, ModelConfig
from jaxformer.plan.steps import StepCompile, compile_decode, compile_train
from jaxformer.train.flops import train_flops_per_token
from pallas_kernels.targets import GpuTarget, compile_devices, get_target

DEFAULT_MEM_FRACTION = 0.75  # JAX's GPU allocator takes this share of device memory unless told otherwise
GiB = 2**30


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def topology(devices: int, hosts: int) -> str:
    """'1xHxD' for `devices` GPUs spread evenly over `hosts` hosts."""
    if devices < 1 or hosts < 1 or devices % hosts:
        raise ValueError(f"--devices {devices} must be a positive multiple of --hosts {hosts} (GPUs per host x hosts)")
    return f"1x{hosts}x{devices // hosts}"


def _setup(cfgs: dict[str, Any], target: str | GpuTarget, devices: int, hosts: int):
    mcfg = cfgs["model"]
    if isinstance(mcfg, EncDecConfig):
        raise ValueError("jaxformer plan compiles decoder-only language models; this config is an encoder-decoder")
    target = get_target(target)
    devs = compile_devices(target, topology(devices, hosts))
    mesh = sharding.make_mesh(cfgs["mesh"], mcfg, devices=devs)
    return target, mesh


def _header(cfgs, target: GpuTarget, mesh, hosts: int, step: str, config_name: str) -> dict:
    from flax import nnx

    from jaxformer.models import count_params, model_class

    mcfg = cfgs["model"]
    n = count_params(nnx.eval_shape(lambda: model_class(mcfg)(mcfg, rngs=nnx.Rngs(0))))
    return {"config": config_name, "step": step, "target": target.name, "device": target.device_kind,
            "arch": target.arch, "devices": int(mesh.devices.size), "hosts": hosts, "mesh": dict(mesh.shape),
            "params": n, "attention_impl": mcfg.attention_impl, "remat": mcfg.remat,
            "compute_dtype": mcfg.compute_dtype, "param_dtype": mcfg.param_dtype}


def _memory(c: StepCompile, target: GpuTarget, mem_fraction: float) -> dict:
    budget = int(target.memory_bytes * mem_fraction)
    return {**c.state, "arguments": c.arguments, "temporaries": c.temporaries, "outputs_not_aliased":
            c.outputs - c.aliased, "generated_code": c.generated_code, "peak": c.peak, "device": target.memory_bytes,
            "usable": budget, "mem_fraction": mem_fraction, "fits": c.peak <= budget, "headroom": budget - c.peak}


def _comm_seconds(c: StepCompile, target: GpuTarget) -> float:
    local = c.hlo.comm_bytes - c.hlo.cross_host_bytes
    return local / target.nvlink_bandwidth + c.hlo.cross_host_bytes / target.network_bandwidth


def attention_flops(cfg: ModelConfig, batch: int, seq: int, passes: float) -> float:
    """Score and value matmul FLOPs of every layer (causal, windows respected), times `passes` forwards."""
    total = 0.0
    for i in range(cfg.n_layers):
        w = cfg.layer_window(i) or seq
        pairs = sum(min(t + 1, w) for t in range(seq)) if w < seq else seq * (seq + 1) / 2
        total += 4.0 * batch * pairs * cfg.n_heads * cfg.head_dim
    return total * passes


def _roofline(c: StepCompile, target: GpuTarget, cfg: ModelConfig, n_devices: int, extra_flops: float,
              hbm_bytes: float) -> dict:
    executed = max(c.hlo.dot_flops, c.xla_flops or 0.0) + extra_flops  # per device
    compute = executed / target.peak_flops(cfg.compute_dtype)
    hbm = hbm_bytes / target.hbm_bandwidth
    comm = _comm_seconds(c, target)
    step = max(compute, hbm, comm)
    bound = {compute: "compute", hbm: "memory bandwidth", comm: "communication"}[step]
    return {"executed_flops_per_device": executed, "compute_s": compute, "hbm_s": hbm, "comm_s": comm,
            "comm_bytes_per_device": c.hlo.comm_bytes, "cross_host_bytes_per_device": c.hlo.cross_host_bytes,
            "collectives": c.hlo.collective_bytes, "step_s": step, "bound": bound}


# ----------------------------------------------------------------------------------------------------------
# Training.

def plan_train(cfgs: dict[str, Any], target: str | GpuTarget, devices: int, *, hosts: int = 1,
               mem_fraction: float = DEFAULT_MEM_FRACTION, search: bool = True, config_name: str = "",
               log: Callable[[str], None] = _say) -> dict:
    """Compile the train step for `devices` GPUs of `target` and report memory, FLOPs, roofline and fixes."""
    if not 0 < mem_fraction <= 1:
        raise ValueError(f"mem_fraction must be in (0, 1], got {mem_fraction}")
    target, mesh = _setup(cfgs, target, devices, hosts)
    mcfg, dcfg, tcfg = cfgs["model"], cfgs["data"], cfgs["train"]
    if dcfg.seq_len > mcfg.max_seq_len:
        raise ValueError(f"data.seq_len={dcfg.seq_len} exceeds model.max_seq_len={mcfg.max_seq_len}")
    dp = sharding.batch_rows(mesh)
    unit = dp * tcfg.grad_accum  # batch rows that give each device one row per micro-batch
    if tcfg.batch_size % unit:
        raise ValueError(f"train.batch_size={tcfg.batch_size} must be a multiple of data x fsdp x expert x grad_accum = "
                         f"{unit}, so that every device gets whole rows; e.g. --train.batch_size={unit}")
    out = _header(cfgs, target, mesh, hosts, "train", config_name)
    out.update(batch_size=tcfg.batch_size, seq_len=dcfg.seq_len, grad_accum=tcfg.grad_accum,
               rows_per_device=tcfg.batch_size // dp)

    def compile_at(c: dict[str, Any]) -> StepCompile:
        t, m = c["train"], c["mesh"]
        step_mesh = mesh if m == cfgs["mesh"] else sharding.make_mesh(m, c["model"], devices=list(mesh.devices.flat))
        log(f"compiling the train step: batch {t.batch_size} x {c['data'].seq_len}, remat {c['model'].remat}, mesh "
            + " ".join(f"{k}={v}" for k, v in step_mesh.shape.items()) + " ...")
        result = compile_train(c, step_mesh, target, hosts)
        log(f"  compiled in {result.seconds:.0f} s: peak {result.peak / GiB:.2f} GiB per device")
        return result

    first = compile_at(cfgs)
    out["compile_seconds"] = first.seconds
    out["memory"] = _memory(first, target, mem_fraction)
    tokens = tcfg.batch_size * dcfg.seq_len
    n_dev = out["devices"]
    passes = 3.5 + (1.0 if mcfg.remat != "none" else 0.0)  # forward, backward (2.5x), a remat recompute
    opaque = attention_flops(mcfg, tcfg.batch_size, dcfg.seq_len, passes) / n_dev \
        if mcfg.attention_impl == "pallas" else 0.0  # Pallas kernels are custom calls: no HLO analysis sees them
    out["flops"] = {"xla_cost_analysis_per_device": first.xla_flops, "hlo_matmuls_per_device": first.hlo.dot_flops,
                    "pallas_attention_per_device": opaque, "six_n_tokens": 6.0 * out["params"] * tokens,
                    "model_flops": train_flops_per_token(mcfg, dcfg.seq_len) * tokens}
    hbm = max(first.xla_bytes_accessed or 0.0, float(first.arguments))
    roof = _roofline(first, target, mcfg, n_dev, opaque, hbm)
    roof["tokens_per_s"] = tokens / roof["step_s"]
    roof["mfu"] = out["flops"]["model_flops"] / (roof["step_s"] * n_dev * target.peak_flops(mcfg.compute_dtype))
    out["roofline"] = roof

    budget = out["memory"]["usable"]
    log(f"{'fits' if out['memory']['fits'] else 'does not fit'}: peak {first.peak / GiB:.2f} GiB per device of "
        f"{budget / GiB:.2f} GiB usable" + ("; now the largest batch that fits (up to 4 compiles; --no-search "
                                            "skips this)" if search else ""))
    if search:
        def peak_at(k: int) -> int:
            return compile_at(_with(cfgs, train={"batch_size": k * unit})).peak
        out["max_batch"] = _in_rows(largest_fit(peak_at, tcfg.batch_size // unit, first.peak, budget), unit)
    out["fixes"] = [] if out["memory"]["fits"] else _train_fixes(cfgs, out, compile_at, budget, unit, mesh)
    out["verdict"] = _verdict(out)
    return out


LOSS_CHUNK = 4096  # tokens per chunk the loss knob tries: [4096, V] float32 logits (2 GiB at a 128k vocabulary)


def _with(cfgs: dict[str, Any], **sections: dict) -> dict[str, Any]:
    return {name: dataclasses.replace(value, **sections[name]) if name in sections else value
            for name, value in cfgs.items()}


def _train_fixes(cfgs, out: dict, compile_at, budget: int, unit: int, mesh) -> list[dict]:
    """Knobs that would make the step fit, each checked by a compile (the chunked loss, remat, then fsdp), then
    the batch."""
    fixes, mcfg, n = [], cfgs["model"], out["devices"]
    if not cfgs["train"].loss_chunk:  # the [B, T, V] logits are often the largest temporaries; chunks cost no time
        peak = compile_at(_with(cfgs, train={"loss_chunk": LOSS_CHUNK})).peak
        fixes.append({"knob": f"--train.loss_chunk={LOSS_CHUNK}", "peak": peak, "fits": peak <= budget})
    if mcfg.remat != "full":
        peak = compile_at(_with(cfgs, model={"remat": "full"})).peak
        fixes.append({"knob": "--model.remat=full", "peak": peak, "fits": peak <= budget})
    kept = mesh.shape["tensor"] * mesh.shape["expert"] * mesh.shape["context"]  # axes the fsdp knob leaves alone
    fsdp = n // kept
    if mesh.shape["fsdp"] < fsdp and cfgs["train"].batch_size % (n // mesh.shape["tensor"] // mesh.shape["context"]
                                                                 * cfgs["train"].grad_accum) == 0:
        peak = compile_at(_with(cfgs, mesh={"data": 1, "fsdp": fsdp})).peak
        fixes.append({"knob": f"--mesh.data=1 --mesh.fsdp={fsdp}", "peak": peak, "fits": peak <= budget})
    best = out.get("max_batch", {}).get("largest_fitting")
    if best:
        B, dp = cfgs["train"].batch_size, unit // cfgs["train"].grad_accum
        accum = next((a for a in range(2, B // dp + 1) if B % (a * dp) == 0 and B // a <= best), None)
        fixes.append({"knob": f"--train.batch_size={best}", "fits": True})
        if accum:
            fixes.append({"knob": f"--train.grad_accum={accum}", "fits": True,
                          "note": f"keeps the batch of {B} in micro-batches of {B // accum}"})
    state = out["memory"]["params"] + out["memory"]["optimizer"]
    if state > budget:
        fixes.append({"knob": "more devices", "fits": False,
                      "note": f"parameters + optimizer state alone take {state / GiB:.1f} GiB per device"})
    return fixes


def largest_fit(peak_at: Callable[[int], int], k0: int, peak0: int, budget: int, max_compiles: int = 4) -> dict:
    """The largest k >= 1 with peak_at(k) <= budget: probes chosen by a least-squares line through the
    measured peaks (memory grows linearly with the batch), each probe one compile."""
    points = {k0: peak0}
    lo, hi = (k0, None) if peak0 <= budget else (0, k0)
    compiles = 0
    while compiles < max_compiles and not (hi is not None and hi == lo + 1):
        predicted = _predict(points, budget)
        if predicted is None:  # one point: double or halve
            probe = 2 * k0 if peak0 <= budget else max(1, k0 // 2)
        else:
            probe = predicted
        probe = max(lo + 1, probe if hi is None else min(probe, hi - 1))
        if probe in points or probe < 1:
            break
        points[probe] = peak_at(probe)
        compiles += 1
        if points[probe] <= budget:
            lo = max(lo, probe)
        else:
            hi = probe if hi is None else min(hi, probe)
    return {"largest_fitting": lo or None, "smallest_not_fitting": hi, "predicted": _predict(points, budget),
            "compiles": compiles, "peaks": {str(k): v for k, v in sorted(points.items())}}


def _in_rows(found: dict, unit: int) -> dict:
    """largest_fit's answer in batch rows (k units of `unit` rows)."""
    rows = lambda k: None if k is None else k * unit  # noqa: E731
    return {"largest_fitting": rows(found["largest_fitting"]), "smallest_not_fitting": rows(found["smallest_not_fitting"]),
            "predicted": rows(found["predicted"]), "compiles": found["compiles"], "unit": unit,
            "peaks": {str(int(k) * unit): v for k, v in found["peaks"].items()}}


def _predict(points: dict[int, int], budget: int) -> int | None:
    if len(points) < 2:
        return None
    ks, ps = list(points), list(points.values())
    mk, mp = sum(ks) / len(ks), sum(ps) / len(ps)
    slope = sum((k - mk) * (p - mp) for k, p in zip(ks, ps)) / max(sum((k - mk) ** 2 for k in ks), 1e-9)
    if slope <= 0:
        return None
    return int(math.floor((budget - (mp - slope * mk)) / slope))


# ----------------------------------------------------------------------------------------------------------
# Decoding.

def plan_decode(cfgs: dict[str, Any], target: str | GpuTarget, devices: int, *, batch: int, context: int | None = None,
                hosts: int = 1, mem_fraction: float = DEFAULT_MEM_FRACTION, search: bool = True,
                config_name: str = "", log: Callable[[str], None] = _say) -> dict:
    """Compile the engine's decode step for `batch` sequences of `context` tokens and report memory and speed."""
    target, mesh = _setup(cfgs, target, devices, hosts)
    mcfg = cfgs["model"]
    context = context or mcfg.max_seq_len
    if not 2 <= context <= mcfg.max_seq_len:
        raise ValueError(f"context must be in [2, model.max_seq_len={mcfg.max_seq_len}], got {context}")
    dp = sharding.batch_rows(mesh)
    if batch < 1 or batch % dp:
        raise ValueError(f"batch={batch} must be a positive multiple of data x fsdp x expert = {dp} "
                         "(rows split over devices)")
    out = _header(cfgs, target, mesh, hosts, "decode", config_name)
    out.update(batch=batch, context=context)

    def compile_at(b: int) -> StepCompile:
        log(f"compiling the decode step: {b} sequences x {context} tokens ...")
        result = compile_decode(mcfg, mesh, target, b, context, hosts)
        log(f"  compiled in {result.seconds:.0f} s: peak {result.peak / GiB:.2f} GiB per device")
        return result

    first = compile_at(batch)
    out["compile_seconds"] = first.seconds
    out["memory"] = _memory(first, target, mem_fraction)
    n_dev = out["devices"]
    opaque = attention_flops(mcfg, batch, 1, 1.0) * context / n_dev if mcfg.attention_impl == "pallas" else 0.0
    read = first.state["params"] + first.state["kv_cache"]  # every step reads the weights and the whole cache
    roof = _roofline(first, target, mcfg, n_dev, opaque, max(first.xla_bytes_accessed or 0.0, float(read)))
    roof["tokens_per_s"] = batch / roof["step_s"]
    out["flops"] = {"xla_cost_analysis_per_device": first.xla_flops, "hlo_matmuls_per_device": first.hlo.dot_flops,
                    "pallas_attention_per_device": opaque, "two_n_tokens": 2.0 * out["params"] * batch}
    out["roofline"] = roof
    if search:
        found = largest_fit(lambda k: compile_at(k * dp).peak, batch // dp, first.peak, out["memory"]["usable"])
        out["max_batch"] = _in_rows(found, dp)
    out["fixes"] = [] if out["memory"]["fits"] else _decode_fixes(out)
    out["verdict"] = _verdict(out)
    return out


def _decode_fixes(out: dict) -> list[dict]:
    fixes = []
    best = out.get("max_batch", {}).get("largest_fitting")
    if best:
        fixes.append({"knob": f"--batch {best}", "fits": True})
    if out["memory"]["params"] > out["memory"]["usable"]:
        fixes.append({"knob": "more devices (--mesh.tensor or --mesh.fsdp)", "fits": False,
                      "note": f"the weights alone take {out['memory']['params'] / GiB:.1f} GiB per device"})
    return fixes


# ----------------------------------------------------------------------------------------------------------
# The verdict and the text report.

def _verdict(out: dict) -> str:
    m = out["memory"]
    where = (f"{m['usable'] / GiB:.1f} GiB usable per {out['target'].upper()} "
             f"({m['mem_fraction']:.0%} of {m['device'] / GiB:.1f} GiB)")
    if m["fits"]:
        return f"fits: peak {m['peak'] / GiB:.1f} GiB of {where}, {m['headroom'] / GiB:.1f} GiB to spare"
    good = [f["knob"] for f in out["fixes"] if f["fits"]]
    hint = f"; it fits with {' or '.join(good)}" if good else "; no single knob tried makes it fit"
    return f"does not fit: peak {m['peak'] / GiB:.1f} GiB per device, {where}{hint}"


def format_report(out: dict) -> str:
    """The plan as text for a terminal."""
    m, f, r = out["memory"], out["flops"], out["roofline"]
    g = lambda b: f"{b / GiB:8.2f}"  # noqa: E731
    tf = lambda x: "n/a" if x is None else f"{x / 1e12:,.1f} TFLOP"  # noqa: E731
    mesh = " ".join(f"{k}={v}" for k, v in out["mesh"].items())
    lines = [f"jaxformer plan: {out['config'] or 'config'}, {out['step']} step on {out['devices']} x "
             f"{out['device']} ({out['target']}, {out['arch']}), {out['hosts']} host(s), mesh {mesh}"]
    if out["step"] == "train":
        lines.append(f"  batch {out['batch_size']} x {out['seq_len']} tokens ({out['rows_per_device']} rows per "
                     f"device, grad_accum {out['grad_accum']}), remat {out['remat']}, attention {out['attention_impl']}, "
                     f"compute {out['compute_dtype']}, params {out['param_dtype']}, {out['params'] / 1e9:.2f}B "
                     f"parameters; compiled in {out['compile_seconds']:.0f} s")
        parts = [("parameters", m["params"]), ("optimizer state", m["optimizer"]), ("batch", m["batch"])]
    else:
        lines.append(f"  {out['batch']} sequences x {out['context']} tokens of context, attention "
                     f"{out['attention_impl']}, compute {out['compute_dtype']}, {out['params'] / 1e9:.2f}B parameters; "
                     f"compiled in {out['compile_seconds']:.0f} s")
        parts = [("weights", m["params"]), ("KV cache", m["kv_cache"]), ("slots (history, sampling)", m["slots"])]
    lines += ["", "memory per device (GiB)"]
    lines += [f"  {name:<34}{g(v)}" for name, v in parts]
    lines += [f"  {'temporaries (activations, grads)':<34}{g(m['temporaries'])}",
              f"  {'outputs not aliased to inputs':<34}{g(m['outputs_not_aliased'])}",
              f"  {'peak':<34}{g(m['peak'])}   of {m['usable'] / GiB:.2f} usable ({m['mem_fraction']:.0%} of "
              f"{m['device'] / GiB:.2f})", "", "FLOPs per step"]
    n = out["devices"]
    lines.append(f"  {'XLA cost analysis':<34}{tf(f['xla_cost_analysis_per_device'])} per device")
    lines.append(f"  {'matmuls in the optimized HLO':<34}{tf(f['hlo_matmuls_per_device'])} per device")
    if f["pallas_attention_per_device"]:
        lines.append(f"  {'Pallas attention (modelled)':<34}{tf(f['pallas_attention_per_device'])} per device")
    if out["step"] == "train":
        lines.append(f"  {'6·N·tokens':<34}{tf(f['six_n_tokens'])} per step ({tf(f['six_n_tokens'] / n)} per device)")
        lines.append(f"  {'model (6N + attention) / token':<34}{tf(f['model_flops'])} per step")
    coll = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in sorted(r["collectives"].items())) or "none"
    lines += ["", "roofline (compute, HBM and collectives perfectly overlapped: a lower bound on the step)",
              f"  {'compute':<34}{r['compute_s'] * 1e3:10.1f} ms",
              f"  {'HBM traffic':<34}{r['hbm_s'] * 1e3:10.1f} ms",
              f"  {'collectives':<34}{r['comm_s'] * 1e3:10.1f} ms   ({r['comm_bytes_per_device'] / 1e9:.2f} GB per "
              f"device: {coll})",
              f"  {'step':<34}{r['step_s'] * 1e3:10.1f} ms   ({r['bound']}-bound): "
              f"{r['tokens_per_s']:,.0f} tokens/s" + (f", MFU {r['mfu']:.0%}" if "mfu" in r else "")]
    if out.get("max_batch"):
        mb = out["max_batch"]
        what = "batch_size" if out["step"] == "train" else "batch"
        lines += ["", f"largest {what} that fits: {mb['largest_fitting'] or 'none'}"
                  + (f" ({mb['smallest_not_fitting']} does not)" if mb["smallest_not_fitting"] else "")
                  + f", by {mb['compiles']} more compiles; a line through the measured peaks predicts "
                  f"{mb['predicted']}"]
    for fix in out["fixes"]:
        peak = f" peak {fix['peak'] / GiB:.1f} GiB," if "peak" in fix else ""
        lines.append(f"  try {fix['knob']}:{peak} {'fits' if fix['fits'] else 'does not fit'}"
                     + (f" ({fix['note']})" if fix.get("note") else ""))
    lines += ["", f"verdict: {out['verdict']}"]
    return "\n".join(lines)

