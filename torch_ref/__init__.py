"""PyTorch reference mirror of jaxformer: same module tree, same parameter names, eager math."""

from torch_ref.decoder import Block, DecoderLM
from torch_ref.encdec import EncoderDecoder
from torch_ref.gemma3n import Gemma3nLM
from torch_ref.gemma4 import Gemma4LM


def module_class(cfg):
    """The torch_ref module mirroring jaxformer.models.model_class(cfg)."""
    from jaxformer.config import EncDecConfig

    if isinstance(cfg, EncDecConfig):
        return EncoderDecoder
    return {"gemma4": Gemma4LM, "gemma3n": Gemma3nLM}.get(cfg.block, DecoderLM)


__all__ = ["Block", "DecoderLM", "EncoderDecoder", "Gemma3nLM", "Gemma4LM", "module_class"]
