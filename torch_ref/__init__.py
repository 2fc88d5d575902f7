"""PyTorch reference mirror of jaxformer: same module tree, same parameter names, eager math."""

from torch_ref.decoder import Block, DecoderLM
from torch_ref.encdec import EncoderDecoder

__all__ = ["Block", "DecoderLM", "EncoderDecoder"]
