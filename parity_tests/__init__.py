"""Parity suite: jaxformer vs torch_ref vs Hugging Face transformers (see conftest.py for tolerances)."""
