"""jaxformer: transformer LLMs in JAX/Flax NNX with a PyTorch parity mirror."""

from jaxformer.config import ModelConfig, load_config, load_model_config
from jaxformer.interop import (CheckpointMismatchError, UnsupportedCheckpointError, from_torch_state_dict, load,
                               load_hf, save, save_hf, to_torch, to_torch_state_dict)
from jaxformer.models import DecoderLM, EncoderDecoder, count_params

__version__ = "0.1.0"

__all__ = ["CheckpointMismatchError", "DecoderLM", "EncoderDecoder", "ModelConfig", "UnsupportedCheckpointError",
           "count_params", "from_torch_state_dict", "load", "load_config", "load_hf", "load_model_config", "save",
           "save_hf", "to_torch", "to_torch_state_dict"]
