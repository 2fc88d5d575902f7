"""jaxformer: transformer LLMs in JAX/Flax NNX with a PyTorch parity mirror."""

import os as _os

# Without an NVIDIA driver a CUDA plugin (the gpu-compile extra, or jax[cuda12] on a CPU box) can only fail to
# start a GPU client and log a traceback; JAX on CPU then still registers the plugin's compiler for
# `jaxformer plan` and pallas_kernels.targets. Set before JAX is first imported; an explicit setting wins.
if not _os.path.exists("/proc/driver/nvidia/version"):
    _os.environ.setdefault("JAX_PLATFORMS", "cpu")

from jaxformer.config import ModelConfig, load_config, load_model_config
from jaxformer.interop import (CheckpointMismatchError, UnsupportedCheckpointError, from_torch_state_dict, load,
                               load_hf, save, save_hf, to_torch, to_torch_state_dict)
from jaxformer.models import DecoderLM, EncoderDecoder, count_params

__version__ = "0.1.0"

__all__ = ["CheckpointMismatchError", "DecoderLM", "EncoderDecoder", "ModelConfig", "UnsupportedCheckpointError",
           "count_params", "from_torch_state_dict", "load", "load_config", "load_hf", "load_model_config", "save",
           "save_hf", "to_torch", "to_torch_state_dict"]
