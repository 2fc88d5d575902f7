"""Weights in and out: torch_ref state dicts, Hugging Face directories, jaxformer's own files."""

from jaxformer.interop.hf import UnsupportedCheckpointError, config_from_hf, config_to_hf, load_hf, save_hf
from jaxformer.interop.native import load, save
from jaxformer.interop.state_dict import (CheckpointMismatchError, from_state_dict, from_torch_state_dict,
                                          to_numpy_state_dict, to_torch_state_dict)
from jaxformer.models.quant_layers import dequantized_model, is_quantized


def to_torch(model):
    """A torch_ref module with the same config and weights as the jaxformer `model` (a quantized model's
    weights dequantized: the float twin its quantized matmuls must match)."""
    import torch_ref

    if is_quantized(model):
        model = dequantized_model(model)

    module = torch_ref.module_class(model.config)(model.config)
    module.load_state_dict(to_torch_state_dict(model), strict=True)
    return module.eval()


__all__ = ["CheckpointMismatchError", "UnsupportedCheckpointError", "config_from_hf", "config_to_hf",
           "from_state_dict", "from_torch_state_dict", "load", "load_hf", "save", "save_hf", "to_numpy_state_dict",
           "to_torch", "to_torch_state_dict"]
