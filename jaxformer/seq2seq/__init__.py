"""The encoder-decoder task: source -> target pairs, training, beam search, BLEU / ROUGE evaluation.

    from jaxformer.seq2seq import train
    train(jaxformer.load_config("seq2seq_code2doc"))     # or `jaxformer train --config seq2seq_code2doc`
"""

from jaxformer.seq2seq.beam import beam_search, greedy_decode
from jaxformer.seq2seq.evaluate import evaluate_checkpoint, evaluate_seq2seq
from jaxformer.seq2seq.task import train

__all__ = ["beam_search", "evaluate_checkpoint", "evaluate_seq2seq", "greedy_decode", "train"]
