"""Training: losses, optimizer, accumulation, the loop end to end, NaN handling and clear errors."""

from __future__ import annotations

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxformer.config import ModelConfig, TrainConfig
from jaxformer.models import DecoderLM
from jaxformer.train.lm import train
from jaxformer.train.losses import cross_entropy_sums
from jaxformer.train.metrics import read_metrics
from jaxformer.train.optim import decay_mask, make_schedule
from jaxformer.train.run import NonFiniteLossError
from jaxformer.train.step import lm_loss, make_train_step
from tests.conftest import tiny_run


def _random_batch(rng, B, T, V):
    tok = rng.integers(0, V, (B, T + 1)).astype(np.int32)
    seg = np.sort(rng.integers(1, 3, (B, T)), axis=1).astype(np.int32)
    return {"inputs": tok[:, :-1], "targets": tok[:, 1:], "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
            "segment_ids": seg, "loss_mask": (rng.random((B, T)) > 0.2).astype(np.float32)}


def test_cross_entropy_and_z_loss_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, (2, 5))
    mask = (rng.random((2, 5)) > 0.3).astype(np.float32)
    ce, z, n = cross_entropy_sums(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), z_loss=1e-2)
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(ce), ((lse - picked) * mask).sum(), rtol=1e-5)
    np.testing.assert_allclose(float(z), 1e-2 * (lse**2 * mask).sum(), rtol=1e-5)
    assert float(n) == mask.sum()


def test_weight_decay_skips_norms_biases_embeddings():
    model = DecoderLM(ModelConfig.gpt2(vocab_size=64, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=16),
                      rngs=nnx.Rngs(0))
    _, params = nnx.split(model)
    flat = {".".join(str(k.key) for k in p if hasattr(k, "key")): v
            for p, v in jax.tree_util.tree_flatten_with_path(decay_mask(params))[0]}
    decayed = sorted(k for k, v in flat.items() if v)
    assert decayed == sorted(f"layers.0.{m}.weight" for m in
                             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                              "mlp.up_proj", "mlp.down_proj"))


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedules(kind):
    cfg = TrainConfig(steps=110, warmup_steps=10, lr=1.0, min_lr_ratio=0.1, schedule=kind)
    s = make_schedule(cfg)
    assert float(s(0)) == 0.0 and math.isclose(float(s(5)), 0.5, rel_tol=1e-6)
    assert math.isclose(float(s(10)), 1.0, rel_tol=1e-6)
    end = {"cosine": 0.1, "linear": 0.1, "constant": 1.0}[kind]
    assert math.isclose(float(s(110)), end, rel_tol=1e-5)
    mid = {"cosine": 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)), "linear": 0.55, "constant": 1.0}[kind]
    assert math.isclose(float(s(60)), mid, rel_tol=1e-5)


def test_grad_accumulation_equals_full_batch():
    cfg = ModelConfig.llama(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=16)
    graphdef, params = nnx.split(DecoderLM(cfg, rngs=nnx.Rngs(1)))
    tx = optax.sgd(1.0)  # params move by exactly -grad: the comparison sees the gradients themselves
    batch = _random_batch(np.random.default_rng(2), 8, 16, 64)
    results = []
    for k in (1, 4):
        step = jax.jit(make_train_step(lm_loss(graphdef, packed=True), tx, grad_accum=k))
        p, _, m = step(params, tx.init(params), batch)
        results.append((p, m))
    (p1, m1), (p4, m4) = results
    assert math.isclose(float(m1["loss"]), float(m4["loss"]), rel_tol=1e-6)
    assert math.isclose(float(m1["grad_norm"]), float(m4["grad_norm"]), rel_tol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(params)))
    assert moved > 1e-3  # the step really updated the weights


def test_bf16_params_keep_their_dtype_and_one_compile():
    """bf16 weights: gradients, AdamW moments and updated weights stay bf16, so the donated step compiles once."""
    cfg = ModelConfig.llama(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32, max_seq_len=8,
                            param_dtype="bfloat16", compute_dtype="bfloat16")
    graphdef, params = nnx.split(DecoderLM(cfg, rngs=nnx.Rngs(0)))
    tx = optax.adamw(1e-3)
    step = jax.jit(make_train_step(lm_loss(graphdef, packed=True), tx), donate_argnums=(0, 1))
    opt_state = tx.init(params)
    for seed in (1, 2):
        params, opt_state, _ = step(params, opt_state, _random_batch(np.random.default_rng(seed), 2, 8, 32))
    dtypes = {x.dtype for x in jax.tree.leaves((params, opt_state)) if jnp.issubdtype(x.dtype, jnp.floating)}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    assert step._cache_size() == 1


