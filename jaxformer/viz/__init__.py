"""`jaxformer viz`: figures of what a decoder LM does with a prompt, for learners (docs/tour.md).

    from jaxformer.viz import visualize
    visualize("runs/tiny_code", "def fib(n):", "viz/")   # tokens, embeddings, attention, positions,
                                                         # residual_norms, next_token_loss, logit_lens (.png),
                                                         # index.html

analysis.py computes the numbers with the model's own modules from the residual stream that the decoder's
`capture` records (the mechanism `jaxformer parity` uses); figures.py draws them with matplotlib.
"""

from jaxformer.viz.command import run, visualize

__all__ = ["run", "visualize"]
