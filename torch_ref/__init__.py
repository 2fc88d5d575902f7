"""PyTorch reference mirror of jaxformer: same module tree, same parameter names, eager math."""

from torch_ref.encdec import EncoderDecoder
from torch_ref.model import Block, DecoderLM

__all__ = ["Block", "DecoderLM", "EncoderDecoder"]
