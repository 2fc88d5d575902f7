"""Seq2seq training of the encoder-decoder through the run skeleton (jaxformer.train.run).

What this task supplies: source -> target pairs (jaxformer.seq2seq.data; the code2doc task is built on
first use), the label-smoothed step with dropout (jaxformer.seq2seq.step), the validation loss, and at
the end the exported model plus the held-out report (jaxformer.seq2seq.evaluate: beam search, BLEU,
ROUGE, perplexity, and a trivial baseline), written to RUN_DIR/eval_SPLIT.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxformer.config import EncDecConfig, Seq2SeqConfig
from jaxformer.data.pipeline import DataIterator
from jaxformer.data.tokenizer import Tokenizer, copy_tokenizer_files
from jaxformer.interop import native
from jaxformer.seq2seq.data import Pairs, ensure_seq2seq_data, eval_dataset, load_split, train_dataset
from jaxformer.seq2seq.evaluate import evaluate_seq2seq, print_report
from jaxformer.seq2seq.step import flops_per_target_token, seq2seq_loss
from jaxformer.train.metrics import plot_losses
from jaxformer.train.optim import make_optimizer
from jaxformer.train.run import Setup, eval_batch_size, mean_loss, run, say, windows
from jaxformer.train.state import gather_to_host, init_train_state
from jaxformer.train.step import make_eval_step, make_train_step

# seq2seq settings that decide the data a run sees; a resume must keep them
DATA_KEYS = ("data_dir", "task", "tokenizer", "max_source_len", "max_target_len", "split_identifiers",
             "truecase_targets", "min_bucket", "seed")


def train(cfgs: dict[str, Any], *, resume: bool = False, progress: bool = True) -> dict:
    """Train an encoder-decoder per the run config (model, seq2seq, train, mesh); returns the final metrics."""
    mcfg, scfg = cfgs["model"], cfgs["seq2seq"]
    if not isinstance(mcfg, EncDecConfig):
        raise ValueError("seq2seq training needs an encoder-decoder model section (model.n_encoder_layers)")
    for name in ("max_source_len", "max_target_len"):
        if getattr(scfg, name) > mcfg.max_seq_len:
            raise ValueError(f"seq2seq.{name}={getattr(scfg, name)} exceeds model.max_seq_len={mcfg.max_seq_len}")
    if cfgs["train"].loss_chunk:
        raise ValueError(f"train.loss_chunk={cfgs['train'].loss_chunk} is for decoder-only models: the "
                         f"encoder-decoder's loss reads its whole logits (logits bias, copy head, label smoothing); "
                         f"drop the option")
    return run(Seq2SeqTraining(cfgs, progress=progress), cfgs, resume=resume, progress=progress)


class Seq2SeqTraining:
    """The run skeleton's task for source -> target pairs."""

    resume_sections = {"model": None, "seq2seq": DATA_KEYS}

    def __init__(self, cfgs: dict[str, Any], *, progress: bool = True):
        self.cfgs, self.progress = cfgs, progress
        self.model_config: EncDecConfig = cfgs["model"]
        self.graphdef: nnx.GraphDef | None = None
        self.data_dir: Path | None = None
        self.tok: Tokenizer | None = None

    def setup(self, mesh: Mesh) -> Setup:
        mcfg, scfg, tcfg = self.model_config, self.cfgs["seq2seq"], self.cfgs["train"]
        self.data_dir, self.tok = ensure_seq2seq_data(scfg, mcfg.vocab_size,
                                                      progress=self.progress and jax.process_index() == 0)
        check_tokenizer(self.tok, mcfg)
        train_pairs, val_pairs = (load_split(self.data_dir, s, self.tok, scfg) for s in ("train", "val"))
        say(f"{len(train_pairs):,} train / {len(val_pairs):,} val pairs from {self.data_dir}")
        it = DataIterator(train_dataset(train_pairs, scfg, tcfg.batch_size, pad_id=mcfg.pad_id,
                                        start_id=mcfg.decoder_start_id, process_index=jax.process_index(),
                                        process_count=jax.process_count()))
        tx = make_optimizer(tcfg)
        self.graphdef, state, shardings = init_train_state(mcfg, tx, mesh, tcfg.seed)
        loss = seq2seq_loss(self.graphdef, label_smoothing=scfg.label_smoothing)
        update = make_train_step(loss, tx, grad_accum=tcfg.grad_accum)

        def step(params, opt_state, batch, rng, step, limits):  # dropout keys: fold_in(run key, step)
            return update(params, opt_state, batch, jax.random.fold_in(jax.random.wrap_key_data(rng), step), limits)

        step_fn = jax.jit(step, out_shardings=(shardings["params"], shardings["opt_state"], None),
                          donate_argnums=(0, 1))
        eval_fn = jax.jit(make_eval_step(loss))
        setup = Setup(state=state, iterator=it, step=None,
                      evaluate=lambda p: evaluate_loss(eval_fn, p, val_pairs, scfg, mcfg, tcfg.batch_size, mesh,
                                                       max_examples=tcfg.eval_batches * tcfg.batch_size),
                      flops_per_token=flops_per_target_token(mcfg, train_pairs),
                      meta={"tokenizer_sha256": self.tok.sha256()})
        # the run's key as checkpointed: after a resume, the restored state's
        setup.step = lambda p, o, batch, n, limits: step_fn(p, o, batch, setup.state["rng"], n, limits)
        return setup

    def model(self, params: Any) -> nnx.Module:
        return nnx.merge(self.graphdef, gather_to_host(params))

    def export(self, model: nnx.Module, result: dict) -> dict:
        scfg, run_dir = self.cfgs["seq2seq"], Path(self.cfgs["train"].run_dir)
        export = native.save(model, run_dir / "model")
        copy_tokenizer_files(self.data_dir, export)
        out = {"model_dir": str(export), "loss_plot": str(plot_losses(run_dir))}
        report = evaluate_seq2seq(model, self.tok, load_split(self.data_dir, scfg.eval_split, self.tok, scfg), scfg,
                                  split=scfg.eval_split)
        path = run_dir / f"eval_{scfg.eval_split}.json"
        print_report(report, path)
        return {**out, "eval": report, "eval_json": str(path)}


def evaluate_loss(eval_fn, params, pairs: Pairs, cfg: Seq2SeqConfig, model_cfg: EncDecConfig, batch_size: int,
                  mesh: Mesh, max_examples: int | None = None) -> dict:
    """Validation cross-entropy per target token and perplexity over (the first max_examples of) a split."""
    ds = eval_dataset(pairs, cfg, eval_batch_size(batch_size, mesh), pad_id=model_cfg.pad_id,
                      start_id=model_cfg.decoder_start_id, max_examples=max_examples,
                      process_index=jax.process_index(), process_count=jax.process_count())
    return mean_loss(eval_fn, params, windows(ds), mesh, None)


def check_tokenizer(tok: Tokenizer, cfg: EncDecConfig) -> None:
    """The tokenizer must fit the vocabulary and use the model's pad and EOS ids."""
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but model.vocab_size={cfg.vocab_size}; "
                         f"set --model.vocab_size={tok.vocab_size} or more")
    if (tok.pad_id, tok.eos_id) != (cfg.pad_id, cfg.eos_id):
        raise ValueError(f"tokenizer pad/eos ids ({tok.pad_id}, {tok.eos_id}) differ from the model's "
                         f"model.pad_id={cfg.pad_id}, model.eos_id={cfg.eos_id}")
