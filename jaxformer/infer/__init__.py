"""Inference: the KV-cache engine, sampling, batched generation, int8 quantization.

    model = jaxformer.infer.load_model("runs/tiny/model")          # or quantize_to="int8"
    tok = jaxformer.infer.load_tokenizer_for("runs/tiny/model")
    engine = Engine(model, max_batch=8)
    [seq] = generate(engine, [tok.encode_prompt("def ")], SamplingParams(temperature=0, max_new_tokens=64),
                     tokenizer=tok)
"""

from jaxformer.data.tokenizer import load_tokenizer_for
from jaxformer.infer.engine import Engine
from jaxformer.infer.generate import Batcher, Sequence, generate
from jaxformer.infer.quant import load_model, quantize
from jaxformer.infer.sampling import SamplingParams
from jaxformer.models.cache import KVCache

__all__ = ["Batcher", "Engine", "KVCache", "SamplingParams", "Sequence", "generate", "load_model",
           "load_tokenizer_for", "quantize"]
