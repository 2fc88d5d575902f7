"""jaxformer: transformer LLMs in JAX/Flax NNX with a PyTorch parity mirror."""

from jaxformer.xla_flags import apply_xla_defaults

apply_xla_defaults()  # before any JAX backend starts (see jaxformer/xla_flags.py)

from jaxformer.config import ModelConfig, load_config, load_model_config  # noqa: E402
from jaxformer.interop import (CheckpointMismatchError, UnsupportedCheckpointError,  # noqa: E402
                               from_torch_state_dict, load, load_hf, save, save_hf, to_torch, to_torch_state_dict)
from jaxformer.models import DecoderLM, EncoderDecoder, count_params  # noqa: E402

__version__ = "0.1.0"

__all__ = ["CheckpointMismatchError", "DecoderLM", "EncoderDecoder", "ModelConfig", "UnsupportedCheckpointError",
           "count_params", "from_torch_state_dict", "load", "load_config", "load_hf", "load_model_config", "save",
           "save_hf", "to_torch", "to_torch_state_dict"]
