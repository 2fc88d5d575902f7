"""int8 weight-only quantization: numerics, the perplexity bound on a trained model, files and CLI."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.infer import Engine, SamplingParams, generate
from jaxformer.infer.quant import (QuantLinear, is_quantized, load_model, perplexity, quantize, quantize_weight, report,
                                   weight_bytes)
from jaxformer.models.layers import Linear
from tests.conftest import tiny_run


@nnx.jit
def _forward(model, tokens):
    return model(tokens)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, shards_dir):
    """A ~50k-parameter Llama trained for a few seconds on the fixture corpus (exports RUN/model + tokenizer)."""
    from jaxformer.train.lm import train

    run = tmp_path_factory.mktemp("quant") / "run"
    train(tiny_run(run, shards_dir, steps=60, lr=1e-2, eval_every=60, ckpt_every=60, model={"max_seq_len": 64}),
          progress=False)
    return run


def test_quantize_weight_is_symmetric_per_output_channel():
    w = jax.random.normal(jax.random.key(0), (6, 40)) * jnp.arange(1, 7)[:, None]
    w = w.at[3].set(0.0)  # an all-zero row keeps a finite scale
    q, scale = quantize_weight(w)
    assert q.dtype == jnp.int8 and scale.shape == (6,) and bool(jnp.all(jnp.isfinite(scale)))
    assert int(jnp.abs(q).max()) == 127 and int(q.min()) >= -127
    err = np.abs(np.asarray(w) - np.asarray(q, np.float32) * np.asarray(scale)[:, None])
    assert (err <= np.asarray(scale)[:, None] / 2 + 1e-7).all()  # round-to-nearest: at most half a step
    np.testing.assert_allclose(np.asarray(scale)[[0, 5]], np.abs(np.asarray(w)[[0, 5]]).max(1) / 127, rtol=1e-6)


def test_quant_linear_equals_dequantized_matmul():
    lin = Linear(24, 10, bias=True, axes=("mlp", "embed"), rngs=nnx.Rngs(0))
    lin.bias[...] = jnp.linspace(-1, 1, 10)
    ql = QuantLinear.from_linear(lin)
    x = np.asarray(jax.random.normal(jax.random.key(1), (3, 5, 24)))
    w = np.asarray(ql.weight[...], np.float64) * np.asarray(ql.scale[...], np.float64)[:, None]
    np.testing.assert_allclose(np.asarray(ql(jnp.asarray(x))), x @ w.T + np.asarray(lin.bias[...]), atol=1e-5)
    assert ql.weight.get_metadata()["logical_axes"] == ("mlp", "embed")


@pytest.fixture(scope="module")
def held_out(tokenizer) -> np.ndarray:
    """[24, 65] token windows of standard-library files that are not in the training corpus."""
    from jaxformer.data.corpus import stdlib_root

    ids = tokenizer.encode((stdlib_root() / "pprint.py").read_text() + (stdlib_root() / "calendar.py").read_text())
    return np.asarray(ids[:24 * 65], np.int32).reshape(24, 65)


def test_trained_model_int8_perplexity_within_two_percent(trained_run, held_out):
    model = load_model(trained_run)
    qmodel = quantize(model)
    assert is_quantized(qmodel) and not is_quantized(model)  # the original is untouched
    rep = report(model, qmodel, tokens=held_out)
    print(json.dumps(rep, indent=2))
    assert rep["eval_tokens"] == 24 * 64
    untrained = perplexity(quantize(type(model)(model.config, rngs=nnx.Rngs(0))), held_out)
    assert rep["ppl_fp32"] < 0.5 * untrained  # the bound is measured on a model that learned something
    assert rep["ppl_int8"] <= 1.02 * rep["ppl_fp32"]
    assert 0.9 <= rep["greedy_agreement"] <= 1.0
    mem = weight_bytes(qmodel)
    assert rep["linear_bytes_int8"] == mem["linear"] < 0.3 * rep["linear_bytes_fp32"]
    assert rep["weight_bytes_int8"] < rep["weight_bytes_fp32"]


def test_quantize_cli_saves_a_loadable_model_that_the_engine_runs(trained_run, tmp_path, capsys):
    from jaxformer.cli import main

    main(["quantize", "--ckpt", str(trained_run), "--out", str(tmp_path / "q"), "--windows", "8"])
    out = json.loads(capsys.readouterr().out)
    assert out["weight_bytes_int8"] < out["weight_bytes_fp32"]
    assert "greedy_agreement" in out and out["ppl_int8"] <= 1.05 * out["ppl_fp32"]  # the run's own val shards
    assert (tmp_path / "q" / "tokenizer.json").exists()

    loaded = load_model(tmp_path / "q")
    direct = quantize(load_model(trained_run))
    on_load = load_model(trained_run, quantize_to="int8")
    tokens = jax.random.randint(jax.random.key(0), (2, 20), 0, loaded.config.vocab_size)
    for other in (direct, on_load):
        np.testing.assert_array_equal(np.asarray(_forward(loaded, tokens)), np.asarray(_forward(other, tokens)))
    weights = dict(nnx.to_flat_state(nnx.state(loaded, nnx.Param)))
    assert weights[("layers", 0, "self_attn", "q_proj", "weight")][...].dtype == jnp.int8
    assert ("layers", 0, "self_attn", "q_proj", "scale") in weights  # names kept, scale beside the weight

    # the KV-cache engine on the quantized model equals its uncached greedy forward
    prompt = [5, 17, 33, 2, 40]
    [seq] = generate(Engine(loaded, max_batch=4), [prompt], SamplingParams(temperature=0.0, max_new_tokens=10))
    buf = np.zeros((1, loaded.config.max_seq_len), np.int32)  # fixed shape: one compile
    buf[0, :len(prompt)] = prompt
    for t in range(len(prompt), len(prompt) + 10):
        buf[0, t] = int(jnp.argmax(_forward(loaded, jnp.asarray(buf))[0, t - 1]))
    assert seq.tokens == list(buf[0, len(prompt):len(prompt) + 10])
