"""Context parallelism: ring attention on 8 fake CPU devices equals one device (tests/ring_worker.py computes it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jax.sharding import PartitionSpec as P

from jaxformer import sharding
from jaxformer.models.ring_attention import load_balanced_order
from tests.conftest import run_on_eight_devices

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ring") / "report.json"
    run_on_eight_devices(str(ROOT / "tests" / "ring_worker.py"), str(out), unset=("JAXFORMER_PALLAS_INTERPRET",))
    return json.loads(out.read_text())


@pytest.mark.parametrize("mesh", ["context8", "context2_fsdp2_tensor2"])
def test_ring_equals_one_device(report, mesh):
    """Loss and every gradient (GQA, a sliding-window layer, packed documents) match one device to 1e-5."""
    got = report["models"][mesh]
    assert report["devices"] == 8
    assert abs(got["loss"] - got["loss_one"]) <= 1e-5 * abs(got["loss_one"])
    assert "layers.0.self_attn.k_proj.weight" in got["params"] and len(got["grad_rel"]) == len(got["params"])
    worst = max(got["grad_rel"], key=got["grad_rel"].get)
    assert got["grad_rel"][worst] <= 1e-5, (worst, got["grad_rel"][worst])


def test_pallas_blocks_equal_xla_blocks(report):
    """The ring with Pallas flash blocks (interpret mode) gives the xla blocks' output and gradients, elementwise."""
    assert report["pallas"]["out_rel"] <= 1e-5
    assert max(report["pallas"]["grad_rel"]) <= 1e-5


def test_window_skips_ring_steps(report):
    """A 6-token window over chunks of 8 needs ring steps 0, 1 and 7 only: far fewer K/V transfers."""
    assert 0 < report["windows"]["6"] < report["windows"]["None"] / 2


def test_bad_length_names_the_fix(report):
    assert "not divisible by 2 x mesh.context = 16" in report["bad_length"]
    assert "--data.seq_len as a multiple of 16" in report["bad_length"]


def test_load_balanced_order():
    """Device i holds chunks i and 2C-1-i: each device's share of the causal triangle is the same."""
    order = load_balanced_order(16, 4)  # 8 chunks of 2
    assert order.tolist() == [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9]
    work = [sum(int(t) + 1 for t in order[4 * i:4 * i + 4]) for i in range(4)]  # keys each device's queries see
    assert len(set(work)) == 1
    assert sorted(order.tolist()) == list(range(16))
    with pytest.raises(ValueError, match="multiple of 8"):
        load_balanced_order(20, 4)


def test_rules_split_sequence_not_batch_rows():
    """Activations ("batch", "seq", ...) split their sequence over context; input batches keep rows whole."""
    shape = {"data": 1, "fsdp": 2, "expert": 1, "context": 2, "tensor": 2}
    assert sharding.fitted_spec(("batch", "seq", "act_embed"), (4, 64, 32), shape) == \
        P(("data", "fsdp", "expert"), "context", None)
    assert sharding.logical_to_spec(("batch", None)) == P(("data", "fsdp", "expert"), None)
    assert sharding.fitted_spec(("batch", "seq"), (4, 63), shape) == P(("data", "fsdp", "expert"), None)


def test_parameters_split_over_context_only_where_it_exists():
    """A ring's devices share the parameters (embed over fsdp x context); without context specs read as before."""
    ring = {"data": 1, "fsdp": 2, "expert": 1, "context": 2, "tensor": 2}
    assert sharding.fitted_spec(("heads", "embed"), (64, 32), ring) == P("tensor", ("fsdp", "context"))
    assert sharding.fitted_spec(("heads", "embed"), (64, 32), {**ring, "context": 1}) == P("tensor", "fsdp")
