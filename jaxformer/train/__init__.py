"""Training: the run skeleton every task runs through, steps, losses, optimizer, metrics, and LM pretraining.

    from jaxformer.train.lm import train          # pretraining (jaxformer.seq2seq / .finetune: the other tasks)
    train(jaxformer.load_config("tiny_code"))
"""
