"""ONNX export through torch_ref: onnxruntime logits equal jaxformer's (fp32), at any batch and length."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import onnx
import pytest
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.interop import native
from jaxformer.interop.onnx import export_onnx, run_onnx
from jaxformer.models import DecoderLM


def test_onnx_llama_gqa_matches_jaxformer_with_dynamic_axes(tmp_path):
    cfg = ModelConfig.llama(vocab_size=211, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, d_ff=96,
                            max_seq_len=40)
    model = DecoderLM(cfg, rngs=nnx.Rngs(0))
    path = export_onnx(model, tmp_path / "llama.onnx")
    dims = [d.dim_param or d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert all(isinstance(d, str) and d for d in dims)  # batch and sequence are symbolic
    rng = np.random.default_rng(0)
    for B, T in ((1, 1), (3, 17), (2, 40)):  # none of them the shape traced at export
        tokens = rng.integers(0, cfg.vocab_size, (B, T))
        ours = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
        np.testing.assert_allclose(run_onnx(path, tokens), ours, rtol=0, atol=1e-4)


def test_export_cli_gpt2(tmp_path, capsys):
    from jaxformer.cli import main

    cfg = ModelConfig.gpt2(vocab_size=150, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32)
    native.save(DecoderLM(cfg, rngs=nnx.Rngs(1)), tmp_path / "m")
    main(["export", "onnx", "--ckpt", str(tmp_path / "m"), "--out", str(tmp_path / "m.onnx")])
    out = json.loads(capsys.readouterr().out)
    assert out["max_abs_diff_vs_jaxformer"] <= 1e-4 and (tmp_path / "m.onnx").stat().st_size > 10_000


def test_export_refuses_quantized_models(tmp_path):
    from jaxformer.infer.quant import quantize

    cfg = ModelConfig.llama(vocab_size=64, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=16)
    with pytest.raises(ValueError, match="float model"):
        export_onnx(quantize(DecoderLM(cfg, rngs=nnx.Rngs(0))), tmp_path / "q.onnx")
