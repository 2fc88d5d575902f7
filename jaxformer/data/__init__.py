"""Corpus reading, tokenizer training, token shards and grain input pipelines."""
