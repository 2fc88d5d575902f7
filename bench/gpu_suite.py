"""Everything worth measuring with one NVIDIA GPU for 15 minutes, in one call of under 8 minutes.

  python bench/gpu_suite.py --out gpu_suite.json   # on the GPU
  python bench/gpu_suite.py --tiny                 # anywhere: tiny shapes, Pallas in interpret mode (CI runs it)

Sections, each timed; one that fails is reported and the others still run:
  device     the GPU, the jaxformer target it matches (pallas_kernels.targets) and the kernels' default tiles there
  kernels    compiled flash attention (out, dq, dk, dv) and flash-decoding against the float32 references:
             bf16 / fp16 / fp32, head dims 64, 96, 128, 256, causal or not, GQA, segment ids, window, soft-cap
  attention  flash forward and forward+backward TFLOP/s against jax's Pallas mha, cuDNN and XLA at head dims
             64 and 128, lengths 1k..16k (bench/attention_gpu.py, which checks each implementation first)
  train      the gpt2-124m train step with bf16 compute (attention pallas and xla): tokens/s, MFU against the
             GPU's bf16 peak, and XLA's memory analysis next to the device's measured peak bytes
  decode     the inference engine's decode tokens/s at batch 1 and 64 (gpt2-124m, random weights)
The JSON written to --out is also printed as the last line.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from pallas_kernels.common import INTERPRET_ENV  # noqa: E402
from pallas_kernels.decode_attention import decode_attention, decode_attention_reference  # noqa: E402
from pallas_kernels.flash_attention import flash_attention, flash_attention_reference  # noqa: E402

TOLERANCE = {"bfloat16": 2e-2, "float16": 1e-2, "float32": 1e-4}  # ||out - ref|| / ||ref|| against fp32 math


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def timed(fn, *args, warmup: int, iters: int) -> float:
    """Median seconds of fn(*args) after `warmup` calls (the first compiles)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


# ----------------------------------------------------------------------------------------------------------

def section_device(args) -> dict:
    from pallas_kernels.decode_attention import BlockSizes as DecodeBlocks
    from pallas_kernels.flash_attention import BlockSizes
    from pallas_kernels.targets import target_for_device

    device = jax.devices()[0]
    target = target_for_device(device)
    tiles = {f"{jnp.dtype(d).name}/H{h}": {"flash": vars(BlockSizes.default(h, d)),
                                          "decode": vars(DecodeBlocks.default(h, d))}
             for d in (jnp.bfloat16, jnp.float32) for h in (64, 128, 256)}
    return {"device_kind": device.device_kind, "platform": device.platform, "jax": jax.__version__,
            "target": target.name if target else None, "default_tiles": tiles}


def kernel_cases(tiny: bool) -> list[dict]:
    """(dtype, head dim, mask options) cases; tiny: a few float32 ones at H 32."""
    if tiny:  # one case with every option on
        return [dict(dtype="float32", H=24, causal=True, segments=True, group=2, window=20, softcap=20.0)]
    cases = []
    for dtype in ("bfloat16", "float16", "float32"):
        for i, H in enumerate((64, 96, 128, 256)):
            cases.append(dict(dtype=dtype, H=H, causal=i != 1, segments=i % 2 == 0, group=(1, 2, 4, 8)[i],
                              window=(None, None, 512, 256)[i], softcap=(None, 50.0, None, 30.0)[i]))
    return cases


