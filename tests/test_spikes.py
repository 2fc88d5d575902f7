"""Loss spikes (train.spike_threshold, PaLM section 5.1): the guarded step, skips and rollbacks, config checks.

The end-to-end runs corrupt chosen batches: every target set to token 511, which the fixture's 400-token tokenizer
never produces. At batch_size 16 such a batch's gradient norm is 10-11x the running median (its loss only 1.07x),
while the first 30 batches of the fixture's data (seed 0) stay within 1.7x: SPIKY's threshold of 4 sits between.
The runs read no further: batch 33 holds a row of '#' characters, a real spike (18x); with other data seeds real
spikes come earlier (seed 3: step 15).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxformer.checkpoint import Checkpointer, read_run_meta
from jaxformer.config import ModelConfig, TrainConfig, build_section, load_config
from jaxformer.models import DecoderLM
from jaxformer.train.lm import Pretraining, train
from jaxformer.train.metrics import read_metrics
from jaxformer.train.run import roll_back, run
from jaxformer.train.spikes import MAX_ROLLBACKS, SPIKE_MIN_STEPS, LossSpikeError, SpikeGuard
from jaxformer.train.step import lm_loss, make_train_step
from tests.conftest import tiny_run

SPIKY = dict(batch_size=16, spike_threshold=4.0, spike_patience=3)
UNSEEN_TOKEN = 511  # tiny_run's vocab is 512; the fixture tokenizer has 400 tokens
# Final validation loss of the run that rolled back (its steps 11-26 read batches 15-30) vs the clean run (batches
# 11-26): a data-order difference. Clean runs of this config with data seeds 0-4 ended within 0.0092 of each other
# (the rolled-back run: 0.0078 below the clean one); the same corrupted batches trained on (detection off) end
# 0.054 above it. The bound is 3x the seeds' spread, under that.
VAL_LOSS_NOISE = 0.03


class Corrupting:
    """A data iterator whose n-th batch drawn (1-based: step n until a rollback) is corrupted for n in `bad`."""

    def __init__(self, inner, bad: dict[int, str]):
        self.inner, self.bad, self.drawn = inner, bad, 0

    def __next__(self) -> dict:
        batch, self.drawn = next(self.inner), self.drawn + 1
        kind = self.bad.get(self.drawn)
        if kind == "token":
            batch = {**batch, "targets": np.full_like(batch["targets"], UNSEEN_TOKEN)}
        elif kind == "nan":
            batch = {**batch, "loss_mask": np.full_like(batch["loss_mask"], np.nan)}
        return batch

    def get_state(self) -> dict:
        return self.inner.get_state()

    def set_state(self, state: dict) -> None:
        self.inner.set_state(state)


class SpikyPretraining(Pretraining):
    """Pretraining on corrupted batches; keeps host copies of the params before and after the steps in `watch`;
    exports nothing."""

    def __init__(self, cfgs: dict, bad: dict[int, str], watch: tuple[int, ...] = ()):
        super().__init__(cfgs, progress=False)
        self.bad, self.watch, self.watched = bad, watch, {}

    def setup(self, mesh):
        setup = super().setup(mesh)
        setup.iterator = Corrupting(setup.iterator, self.bad)
        step = setup.step

        def watched_step(p, o, batch, n, limits):
            if n not in self.watch:
                return step(p, o, batch, n, limits)
            before = jax.device_get(p)  # before the step donates p
            p, o, metrics = step(p, o, batch, n, limits)
            self.watched[n] = (before, jax.device_get(p))
            return p, o, metrics

        setup.step = watched_step
        return setup

    def export(self, model, result: dict) -> dict:
        return {}  # not under test here: no model files, no plot


def _records(run_dir, kind: str) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r["kind"] == kind]


def _batch(seed: int, B: int = 4, T: int = 16, V: int = 64) -> dict:
    rng = np.random.default_rng(seed)
    tok = rng.integers(0, V, (B, T + 1)).astype(np.int32)
    return {"inputs": tok[:, :-1], "targets": tok[:, 1:], "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
            "segment_ids": np.ones((B, T), np.int32), "loss_mask": np.ones((B, T), np.float32)}


def _assert_bitwise(got, want) -> None:
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_guarded_step_keeps_params_bitwise_over_its_limits_and_is_the_plain_step_under_them():
    cfg = ModelConfig.llama(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=16)
    graphdef, params = nnx.split(DecoderLM(cfg, rngs=nnx.Rngs(1)))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))
    step = jax.jit(make_train_step(lm_loss(graphdef, packed=True), tx))
    params, opt_state, _ = step(params, tx.init(params), _batch(0))  # moments and count that are not zeros
    want_p, want_o, want_m = step(params, opt_state, _batch(1))
    loss, norm = float(want_m["loss"]), float(want_m["grad_norm"])
    assert "skipped" not in want_m

    for limits in ([np.inf, np.inf], [loss * 1.01, norm * 1.01]):
        got_p, got_o, got_m = step(params, opt_state, _batch(1), (), np.float32(limits))
        assert float(got_m["skipped"]) == 0.0
        assert float(got_m["loss"]) == loss and float(got_m["grad_norm"]) == norm
        for a, b in zip(jax.tree.leaves((got_p, got_o)), jax.tree.leaves((want_p, want_o)), strict=True):
            b = np.asarray(b, np.float64)  # the same update: 0.0 measured (two cores and one); bound: float32 rounding
            assert np.max(np.abs(np.asarray(a, np.float64) - b)) <= 1e-6 * max(np.max(np.abs(b)), 1e-30)

    for limits in ([loss * 0.99, np.inf], [np.inf, norm * 0.99]):
        got_p, got_o, got_m = step(params, opt_state, _batch(1), (), np.float32(limits))
        assert float(got_m["skipped"]) == 1.0 and float(got_m["loss"]) == loss
        _assert_bitwise((got_p, got_o), (params, opt_state))

    poisoned = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan) if x.ndim == 2 else x, params)
    got_p, got_o, got_m = step(poisoned, opt_state, _batch(1), (), np.float32([np.inf, np.inf]))
    assert not np.isfinite(float(got_m["loss"])) and float(got_m["skipped"]) == 1.0  # non-finite: always a spike
    _assert_bitwise((got_p, got_o), (poisoned, opt_state))


def test_one_corrupted_batch_is_skipped_and_the_run_goes_on(tmp_path, shards_dir):
    cfgs = tiny_run(tmp_path / "run", shards_dir, steps=12, **SPIKY)  # the medians set limits from step 9
    task = SpikyPretraining(cfgs, bad={10: "token"}, watch=(10,))
    out = run(task, cfgs, progress=False)
    [spike] = _records(tmp_path / "run", "spike")
    assert spike["step"] == 10 and spike["streak"] == 1
    assert spike["grad_norm"] > spike["max_grad_norm"] > 0 and spike["max_loss"] > 0
    assert not _records(tmp_path / "run", "rollback")
    assert [r["step"] for r in _records(tmp_path / "run", "train")] == [s for s in range(1, 13) if s != 10]
    before, after = task.watched[10]
    _assert_bitwise(after, before)  # the update was skipped
    assert out["step"] == 12 and np.isfinite(out["val_loss"])


def test_a_streak_of_spikes_rolls_back_to_the_checkpoint_before_it(tmp_path, shards_dir):
    cfgs = tiny_run(tmp_path / "run", shards_dir, steps=26, **SPIKY)  # checkpoints every 10
    out = run(SpikyPretraining(cfgs, bad={12: "token", 13: "token", 14: "token"}), cfgs, progress=False)
    clean = train(tiny_run(tmp_path / "clean", shards_dir, steps=26, **SPIKY), progress=False)

    assert [(r["step"], r["streak"]) for r in _records(tmp_path / "run", "spike")] == [(12, 1), (13, 2), (14, 3)]
    [rollback] = _records(tmp_path / "run", "rollback")
    assert rollback == {"step": 10, "kind": "rollback", "from_step": 14, "to_step": 10, "skipped_batches": 4}
    train_records = _records(tmp_path / "run", "train")
    assert [r["step"] for r in train_records] == list(range(1, 27))  # the discarded step 11 is gone
    assert [r["step"] for r in _records(tmp_path / "run", "eval")] == [10, 20, 26]
    clean_losses = [r["loss"] for r in _records(tmp_path / "clean", "train")]
    assert [r["loss"] for r in train_records[:10]] == clean_losses[:10]  # the same steps before the spikes
    assert train_records[10]["loss"] != clean_losses[10]  # step 11 after the rollback reads batch 15
    assert Checkpointer(tmp_path / "run" / "checkpoints").steps()[-1] == 26 and out["step"] == 26
    assert read_run_meta(tmp_path / "run")["spikes"]["rollbacks"] == 1
    assert abs(out["val_loss"] - clean["val_loss"]) <= VAL_LOSS_NOISE


def test_spikes_without_a_checkpoint_before_them_stop_the_run(tmp_path, shards_dir):
    cfgs = tiny_run(tmp_path / "run", shards_dir, **SPIKY)
    with pytest.raises(LossSpikeError, match=r"at steps 3\.\.5.*no checkpoint before step 3.*--train\.ckpt_every"):
        run(SpikyPretraining(cfgs, bad={3: "nan", 4: "nan", 5: "nan"}), cfgs, progress=False)
    spikes = _records(tmp_path / "run", "spike")  # NaN is a spike before the window has its 8 steps
    assert [r["step"] for r in spikes] == [3, 4, 5] and spikes[0]["loss"] == "nan"
    assert spikes[0]["max_loss"] == "inf"
    json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])  # strict JSON


def test_the_window_sets_limits_after_8_accepted_steps_and_rollbacks_are_capped():
    guard = SpikeGuard(3.0, 2)
    for step in range(1, SPIKE_MIN_STEPS):
        guard.accept(step, 2.0 + step, 0.5)
    assert np.isinf(guard.limits()).all()  # too few steps for medians: only non-finite steps are spikes
    guard.accept(SPIKE_MIN_STEPS, 100.0, 0.5)
    np.testing.assert_array_equal(guard.limits(), np.float32([3.0 * 6.5, 3.0 * 0.5]))  # median loss of 3..9, 100
    guard.spike(9, 50.0, 0.5, guard.limits())
    assert not guard.must_roll_back()
    record = guard.spike(10, float("nan"), 0.5, guard.limits())
    assert guard.must_roll_back() and record["streak"] == 2 and record["loss"] == "nan"
    saved = json.loads(json.dumps(guard.state()))  # what a checkpoint's meta holds
    assert SpikeGuard(3.0, 2, saved).state() == guard.state()  # a resumed run goes on with the same window

    guard.rollbacks = MAX_ROLLBACKS  # a sixth streak stops the run, before touching any checkpoint
    with pytest.raises(LossSpikeError, match=f"steps 9..10 .*after {MAX_ROLLBACKS} rollbacks.*--train.lr"):
        roll_back(None, None, guard, 10, it=None, logger=None, meta_base={}, eval_every=10)


def test_spike_settings_are_checked_and_old_configs_still_load():
    with pytest.raises(ValueError, match="spike_threshold"):
        TrainConfig(spike_threshold=0.5)
    with pytest.raises(ValueError, match="spike_threshold"):
        TrainConfig(spike_threshold=-2.0)
    with pytest.raises(ValueError, match="spike_patience must be an integer >= 1"):
        TrainConfig(spike_patience=0)
    old = {k: v for k, v in TrainConfig().__dict__.items() if not k.startswith("spike_")}  # a run saved before them
    assert build_section(TrainConfig, old, "train").spike_threshold == 0.0
    cfgs = load_config("tiny_code", ["--train.spike_threshold=2", "--train.spike_patience=5"])
    assert (cfgs["train"].spike_threshold, cfgs["train"].spike_patience) == (2, 5)
