"""bench/attention_gpu.py stays runnable without a GPU: argument parsing, --dry-run, the ratio table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "attention_gpu.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("attention_gpu_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_prints_the_plan_as_a_json_last_line(capsys):
    bench = load_bench()
    bench.main(["--dry-run", "--seqs", "512", "1024", "--head-dims", "64"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["plan"]["seqs"] == [512, 1024]


def test_cpu_smoke_uses_interpret_mode_and_tiny_shapes():
    args = load_bench().parse_args(["--cpu-smoke"])
    assert args.interpret and args.seqs == [128] and args.iters <= 2


def test_ratios_compare_ours_with_every_baseline_that_ran():
    bench = load_bench()
    shape = dict(head_dim=64, causal=True, seq=512, mode="fwd")
    rows = [dict(impl="ours", ms=1.0, **shape), dict(impl="xla", ms=3.0, **shape),
            dict(impl="cudnn", error="RuntimeError: cuDNN is not detected.", **shape)]
    assert bench.ratios(rows) == [dict(**shape, vs_xla=3.0)]
    assert bench.forward_flops(1, 1024, 16, 128, causal=True) == 2 * 1024 * 1024 * 16 * 128


def test_no_ratio_for_an_implementation_that_failed_its_check():
    bench = load_bench()
    shape = dict(head_dim=64, causal=True, seq=512, mode="fwd")
    rows = [dict(impl="ours", ms=1.0, **shape), dict(impl="xla", ms=3.0, **shape), dict(impl="jax_pallas_mha", ms=2.0,
                                                                                         **shape)]
    checks = {"ours/H64/causal": {"ok": True}, "xla/H64/causal": {"ok": True},
              "jax_pallas_mha/H64/causal": {"ok": False, "out": 0.5}}
    assert bench.ratios(rows, checks) == [dict(**shape, vs_xla=3.0)]  # the failing baseline is left out
    checks["ours/H64/causal"] = {"ok": False, "out": 0.3}
    assert bench.ratios(rows, checks) == []  # ours failed: no speed claim at all for this configuration
    assert bench.ratios(rows, {"error": "correctness check crashed"}) == []