def section_kernels(args) -> dict:
    """Every case: flash fwd+bwd and decode against the references, on random inputs."""
    out = {}
    T, S, B = (40, 40, 2) if args.tiny else (1000, 3000, 2)
    for n, case in enumerate(kernel_cases(args.tiny)):
        dtype, H, G, K = jnp.dtype(case["dtype"]), case["H"], case["group"], 2
        ks = jax.random.split(jax.random.key(n), 8)
        q = jax.random.normal(ks[0], (B, T, K * G, H), dtype)
        k, v = (jax.random.normal(kk, (B, T, K, H), dtype) for kk in ks[1:3])
        do = jax.random.normal(ks[3], (B, T, K * G, H), dtype)
        seg = jnp.repeat(jnp.arange(3)[None], B, 0).repeat(-(-T // 3), axis=1)[:, :T] if case["segments"] else None
        opts = dict(causal=case["causal"], window=case["window"], softcap=case["softcap"],
                    segment_ids=None if seg is None else (seg, seg))

        def fwd_bwd(attn):
            def run(q, k, v):
                o, vjp = jax.vjp(attn, q, k, v)
                return (o, *vjp(do.astype(o.dtype)))
            return jax.jit(run)

        got = fwd_bwd(functools.partial(flash_attention, interpret=args.interpret, **opts))(q, k, v)
        up = [x.astype(jnp.float32) for x in (q, k, v)]
        ref = fwd_bwd(functools.partial(flash_attention_reference, **opts))(*up)
        errs = {name: rel_err(g, r) for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref)}
        new = 1 + n % 3  # decode: a few new tokens per sequence against a ragged cache
        qd = jax.random.normal(ks[4], (B, new, K * G, H), dtype)
        kc, vc = (jax.random.normal(kk, (B, S, K, H), dtype) for kk in ks[5:7])
        lengths = jnp.asarray([S, S // 3 + 1], jnp.int32)
        dec = dict(window=case["window"], softcap=case["softcap"])
        got_d = jax.jit(functools.partial(decode_attention, interpret=args.interpret, **dec))(qd, kc, vc, lengths)
        errs["decode"] = rel_err(got_d, decode_attention_reference(qd.astype(jnp.float32), kc.astype(jnp.float32),
                                                                    vc.astype(jnp.float32), lengths, **dec))
        key = "{dtype}/H{H}/{m}/G{group}".format(m="causal" if case["causal"] else "full", **case) + \
            "".join(f"/{o}" for o in ("segments", "window", "softcap") if case[o])
        out[key] = {"ok": max(errs.values()) <= TOLERANCE[case["dtype"]], **{e: round(v, 7) for e, v in errs.items()}}
        print(f"kernels {key:48s} {out[key]}", flush=True)
    return {"all_ok": all(v["ok"] for v in out.values()), "cases": out}


def section_attention(args) -> dict:
    """bench/attention_gpu.py's check and sweep (ours vs jax's Pallas mha, cuDNN, XLA)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import attention_gpu

    if not args.tiny:
        result = attention_gpu.main(["--seqs", "1024", "2048", "4096", "8192", "16384", "--head-dims", "64", "128",
                                     "--warmup", "2", "--iters", "10"])
        return {"correctness": result["correctness"], "ratios": result["ratios"], "rows": result["results"]}
    a = attention_gpu.parse_args(["--cpu-smoke", "--impls", "ours", "xla"])  # its smoke settings, smaller still
    a.seqs, a.head_dims, a.tokens, a.model_width, a.check_shape, a.iters = [32], [16], 32, 32, [1, 32, 2, 2], 1
    correctness = attention_gpu.check_correctness(a, jnp.float32)
    rows = attention_gpu.sweep(a, jnp.float32)
    return {"correctness": correctness, "ratios": attention_gpu.ratios(rows, correctness), "rows": rows}


def _model_config(args, attention_impl: str):
    from jaxformer.config import ModelConfig, load_model_config

    if args.tiny:
        return ModelConfig.llama(vocab_size=128, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64,
                                 max_seq_len=64, attention_impl=attention_impl)
    return load_model_config("gpt2-124m", {"model.attention_impl": attention_impl,
                                           "model.compute_dtype": "bfloat16"})


def section_train(args) -> dict:
    """gpt2-124m train steps (bf16 compute): tokens/s and MFU per attention implementation."""
    from jaxformer.config import MeshConfig, TrainConfig
    from jaxformer.sharding import make_mesh
    from jaxformer.train.flops import peak_tflops, train_flops_per_token
    from jaxformer.train.optim import make_optimizer
    from jaxformer.train.state import init_train_state
    from jaxformer.train.step import lm_loss, make_train_step

    B, T = (2, 32) if args.tiny else (16, 1024)
    peak = peak_tflops(None) * 1e12
    out = {"batch": B, "seq_len": T, "peak_flops": peak}
    for impl in ("pallas", "xla"):
        cfg = _model_config(args, impl)
        mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), cfg, devices=jax.devices()[:1])
        tx = make_optimizer(TrainConfig(warmup_steps=10, steps=1000))
        with jax.set_mesh(mesh):
            graphdef, state, shardings = init_train_state(cfg, tx, mesh, seed=0)
            step = jax.jit(make_train_step(lm_loss(graphdef, packed=False), tx),
                           out_shardings=(shardings["params"], shardings["opt_state"], None))
            tokens = jax.random.randint(jax.random.key(1), (B, T + 1), 0, cfg.vocab_size, jnp.int32)
            batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": jnp.ones((B, T), jnp.float32),
                     "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)),
                     "segment_ids": jnp.ones((B, T), jnp.int32)}
            params, opt = state["params"], state["opt_state"]
            compiled = step.lower(params, opt, batch).compile()
            mem = compiled.memory_analysis()
            seconds = timed(lambda p, o: step(p, o, batch)[2]["loss"], params, opt, warmup=1 if args.tiny else 2,
                            iters=1 if args.tiny else 10)
        flops = train_flops_per_token(cfg, T) * B * T
        stats = jax.devices()[0].memory_stats() or {}
        out[impl] = {"step_s": seconds, "tokens_per_s": B * T / seconds, "mfu": flops / seconds / peak,
                     "xla_temp_bytes": mem.temp_size_in_bytes, "xla_argument_bytes": mem.argument_size_in_bytes,
                     "device_peak_bytes": stats.get("peak_bytes_in_use")}
        print(f"train {impl}: {out[impl]}", flush=True)
    return out


def section_decode(args) -> dict:
    """Decode tokens/s of the KV-cache engine at batch 1 and 64 (pallas and xla attention)."""
    from flax import nnx

    from jaxformer.infer import Engine, SamplingParams
    from jaxformer.models import model_class

    batches, steps, prompt = ((2,), 2, 8) if args.tiny else ((1, 64), 64, 32)
    out = {"prompt_tokens": prompt, "decode_steps": steps}
    for impl in ("pallas", "xla"):
        cfg = _model_config(args, impl)
        model = model_class(cfg)(cfg, rngs=nnx.Rngs(0))
        for b in batches:
            engine = Engine(model, max_batch=b, max_len=min(cfg.max_seq_len, prompt + steps + 8))
            rng = np.random.default_rng(b)
            for slot in range(b):
                engine.prefill(slot, rng.integers(0, cfg.vocab_size, prompt).tolist(), SamplingParams(temperature=0.0))
            active = np.ones(b, bool)
            engine.decode(active)  # compile
            start = time.perf_counter()
            for _ in range(steps):
                engine.decode(active)
            seconds = time.perf_counter() - start
            out[f"{impl}/batch{b}"] = {"tokens_per_s": b * steps / seconds, "ms_per_step": 1e3 * seconds / steps}
            print(f"decode {impl} batch {b}: {out[f'{impl}/batch{b}']}", flush=True)
    return out


SECTIONS = {"device": section_device, "kernels": section_kernels, "attention": section_attention,
            "train": section_train, "decode": section_decode}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="gpu_suite.json", help="the JSON file to write")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, Pallas interpret mode: runs on a CPU (CI)")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    args = p.parse_args(argv)
    args.interpret = args.tiny
    if args.tiny:  # models built with attention_impl="pallas" interpret their kernels too (read at trace time)
        os.environ[INTERPRET_ENV] = "1"
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if jax.default_backend() != "gpu" and not args.tiny:
        print("no GPU here: run on an NVIDIA GPU, or pass --tiny to prove the script on CPU", file=sys.stderr)
        raise SystemExit(2)
    start = time.perf_counter()
    result = {"tiny": args.tiny, "sections": {}}
    for name in args.sections:
        t = time.perf_counter()
        try:
            result["sections"][name] = SECTIONS[name](args)
        except Exception as e:  # report it and run the other sections
            traceback.print_exc()
            result["sections"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        result["sections"][name]["seconds"] = round(time.perf_counter() - t, 1)
        print(f"[{name}: {result['sections'][name]['seconds']} s]", flush=True)
    result["seconds"] = round(time.perf_counter() - start, 1)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