def test_loss_falls_and_run_artifacts(tmp_path, shards_dir):
    out = train(tiny_run(tmp_path / "run", shards_dir, steps=40, ckpt_every=20, eval_every=20, lr=1e-2,
                         parity_every=20), progress=False)
    records = read_metrics(tmp_path / "run")
    checks = [r for r in records if r["kind"] == "parity"]  # --train.parity_every: the torch_ref cross-check
    assert [r["step"] for r in checks] == [20, 40]
    assert all(r["logits_max_abs"] < 1e-4 and r["kl_max"] < 1e-8 and r["top1_agreement"] == 1.0 for r in checks)
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [20, 40] and evals[-1]["val_loss"] < losses[0] - 1.0  # held-out improves
    assert math.isclose(evals[-1]["val_ppl"], math.exp(evals[-1]["val_loss"]), rel_tol=1e-9)
    for key in ("grad_norm", "lr", "tokens_per_s", "mfu"):
        assert all(math.isfinite(r[key]) and r[key] >= 0 for r in records if r["kind"] == "train")
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    assert out["val_loss"] == evals[-1]["val_loss"]
    from jaxformer.interop.auto import load_any

    model = load_any(tmp_path / "run")  # the exported model carries the trained weights
    assert model.config.d_model == 32 and (tmp_path / "run" / "model" / "tokenizer.json").exists()


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path, shards_dir):
    cfg = tiny_run(tmp_path / "run", shards_dir, steps=20, ckpt_every=1, lr=1e30, warmup_steps=0, grad_clip=0.0,
                   eval_every=100)
    with pytest.raises(NonFiniteLossError, match=r"at step (\d+)") as info:
        train(cfg, progress=False)
    bad_step = int(re.search(r"at step (\d+)", str(info.value)).group(1))
    steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and max(steps) == bad_step - 1  # nothing saved at or after the bad step
    assert f"step {bad_step - 1}" in str(info.value)


def test_clear_errors(tmp_path, shards_dir):
    with pytest.raises(ValueError, match="exceeds model.max_seq_len"):
        train(tiny_run(tmp_path / "a", shards_dir, data={"seq_len": 128}), progress=False)
    with pytest.raises(ValueError, match="vocab_size"):
        train(tiny_run(tmp_path / "b", shards_dir, model={"vocab_size": 300}), progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(tiny_run(tmp_path / "c", tmp_path / "fresh", data={"sources": (str(tmp_path / "nope"),)}),
              progress=False)
    train(tiny_run(tmp_path / "d", shards_dir, steps=2, ckpt_every=1), progress=False)
    with pytest.raises(ValueError, match="--resume"):
        train(tiny_run(tmp_path / "d", shards_dir, steps=4), progress=False)
    with pytest.raises(ValueError, match=r"cannot resume .* model config differs in \['d_model', 'head_dim'\]"):
        train(tiny_run(tmp_path / "d", shards_dir, steps=4, model={"d_model": 64}), resume=True, progress=False)
    with pytest.raises(ValueError, match="grad_accum=3 must divide batch_size=4"):
        TrainConfig(batch_size=4, grad_accum=3)


def test_eval_and_plot_cli(tmp_path, shards_dir):
    import subprocess
    import sys

    train(tiny_run(tmp_path / "run", shards_dir, steps=4, ckpt_every=2, eval_every=2), progress=False)
    (tmp_path / "run" / "loss.png").unlink()
    cli = [sys.executable, "-m", "jaxformer.cli"]
    res = subprocess.run(cli + ["eval", "--ckpt", str(tmp_path / "run"), "--batches", "2", "--batch-size", "4",
                                "--json", str(tmp_path / "e.json")], capture_output=True, text=True, check=True)
    out = json.loads((tmp_path / "e.json").read_text())
    assert out["val_tokens"] > 0 and math.isclose(out["val_ppl"], math.exp(out["val_loss"]), rel_tol=1e-9)
    assert '"val_bpb"' in res.stdout
    subprocess.run(cli + ["plot", str(tmp_path / "run")], check=True, capture_output=True)
    assert (tmp_path / "run" / "loss.png").exists()
