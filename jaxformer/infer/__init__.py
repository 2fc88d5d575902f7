"""Inference: KV cache, sampling, the batched engine, int8 quantization.

    model = jaxformer.infer.load_model("runs/tiny/model")          # or quantize_to="int8"
    engine = Engine(model, max_batch=8)
    [seq] = generate(engine, [prompt_ids], SamplingParams(temperature=0, max_new_tokens=64))
"""

from jaxformer.infer.cache import KVCache
from jaxformer.infer.engine import Engine
from jaxformer.infer.generate import Batcher, Sequence, generate
from jaxformer.infer.quant import load_model, quantize
from jaxformer.infer.sampling import SamplingParams, generate_uncached, sample_logits
from jaxformer.infer.text import TextTokenizer, load_text_tokenizer

__all__ = ["Batcher", "Engine", "KVCache", "SamplingParams", "Sequence", "TextTokenizer", "generate",
           "generate_uncached", "load_model", "load_text_tokenizer", "quantize", "sample_logits"]
