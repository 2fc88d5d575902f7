"""PyTorch reference mirror of jaxformer: same module tree, same parameter names, eager math."""

from torch_ref.decoder import Block, DecoderLM
from torch_ref.encdec import EncoderDecoder
from torch_ref.gemma4 import Gemma4LM


def module_class(cfg):
    """The torch_ref module mirroring jaxformer.models.model_class(cfg)."""
    from jaxformer.config import EncDecConfig

    if isinstance(cfg, EncDecConfig):
        return EncoderDecoder
    return Gemma4LM if cfg.block == "gemma4" else DecoderLM


__all__ = ["Block", "DecoderLM", "EncoderDecoder", "Gemma4LM", "module_class"]
