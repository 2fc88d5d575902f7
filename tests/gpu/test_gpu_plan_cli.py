"""`jaxformer plan` end to end on a small model: it compiles for A100s / H100s that are not here.

The numbers are checked against what they must be: parameter and optimizer bytes per device from the
parameter count and the mesh, FLOPs from the model's matmuls, the largest batch bracketed by compiles,
and a verdict that follows the memory budget. Needs the gpu-compile extra.
"""

from __future__ import annotations

import json

import pytest

from jaxformer.cli import main
from jaxformer.config import load_config
from jaxformer.plan import plan_decode, plan_train
from jaxformer.plan.report import DEFAULT_MEM_FRACTION

TINY = ["--model.n_layers=2", "--model.vocab_size=512", "--data.seq_len=128", "--train.batch_size=8"]


def run(capsys, *args):
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_train_on_two_a100s_with_fsdp(capsys, tmp_path):
    code, out, err = run(capsys, "plan", "--config", "llama-tiny", "--target", "a100", "--devices", 2,
                         "--mesh.fsdp=2", *TINY, "--json", tmp_path / "plan.json")
    assert code == 0, err
    report = json.loads((tmp_path / "plan.json").read_text())
    n = report["params"]
    assert report["mesh"] == {"data": 1, "fsdp": 2, "expert": 1, "context": 1, "tensor": 1} and report["arch"] == "sm_80"
    m = report["memory"]
    assert abs(m["params"] - n * 4 / 2) <= 0.01 * n * 4  # float32, half of every matrix per device
    assert abs(m["optimizer"] - 2 * m["params"]) <= 0.01 * m["params"]  # AdamW: mu and nu
    assert m["fits"] and m["peak"] == m["arguments"] + m["temporaries"] + m["outputs_not_aliased"] + \
        m["generated_code"]
    six_n_t = 6 * n * 8 * 128
    assert report["flops"]["six_n_tokens"] == six_n_t
    per_device = report["flops"]["hlo_matmuls_per_device"]
    assert 0.3 * six_n_t / 2 < per_device < 1.5 * six_n_t / 2  # the matmuls (tied embedding lookups are gathers)
    assert report["roofline"]["collectives"]["all-gather"] > 0  # FSDP gathers the weights
    mb = report["max_batch"]
    assert mb["largest_fitting"] >= 8 and mb["compiles"] <= 4
    assert "verdict: fits" in out and "memory per device" in out and "roofline" in out


def test_a_step_that_does_not_fit_gets_the_knob_that_fits():
    cfgs = load_config("llama-tiny", TINY)
    report = plan_train(cfgs, "h100", 1, mem_fraction=1e-4, search=False, log=lambda m: None)
    assert not report["memory"]["fits"]
    knobs = {f["knob"]: f for f in report["fixes"]}
    assert "--model.remat=full" in knobs  # tried by a compile: the peak it reports is measured
    assert knobs["--model.remat=full"]["peak"] > report["memory"]["usable"]  # 8 KiB fits nothing
    assert report["verdict"].startswith("does not fit")


def test_the_chunked_loss_knob_fits_a_step_its_logits_overflow():
    """A 32k vocabulary over 8 x 1,024 tokens: 1 GiB of float32 logits. With the budget between the whole-logits
    and the chunked step's peaks (each compiled first), the report names --train.loss_chunk as the knob that fits,
    with the chunked step's peak."""
    args = ["--model.n_layers=2", "--model.vocab_size=32768", "--model.max_seq_len=1024", "--data.seq_len=1024",
            "--train.batch_size=8"]
    quiet = dict(search=False, log=lambda m: None)
    whole = plan_train(load_config("llama-tiny", args), "h100", 1, **quiet)["memory"]
    chunked = plan_train(load_config("llama-tiny", [*args, "--train.loss_chunk=4096"]), "h100", 1, **quiet)["memory"]
    assert chunked["peak"] < 0.7 * whole["peak"], (chunked, whole)
    fraction = (whole["peak"] + chunked["peak"]) / 2 / (whole["usable"] / DEFAULT_MEM_FRACTION)  # of the whole GPU
    report = plan_train(load_config("llama-tiny", args), "h100", 1, mem_fraction=fraction, **quiet)
    assert not report["memory"]["fits"]
    knob = {f["knob"]: f for f in report["fixes"]}["--train.loss_chunk=4096"]
    assert knob["fits"] and knob["peak"] == chunked["peak"]
    assert "--train.loss_chunk=4096" in report["verdict"]


def test_plan_decode_reports_the_kv_cache():
    cfgs = load_config("llama-tiny", ["--model.n_layers=2", "--model.vocab_size=512"])
    report = plan_decode(cfgs, "h100", 2, batch=4, context=256, search=False, log=lambda m: None)
    m = cfgs["model"]
    cache = 2 * m.n_layers * 4 * 256 * m.n_kv_heads * m.head_dim * 4  # k and v, float32, whole batch
    assert report["memory"]["kv_cache"] == cache // 2  # the batch is split over the two devices
    assert report["roofline"]["tokens_per_s"] > 0 and report["memory"]["fits"]


@pytest.mark.parametrize("args,needle", [
    (["--target", "b200", "--devices", "1"], "unknown GPU target 'b200'"),
    (["--target", "h100", "--devices", "6", "--hosts", "4"], "--devices 6 must be a positive multiple of --hosts 4"),
    (["--target", "h100", "--devices", "2", "--train.batch_size=3"], "must be a multiple of data x fsdp"),
])
def test_plan_user_errors(capsys, args, needle):
    code, _, err = run(capsys, "plan", "--config", "llama-tiny", *args)
    assert code == 2 and err.startswith("error: ") and needle in err, err


def test_fsdp_across_two_hosts_goes_over_the_network():
    cfgs = load_config("llama-tiny", [*TINY, "--mesh.fsdp=4"])
    report = plan_train(cfgs, "h100", 4, hosts=2, search=False, log=lambda m: None)
    roof = report["roofline"]
    assert roof["comm_bytes_per_device"] > 0
    assert roof["cross_host_bytes_per_device"] == roof["comm_bytes_per_device"]  # every fsdp group spans both hosts
    t = report["target"]
    assert t == "h100" and roof["comm_s"] >= roof["comm_bytes_per_device"] / 50e9  # at the network's 50 GB/s
