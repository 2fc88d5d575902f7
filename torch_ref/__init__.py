"""PyTorch reference mirror of jaxformer: same module tree, same parameter names, eager math."""

from torch_ref.model import Block, DecoderLM

__all__ = ["Block", "DecoderLM"]
