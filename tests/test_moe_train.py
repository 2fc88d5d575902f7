"""Training a Mixture-of-Experts model: a few steps of a real run log the router terms and per-expert load.

(The objective itself, CE + aux_coef * load-balancing + z_coef * z-loss, and its gradients are checked against
torch_ref and transformers' load_balancing_loss_func in parity_tests/test_moe.py.) With a capacity factor
that drops assignments, every train record of metrics.jsonl carries moe_aux_loss, moe_z_loss, moe_dropped
and moe_load/{e} (fractions summing to 1), and TensorBoard has them as scalars.
"""

from __future__ import annotations

from jaxformer.train.lm import train
from jaxformer.train.metrics import read_metrics
from tests.conftest import tiny_run


def test_run_logs_router_losses_per_expert_load_and_drops(tmp_path, shards_dir):
    model = dict(n_experts=4, n_experts_per_token=2, moe_d_ff=32, router_aux_loss_coef=0.5, router_z_loss_coef=0.1,
                 capacity_factor=0.75)
    train(tiny_run(tmp_path / "run", shards_dir, steps=2, ckpt_every=2, eval_every=2, eval_batches=1, model=model),
          progress=False)
    records = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        load = [r[f"moe_load/{e}"] for e in range(4)]
        assert abs(sum(load) - 1.0) < 1e-5 and min(load) >= 0
        assert 0 < r["moe_dropped"] < 1 and r["moe_aux_loss"] > 0 and r["moe_z_loss"] > 0
    events = b"".join(f.read_bytes() for f in (tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    for tag in (b"train/moe_load/0", b"train/moe_load/3", b"train/moe_dropped", b"train/moe_aux_loss"):
        assert tag in events, f"TensorBoard has no {tag.decode()} scalar"
