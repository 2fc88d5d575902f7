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


def test_deepseek_bias_balancing_moves_each_correction_bias_by_the_rate(shards_dir, tmp_path):
    """DeepSeek-V3's auxiliary-loss-free balancing: after a step, every sparse layer's correction bias moved by
    exactly +rate for experts under that layer's mean load and -rate above it (numpy from the step's own loads), the
    gradient moved none of them, and the per-layer loads stay out of the logged metrics."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxformer.config import ModelConfig
    from jaxformer.models import DecoderLM
    from jaxformer.train.optim import make_optimizer
    from jaxformer.train.step import LAYER_LOAD, balance_router_biases, lm_loss, make_train_step
    from jaxformer.config import TrainConfig

    rate = 0.01
    cfg = ModelConfig.llama(vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=32,
                            moe=dict(n_experts=8, n_experts_per_token=2, router="deepseek", n_group=2, topk_group=2,
                                     dense_layers=(0,), aux_loss_coef=0.0, bias_update_rate=rate))
    graphdef, params = nnx.split(DecoderLM(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    tx = make_optimizer(TrainConfig(lr=1e-2, warmup_steps=0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 97, (4, 17)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": np.tile(np.arange(16, dtype=np.int32),
             (4, 1)), "segment_ids": np.ones((4, 16), np.int32), "loss_mask": np.ones((4, 16), np.float32)}
    loss = lm_loss(graphdef, packed=True)
    plain = jax.jit(make_train_step(loss, tx))
    balanced = jax.jit(make_train_step(loss, tx, after_update=balance_router_biases(cfg)))
    opt = tx.init(params)
    p0, _, m0 = plain(params, opt, batch)
    p1, _, m1 = balanced(params, opt, batch)
    assert LAYER_LOAD not in m1
    loads = np.asarray(m0[LAYER_LOAD])  # [2 sparse layers, 8]: the unbalanced step reports them
    assert loads.shape == (2, 8) and loads.sum() == 2 * 4 * 16 * 2
    for j, i in enumerate((1, 2)):
        before = np.asarray(params["layers"][i]["mlp"]["gate"]["e_score_correction_bias"][...])
        after_plain = np.asarray(p0["layers"][i]["mlp"]["gate"]["e_score_correction_bias"][...])
        after = np.asarray(p1["layers"][i]["mlp"]["gate"]["e_score_correction_bias"][...])
        np.testing.assert_array_equal(after_plain, before)  # no gradient reaches it
        want = before + rate * np.sign(loads[j].mean() - loads[j])
        np.testing.assert_allclose(after, want, rtol=0, atol=1e-7)
        assert np.any(after != before)
    w0, w1 = (np.asarray(p["layers"][1]["mlp"]["gate"]["weight"][...]) for p in (p0, p1))
    np.testing.assert_array_equal(w0, w1)  # everything else is the plain step's
