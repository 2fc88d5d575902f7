"""Exact resume after SIGKILL, SIGTERM checkpoints, corrupt and half-written checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from jaxformer.checkpoint import Checkpointer
from jaxformer.train.lm import train
from jaxformer.train.metrics import read_metrics
from tests.conftest import tiny_run


def _write_config(path: Path, cfgs: dict) -> Path:
    raw = {name: dataclasses.asdict(c) for name, c in cfgs.items()}
    raw["data"]["sources"] = list(raw["data"]["sources"])
    path.write_text(yaml.safe_dump(raw))
    return path


def _cli(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jaxformer.cli", "train", "--config", str(config), "--no-progress", *extra]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "trainer exited early"
        try:
            if max(_losses(run_dir), default=0) >= step:
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"trainer never reached step {step}")


def test_sigkill_then_resume_reproduces_losses_bitwise(tmp_path, shards_dir):
    steps = 24
    ref = tiny_run(tmp_path / "ref", shards_dir, steps=steps, ckpt_every=4, eval_every=8)
    train(ref, progress=False)
    expected = _losses(tmp_path / "ref")
    assert sorted(expected) == list(range(1, steps + 1))

    config = _write_config(tmp_path / "run.yaml", tiny_run(tmp_path / "run", shards_dir, steps=steps, ckpt_every=4,
                                                           eval_every=8))
    proc = subprocess.Popen(_cli(config), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_step(tmp_path / "run", 10, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(_losses(tmp_path / "run"))
    assert killed_at < steps, "the run finished before it could be killed"

    res = subprocess.run(_cli(config, "--resume"), capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resumed from step" in res.stdout
    got = _losses(tmp_path / "run")
    assert got == expected  # floats from JSON: equal means bitwise equal


def test_sigterm_saves_a_checkpoint_then_exits(tmp_path, shards_dir):
    config = _write_config(tmp_path / "run.yaml", tiny_run(tmp_path / "run", shards_dir, steps=100_000,
                                                           ckpt_every=100_000, eval_every=100_000))
    proc = subprocess.Popen(_cli(config), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_step(tmp_path / "run", 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGTERM: saved a checkpoint at step" in out
    saved = Checkpointer(tmp_path / "run" / "checkpoints").steps()
    assert len(saved) == 1 and saved[0] == max(_losses(tmp_path / "run"))


def test_corrupt_latest_checkpoint_falls_back(tmp_path, shards_dir):
    cfg = tiny_run(tmp_path / "run", shards_dir, steps=8, ckpt_every=4, eval_every=100)
    train(cfg, progress=False)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    for f in (ckpt_dir / "8" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\x00garbage" * 4)
    more = tiny_run(tmp_path / "run", shards_dir, steps=10, ckpt_every=4, eval_every=100)
    with pytest.warns(UserWarning, match=r"step 8 .* unreadable .* falling back"):
        out = train(more, resume=True, progress=False)
    assert out["step"] == 10
    steps_logged = [r["step"] for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert steps_logged == list(range(1, 11))  # steps 5-8 were recomputed after falling back to step 4


def test_half_written_checkpoint_is_never_listed(tmp_path, shards_dir):
    train(tiny_run(tmp_path / "run", shards_dir, steps=4, ckpt_every=2, eval_every=100), progress=False)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    partial = ckpt_dir / "6.orbax-checkpoint-tmp-1234567"  # what an interrupted orbax save leaves
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "junk").write_bytes(os.urandom(64))
    assert Checkpointer(ckpt_dir).steps() == [2, 4]


def _cut_back(ref: Path, run: Path, step: int) -> None:
    """A copy of finished run `ref` as a kill right after its step-`step` checkpoint leaves it."""
    import shutil

    shutil.copytree(ref, run)
    for p in (run / "checkpoints").iterdir():
        if p.name.isdigit() and int(p.name) > step:
            shutil.rmtree(p)
    for stale in ("model", "loss.png"):
        if (run / stale).is_dir():
            shutil.rmtree(run / stale)
        elif (run / stale).exists():
            (run / stale).unlink()


def test_resume_may_change_how_the_model_executes(tmp_path, shards_dir):
    """Started with remat none (xla attention), resumed with remat full and scan over layers: same losses."""
    train(tiny_run(tmp_path / "ref", shards_dir, steps=8, ckpt_every=4, eval_every=100), progress=False)
    _cut_back(tmp_path / "ref", tmp_path / "run", 4)
    out = train(tiny_run(tmp_path / "run", shards_dir, steps=8, ckpt_every=4, eval_every=100,
                         model={"remat": "full", "scan_layers": True}), resume=True, progress=False)
    assert out["step"] == 8
    ref, got = _losses(tmp_path / "ref"), _losses(tmp_path / "run")
    assert sorted(got) == list(range(1, 9)) and all(got[s] == ref[s] for s in range(1, 5))  # kept as recorded
    np.testing.assert_allclose([got[s] for s in range(5, 9)], [ref[s] for s in range(5, 9)], rtol=1e-5)


def test_a_killed_writer_s_cut_metrics_line_is_dropped_on_resume(tmp_path, shards_dir):
    cfg = tiny_run(tmp_path / "run", shards_dir, steps=4, ckpt_every=4, eval_every=100)
    train(cfg, progress=False)
    with (tmp_path / "run" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "kind": "train", "loss": 3.4')  # SIGKILL in the middle of a write
    with pytest.warns(UserWarning, match="not a complete JSON record"):
        out = train(tiny_run(tmp_path / "run", shards_dir, steps=6, ckpt_every=2, eval_every=100), resume=True,
                    progress=False)
    assert out["step"] == 6 and sorted(_losses(tmp_path / "run")) == list(range(1, 7))


def test_a_finished_run_resumed_reports_and_rewrites_nothing(tmp_path, shards_dir, capsys):
    """--resume on a finished run prints its recorded evaluation and model path; no export, no new sample."""
    from jaxformer.infer import Engine, SamplingParams, generate, load_model, load_tokenizer_for

    cfg = tiny_run(tmp_path / "run", shards_dir, steps=4, ckpt_every=4, eval_every=4, sample_tokens=6,
                   sample_temperature=0.0, sample_prompt="def ")
    first = train(cfg, progress=False)
    # the sample came through the inference engine, as `jaxformer generate` decodes
    model, tok = load_model(tmp_path / "run" / "model"), load_tokenizer_for(tmp_path / "run" / "model")
    [seq] = generate(Engine(model, max_batch=1), [[tok.bos_id] + tok.encode("def ")],
                     SamplingParams(temperature=0.0, max_new_tokens=6), tokenizer=tok, stop_ids=tok.eos_ids)
    assert first["sample"] == "def " + seq.text
    weights = tmp_path / "run" / "model" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    capsys.readouterr()
    again = train(cfg, resume=True, progress=False)
    out = capsys.readouterr().out
    assert again["finished"] and again["step"] == 4 and again["val_loss"] == first["val_loss"]
    assert again["model_dir"] == first["model_dir"] and "sample" not in again
    assert f"loss {first['val_loss']:.4f}" in out and first["model_dir"] in out and "sample:" not in out
    assert weights.stat().st_mtime_ns == stamp


def test_only_corrupt_checkpoints_fall_back(tmp_path, monkeypatch):
    """A state that does not fit, or running out of memory, is raised with its cause; nothing is renamed."""
    import jax.numpy as jnp

    from jaxformer.checkpoint import IncompatibleCheckpointError, abstract_like, load_run_params

    ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False)
    state = {"params": {"w": jnp.arange(12.0).reshape(3, 4)}, "opt_state": {}, "rng": jnp.zeros(2, jnp.uint32)}
    for step in (1, 2):
        ckpt.save(step, state, {"i": step}, {"config": {"model": {}}})
    ckpt.wait()
    listing = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    wrong = {**state, "params": {"w": jnp.zeros((3, 5))}}
    with pytest.raises(IncompatibleCheckpointError, match="step 2 .* does not fit"):
        ckpt.restore(abstract_like(wrong))
    real_restore = ckpt.manager.restore

    def out_of_memory(*args, **kwargs):
        raise MemoryError("RESOURCE_EXHAUSTED: out of memory while restoring")

    ckpt.manager.restore = out_of_memory
    with pytest.raises(MemoryError, match="RESOURCE_EXHAUSTED"):
        ckpt.restore(abstract_like(state))
    ckpt.manager.restore = real_restore
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == listing  # nothing set aside
    step, restored, data, _ = ckpt.restore(abstract_like(state))
    assert step == 2 and data == {"i": 2}
    ckpt.close()
    # load_run_params (what load_any and `jaxformer convert RUN` read) falls back on corruption only, too
    for f in (tmp_path / "checkpoints" / "2" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\x00garbage" * 4)
    with pytest.warns(UserWarning, match="step 2 .* unreadable"):
        _, params = load_run_params(tmp_path)
    np.testing.assert_array_equal(params["w"], np.arange(12.0).reshape(3, 4))  # step 1's
    import orbax.checkpoint as ocp

    monkeypatch.setattr(ocp.CheckpointManager, "restore", out_of_memory)
    with pytest.raises(MemoryError, match="RESOURCE_EXHAUSTED"):
        load_run_params(tmp_path)
