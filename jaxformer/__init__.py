"""jaxformer: transformer LLMs in JAX/Flax NNX with a PyTorch parity mirror.

The names below load on first use (PEP 562), so `import jaxformer.data...` (prepare workers, the tokenizer and
data commands) does not pay for importing JAX and Flax.
"""

import importlib as _importlib
import os as _os

# Without an NVIDIA driver a CUDA plugin (the gpu-compile extra, or jax[cuda12] on a CPU box) can only fail to
# start a GPU client and log a traceback; JAX on CPU then still registers the plugin's compiler for
# `jaxformer plan` and pallas_kernels.targets. Set before JAX is first imported; an explicit setting wins.
if not _os.path.exists("/proc/driver/nvidia/version"):
    _os.environ.setdefault("JAX_PLATFORMS", "cpu")

__version__ = "0.1.0"

_EXPORTS = {
    "ModelConfig": "jaxformer.config", "load_config": "jaxformer.config", "load_model_config": "jaxformer.config",
    "CheckpointMismatchError": "jaxformer.interop", "UnsupportedCheckpointError": "jaxformer.interop",
    "from_torch_state_dict": "jaxformer.interop", "load": "jaxformer.interop", "load_hf": "jaxformer.interop",
    "save": "jaxformer.interop", "save_hf": "jaxformer.interop", "to_torch": "jaxformer.interop",
    "to_torch_state_dict": "jaxformer.interop",
    "DecoderLM": "jaxformer.models", "EncoderDecoder": "jaxformer.models", "count_params": "jaxformer.models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jaxformer' has no attribute {name!r}")
    value = getattr(_importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
