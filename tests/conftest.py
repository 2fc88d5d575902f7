"""Shared fixtures: a small real corpus (standard-library files plus bad inputs), its tokenizer and shards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jaxformer.config import DataConfig, ModelConfig, TrainConfig
from jaxformer.data.corpus import stdlib_root

ROOT = Path(__file__).resolve().parent.parent
# The tests' programs are tiny and compile-bound: XLA:CPU's LLVM passes at level 0 compile a third faster and leave
# the HLO (fusion, layouts, buffers, collectives: what tests inspect) as it is. Set before any backend starts; the
# subprocesses get it through fake_devices_env / the inherited environment. A level already set is kept.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()
CORPUS_PICKS = ["json", "textwrap.py", "string.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "heapq.py"]
TOKENIZER_VOCAB = 400


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """~150 KB of Python from the standard library, plus an empty, an undecodable and a JSONL file."""
    root = tmp_path_factory.mktemp("corpus")
    for name in CORPUS_PICKS:
        src = stdlib_root() / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, root / name)
    for i in range(12):  # short documents, so that windows pack several of them
        (root / f"short_{i}.py").write_text(f"def short_{i}(x):\n    return x + {i}\n")
    (root / "empty.py").write_text("   \n")
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    return root


@pytest.fixture(scope="session")
def jsonl_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("jsonl") / "docs.jsonl"
    lines = [json.dumps({"body": f"def f{i}(x):\n    return x * {i}\n", "id": i}) for i in range(20)]
    lines += ["{not json", json.dumps({"other": "no body field"}), json.dumps({"body": ""})]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def tokenizer(corpus_dir):
    from jaxformer.data.shards import iter_sources_text
    from jaxformer.data.tokenizer import train_tokenizer

    return train_tokenizer(iter_sources_text([corpus_dir]), TOKENIZER_VOCAB, show_progress=False)


@pytest.fixture(scope="session")
def shards_dir(corpus_dir, tokenizer, tmp_path_factory) -> Path:
    from jaxformer.data.prepare import prepare

    out = tmp_path_factory.mktemp("shards")
    prepare([corpus_dir], tokenizer, out, val_fraction=0.25, progress=False)
    return out


def tiny_run(run_dir: Path, shards_dir: Path, *, model: dict | None = None, data: dict | None = None,
             **train) -> dict:
    """A run config for a ~50k-parameter model on the fixture shards (trains in seconds on CPU)."""
    m = dict(vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)
    d = dict(sources=("unused",), data_dir=str(shards_dir), seq_len=32, packed=True)
    t = dict(run_dir=str(run_dir), steps=30, batch_size=4, lr=3e-3, warmup_steps=5, log_every=1, eval_every=10,
             eval_batches=2, ckpt_every=10, keep_last=2, sample_tokens=0, peak_tflops=1.0, async_checkpoint=True)
    return {"model": ModelConfig.llama(**{**m, **(model or {})}), "data": DataConfig(**{**d, **(data or {})}),
            "train": TrainConfig(**{**t, **train})}


def assert_importer_gives_preset(name: str, model_type: str, published: dict) -> None:
    """jaxformer's importer reads a checkpoint's published config.json fields as the preset `name` (training-only
    and dtype fields aside), with the same family (the exported one: Kimi-K2's kimi_k2 exports as deepseek_v3)."""
    from jaxformer.config import load_model_config
    from jaxformer.interop.hf import config_from_hf

    cfg = load_model_config(name)
    got = config_from_hf({"model_type": model_type, **published})
    skip = ("init_std", "param_dtype", "compute_dtype", "export_as")
    assert {k: v for k, v in got.to_dict().items() if k not in skip} == \
        {k: v for k, v in cfg.to_dict().items() if k not in skip}
    assert got.family == cfg.family == {"kimi_k2": "deepseek_v3"}.get(model_type, model_type)


def fake_devices_env(devices: int, **extra: str) -> dict[str, str]:
    """The environment of a subprocess with `devices` fake CPU devices: this process's, its XLA_FLAGS (the compile
    level) plus the device count, JAX on CPU, the repository on PYTHONPATH, and `extra`."""
    return {**os.environ, "XLA_FLAGS": f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={devices}",
            "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), **extra}


def run_on_eight_devices(*args: str, unset: tuple[str, ...] = ()) -> str:
    """`python *args` in a fresh process with 8 fake CPU devices (XLA_FLAGS) and the repository on PYTHONPATH,
    without the environment variables `unset`; asserts it succeeded (its output's tail on failure), returns stdout."""
    env = fake_devices_env(8)
    for name in unset:
        env.pop(name, None)
    res = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout
