"""The real train steps compile for H100s without one: GPT-2 small with the Pallas kernels on one GPU, and
Llama-3-8B with FSDP over eight (the steps `jaxformer train` runs, through jaxformer.plan.steps).

Each is one compile of the whole XLA:GPU pipeline for sm_90 (about 40 and 80 CPU seconds; Llama scans its
blocks, so one block is compiled, as `--model.scan_layers=true` runs it); the checks
are the bytes and FLOPs these shapes must give, worked out from the parameter count and the mesh.
Needs the gpu-compile extra.
"""

from __future__ import annotations

from jaxformer.config import load_config
from jaxformer.plan import plan_train

GiB = 2**30


def test_gpt2_124m_pallas_bf16_step_compiles_for_one_h100():
    cfgs = load_config("gpt2-124m", ["--model.attention_impl=pallas", "--model.compute_dtype=bfloat16",
                                     "--train.batch_size=8", "--data.seq_len=1024"])
    report = plan_train(cfgs, "h100", 1, search=False, log=print)
    n, m = report["params"], report["memory"]
    assert 124e6 < n < 125e6
    assert m["params"] == n * 4 and 0 <= m["optimizer"] - 2 * n * 4 <= 64  # float32 weights; AdamW mu, nu, counts
    assert m["fits"] and m["peak"] < 20 * GiB
    tokens = 8 * 1024
    assert 0.9 < report["flops"]["hlo_matmuls_per_device"] / (6 * n * tokens) < 1.1  # attention runs in Pallas
    assert report["flops"]["pallas_attention_per_device"] > 0
    print(report["verdict"], f"compiled in {report['compile_seconds']:.0f} s")


def test_llama3_8b_fsdp8_step_compiles_for_eight_h100s():
    cfgs = load_config("llama3-8b", ["--mesh.fsdp=8", "--model.remat=full", "--model.scan_layers=true",
                                     "--train.batch_size=8", "--data.seq_len=4096"])  # scan: one block compiled
    report = plan_train(cfgs, "h100", 8, search=False, log=print)
    n, m = report["params"], report["memory"]
    assert 8.0e9 < n < 8.1e9
    shard = n * 2 / 8  # bfloat16 weights split eight ways (every matrix has an 'embed' dim for fsdp)
    assert abs(m["params"] - shard) < 0.001 * shard and abs(m["optimizer"] - 2 * shard) < 0.002 * shard
    assert abs(m["arguments"] - (m["params"] + m["optimizer"] + m["batch"])) < 0.001 * m["arguments"]
    assert 5.5 * GiB < m["arguments"] < 5.7 * GiB and m["fits"]
    collectives = report["roofline"]["collectives"]
    assert collectives["all-gather"] > 7 / 8 * 2 * n and collectives["reduce-scatter"] > 0.8 * 7 / 8 * 2 * n
    assert report["roofline"]["cross_host_bytes_per_device"] == 0  # one host: NVLink only
    six_n_t = 6 * n * 8 * 4096 / 8
    assert 1.2 < report["flops"]["hlo_matmuls_per_device"] / six_n_t < 1.45  # remat: one more forward (8N/6N)
    print(report["verdict"], f"compiled in {report['compile_seconds']:.0f} s")
