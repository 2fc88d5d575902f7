"""The models: a decoder-only LM for every family one ModelConfig describes, and the encoder-decoder.

    model = model_class(cfg)(cfg, rngs=nnx.Rngs(0))
    logits = model(tokens)                          # DecoderLM: [B, T] -> [B, T, V] float32
    logits, cache = model.extend(tokens, cache)     # the same, continuing sequences held in a KVCache

Model code names axes logically and never sees a mesh (jaxformer.sharding lays them out).
"""

from flax import nnx

from jaxformer.config import EncDecConfig, ModelConfig
from jaxformer.models.cache import CachedLogits, KVCache
from jaxformer.models.decoder import DecoderLM, count_params
from jaxformer.models.encdec import EncoderDecoder
from jaxformer.models.gemma3n import Gemma3nLM
from jaxformer.models.gemma4 import Gemma4LM


def model_class(cfg: ModelConfig) -> type[nnx.Module]:
    """The model a config describes: EncoderDecoder for an EncDecConfig, Gemma4LM / Gemma3nLM for blocks 'gemma4' /
    'gemma3n', DecoderLM otherwise."""
    if isinstance(cfg, EncDecConfig):
        return EncoderDecoder
    return {"gemma4": Gemma4LM, "gemma3n": Gemma3nLM}.get(cfg.block, DecoderLM)


__all__ = ["CachedLogits", "DecoderLM", "EncoderDecoder", "Gemma3nLM", "Gemma4LM", "KVCache", "count_params", "model_class"]
