"""ONNX export through torch_ref: tokens [batch, seq] int64 -> logits [batch, seq, vocab] float32.

jaxformer's weights load into torch_ref (same parameter names), torch.onnx.export (the dynamo
exporter, which needs onnxscript) traces it with dynamic batch and sequence axes, and
onnxruntime checks the file against jaxformer's own forward pass.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

OPSET = 18


def export_onnx(model, path: str | Path, *, opset: int = OPSET) -> Path:
    """Write `model` (a float jaxformer DecoderLM) as ONNX with dynamic batch and sequence axes."""
    import torch

    from jaxformer.interop import to_torch

    if any(type(m).__name__ == "QuantLinear" for m in _modules(model)):
        raise ValueError("ONNX export takes a float model; export the checkpoint before quantizing it")
    cfg = model.config
    if cfg.param_dtype != "float32" or cfg.compute_dtype != "float32":
        model_cfg = "param_dtype/compute_dtype"
        raise ValueError(f"ONNX export is float32 only; load the model with {model_cfg}=float32")
    module = to_torch(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randint(0, cfg.vocab_size, (2, min(8, cfg.max_seq_len)), dtype=torch.int64)
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=1, max=cfg.max_seq_len)
    with torch.no_grad():
        program = torch.onnx.export(module, (example,), dynamo=True, opset_version=opset,
                                    input_names=["tokens"], output_names=["logits"],
                                    dynamic_shapes={"tokens": {0: batch, 1: seq}}, verbose=False)
    program.save(str(path))
    return path


def _modules(model):
    from flax import nnx

    return [m for _, m in nnx.iter_modules(model)]


def run_onnx(path: str | Path, tokens: np.ndarray) -> np.ndarray:
    """Logits [B, T, V] from onnxruntime (CPU) for int tokens [B, T]."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"tokens": np.asarray(tokens, np.int64)})[0]


def verify_onnx(model, path: str | Path, shapes=((1, 5), (3, 17)), seed: int = 0) -> float:
    """Largest |onnxruntime - jaxformer| logit difference over random tokens of the given shapes."""
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    worst = 0.0
    for B, T in shapes:
        T = min(T, model.config.max_seq_len)
        tokens = rng.integers(0, model.config.vocab_size, (B, T))
        ours = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
        worst = max(worst, float(np.abs(run_onnx(path, tokens) - ours).max()))
    return worst
