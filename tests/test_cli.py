"""`jaxformer convert` / `jaxformer inspect` through a real subprocess, and jaxformer.save / jaxformer.load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

import jaxformer
from jaxformer.interop import native
from jaxformer.interop.state_dict import expected_shapes, from_state_dict, to_numpy_state_dict

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

_SCRIPT = Path(sys.executable).with_name("jaxformer")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "jaxformer.cli"]


def run_cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([*CLI, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def main_in_process(capsys, *args: str | Path) -> tuple[int, str, str]:
    """jaxformer.cli.main without a subprocess (same code path, no interpreter start-up): (code, out, err)."""
    from jaxformer.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- Hugging Face round trip

def _hf_model(family: str):
    """A random-init transformers model whose every tensor (norms and biases included) is random."""
    torch.manual_seed(0)
    if family == "llama":
        config = transformers.LlamaConfig(
            vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rope_theta=50000.0, rms_norm_eps=1e-6,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                         bos_token_id=95, eos_token_id=95)
        model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name or "ln_" in name else 0.0)
                    if name.endswith("weight") else torch.randn_like(p) * 0.1)
    return model.eval()


def _logits(model, tokens):
    with torch.no_grad():
        out = model(tokens)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_convert_round_trip_hf_jaxformer_torch_hf(tmp_path, capsys, family):
    import safetensors.torch

    import torch_ref

    original = _hf_model(family)
    hf_dir, j_dir, w_file, hf2_dir = (tmp_path / "hf", tmp_path / "jf", tmp_path / "w.safetensors", tmp_path / "hf2")
    original.save_pretrained(hf_dir)
    from jaxformer.data.tokenizer import train_tokenizer

    train_tokenizer(["def f(x): return x"] * 20, vocab_size=300, show_progress=False).save(hf_dir)

    def cli(*args) -> str:  # in-process: the same code path without three interpreter start-ups
        code, out, err = main_in_process(capsys, *args)
        assert code == 0, err
        return out

    cli("convert", "--to", "jaxformer", hf_dir, j_dir)
    assert native.is_native(j_dir)
    assert (j_dir / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()  # carried along
    cli("convert", "--to", "torch", j_dir, w_file)
    assert native.is_native(w_file)

    # the single file is torch_ref's state dict, with the config in its metadata
    cfg = native.read_config(w_file)
    assert cfg.family == family and cfg.n_layers == 2 and cfg.vocab_size == 96
    if family == "llama":
        assert (cfg.n_kv_heads, cfg.rope.theta, cfg.norm_eps, cfg.tie_embeddings) == (2, 50000.0, 1e-6, False)
    else:
        assert cfg.tie_embeddings and cfg.position == "learned" and cfg.max_seq_len == 64
    ref = torch_ref.DecoderLM(cfg)
    ref.load_state_dict(safetensors.torch.load_file(str(w_file)), strict=True)
    ref.eval()

    cli("convert", "--to", "hf", w_file, hf2_dir)
    restored = transformers.AutoModelForCausalLM.from_pretrained(hf2_dir).eval()
    assert type(restored) is type(original)

    sd0, sd1 = original.state_dict(), restored.state_dict()
    assert sorted(sd0) == sorted(sd1)
    for k in sd0:
        assert sd1[k].dtype == sd0[k].dtype and torch.equal(sd1[k], sd0[k]), k

    tokens = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(1))
    want = _logits(original, tokens)
    assert torch.equal(_logits(restored, tokens), want)
    torch.testing.assert_close(_logits(ref, tokens), want, rtol=0, atol=1e-4)

    # inspect reads every checkpoint form and counts what transformers counts (once through the real entry point)
    n, want_model = original.num_parameters(), json.loads(json.dumps(cfg.to_dict()))  # tuples read back as lists
    info = json.loads(ok(run_cli("inspect", w_file, cwd=tmp_path)).stdout if family == "gpt2" else cli("inspect", w_file))
    assert info["params"] == n and info["family"] == family and info["model"] == want_model
    for src in (hf_dir, j_dir, hf2_dir):
        info = json.loads(cli("inspect", src))
        assert info["params"] == n and info["family"] == family and info["model"] == want_model, src


# ----------------------------------------------------------------------------- inspect

def test_inspect_preset(tmp_path):
    info = json.loads(ok(run_cli("inspect", "gpt2-124m", cwd=tmp_path)).stdout)
    assert info["params"] == 124_439_808 and info["family"] == "gpt2"
    assert info["model"] == json.loads(json.dumps(jaxformer.load_model_config("gpt2-124m").to_dict()))


@pytest.mark.parametrize("override", [["--model.n_layers=4"], ["--model.n_layers", "4"]])
def test_inspect_with_override(tmp_path, override):
    info = json.loads(ok(run_cli("inspect", "tiny", *override, cwd=tmp_path)).stdout)
    cfg = jaxformer.load_model_config("tiny", ["--model.n_layers=4"])
    assert info["model"]["n_layers"] == 4
    assert info["params"] == jaxformer.count_params(nnx.eval_shape(lambda: jaxformer.DecoderLM(cfg, rngs=nnx.Rngs(0))))


# ----------------------------------------------------------------------------- user errors

def _error_cases(tmp: Path) -> dict[str, tuple[list, str]]:
    neither = tmp / "neither"
    neither.mkdir()
    (neither / "notes.txt").write_text("hello")
    garbage = tmp / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    j_dir = native.save(from_state_dict(_TINY, _random_weights(_TINY)), tmp / "ckpt")
    return {
        "missing source": (["convert", "--to", "jaxformer", tmp / "nope", tmp / "out"], "does not exist"),
        "neither format": (["convert", "--to", "torch", neither, tmp / "w.safetensors"], "neither"),
        "garbage safetensors": (["convert", "--to", "hf", garbage, tmp / "hf"], "safetensors"),
        "jaxformer to a file": (["convert", "--to", "jaxformer", j_dir, tmp / "x.safetensors"], "directory"),
        "unknown override key": (["inspect", "tiny", "--model.n_layer=4"], "n_layer"),
        "bad override value": (["inspect", "tiny", "--model.norm_eps=abc"], "norm_eps"),
        "bad override syntax": (["inspect", "tiny", "model.n_layers=4"], "override"),
        "unknown preset": (["inspect", "no-such-preset"], "presets"),
    }


ERROR_CASES = ["missing source", "neither format", "garbage safetensors", "jaxformer to a file",
               "unknown override key", "bad override value", "bad override syntax", "unknown preset"]


def _assert_user_error(code: int, err: str, needle: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0], err


@pytest.mark.parametrize("case", ERROR_CASES)
def test_cli_user_errors(tmp_path, capsys, case):
    args, needle = _error_cases(tmp_path)[case]
    code, _, err = main_in_process(capsys, *args)
    _assert_user_error(code, err, needle)


@pytest.mark.parametrize("case", ["missing source", "neither format", "bad override value"])
def test_cli_user_errors_subprocess(tmp_path, case):
    """The installed entry point: exit code 2 and one line on stderr, no traceback."""
    args, needle = _error_cases(tmp_path)[case]
    proc = run_cli(*args, cwd=tmp_path)
    _assert_user_error(proc.returncode, proc.stderr, needle)


# ----------------------------------------------------------------------------- save / load

_TINY = jaxformer.ModelConfig.llama(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                                    max_seq_len=32)


def _random_weights(cfg, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) * 0.05 for k, s in expected_shapes(cfg).items()}


def _assert_bit_exact(a, b):
    sa, sb = to_numpy_state_dict(a), to_numpy_state_dict(b)
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert sa[k].tobytes() == sb[k].tobytes(), k  # bits, not just values (NaN/-0.0 safe)


@pytest.mark.parametrize("cfg", [_TINY, jaxformer.ModelConfig.gpt2(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                                                                   d_ff=64, max_seq_len=32)], ids=["llama", "gpt2"])
@pytest.mark.parametrize("layout", ["dir", "file"])
def test_save_load_bit_exact(tmp_path, cfg, layout):
    model = from_state_dict(cfg, _random_weights(cfg))
    path = tmp_path / ("ckpt" if layout == "dir" else "model.safetensors")
    assert jaxformer.save(model, path) == path
    assert path.is_dir() == (layout == "dir")
    loaded = jaxformer.load(path)
    assert loaded.config == cfg
    _assert_bit_exact(model, loaded)


@pytest.mark.parametrize("layout", ["dir", "file"])
def test_save_load_bfloat16_params(tmp_path, layout):
    import jax.numpy as jnp

    cfg = jaxformer.load_model_config("tiny", ["--model.param_dtype=bfloat16"])
    model = from_state_dict(cfg, _random_weights(cfg, seed=3))  # cast to bfloat16 on the way in
    sd = to_numpy_state_dict(model)
    assert all(v.dtype == jnp.bfloat16 for v in sd.values())
    path = jaxformer.save(model, tmp_path / ("ckpt" if layout == "dir" else "m.safetensors"))
    loaded = jaxformer.load(path)
    assert loaded.config == cfg and loaded.config.param_dtype == "bfloat16"
    _assert_bit_exact(model, loaded)


def test_load_rejects_plain_safetensors(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"x": np.zeros(3, np.float32)}, str(path))
    assert not native.is_native(path)
    with pytest.raises(ValueError, match="without a jaxformer config"):
        jaxformer.load(path)
