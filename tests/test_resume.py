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

import pytest
import yaml

from jaxformer.train.checkpoint import Checkpointer
from jaxformer.train.loop import train
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
