"""The cross-check a training run makes every `train.parity_every` steps (train/run.py calls it)."""

from __future__ import annotations

import numpy as np
from flax import nnx

from jaxformer.parity.compare import logits_summary
from jaxformer.parity.sides import Inputs, TorchRefSide


def against_torch_ref(model: nnx.Module, inputs: Inputs, logits: np.ndarray) -> dict:
    """logits max|diff|, KL(p_torch || p_jax) mean and max, top-1 agreement: jaxformer's `logits` [B, T, V] (as the
    run computed them: its mesh, kernels, compute dtype) against torch_ref in float32 with `model`'s weights."""
    return logits_summary(logits, TorchRefSide(model).logits(inputs))
