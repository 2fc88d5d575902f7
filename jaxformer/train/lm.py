"""Language-model pretraining: token shards -> a decoder-only LM, through the run skeleton (train.run).

What this task supplies: the data (a tokenizer and shards, built on first use), the sharded train state,
the next-token step, the held-out evaluation (loss, perplexity, bits per byte) and, at the end, the
exported model with its tokenizer and a sample drawn through the inference engine. `evaluate_checkpoint`
is `jaxformer eval` for a language model.

RUN_DIR/ after a finished run: model/ (jaxformer format + tokenizer files), metrics.jsonl, tb/, loss.png,
checkpoints/.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxformer.checkpoint import read_run_config
from jaxformer.config import DataConfig, EncDecConfig, MeshConfig, ModelConfig, TrainConfig
from jaxformer.data.build import ensure_data, open_mixture
from jaxformer.data.pipeline import DataIterator, MixtureIterator, make_dataset, make_mixture_dataset
from jaxformer.data.shards import SplitTokens, open_split
from jaxformer.data.tokenizer import Tokenizer, copy_tokenizer_files
from jaxformer.infer import Engine, SamplingParams, generate
from jaxformer.interop import native
from jaxformer.models.ring_attention import check_length
from jaxformer.sharding import make_mesh
from jaxformer.train.flops import train_flops_per_token
from jaxformer.train.metrics import plot_losses
from jaxformer.train.optim import make_optimizer
from jaxformer.train.run import Setup, eval_batch_size, mean_loss, run, say, windows
from jaxformer.train.state import gather_to_host, init_train_state
from jaxformer.train.step import balance_router_biases, lm_loss, make_eval_step, make_train_step

EVAL_SEED = 1234


def train(cfgs: dict[str, Any], *, resume: bool = False, progress: bool = True) -> dict:
    """Pretrain per the run config (model, data, train, mesh); returns the final metrics (files under run_dir)."""
    mcfg: ModelConfig = cfgs["model"]
    if isinstance(mcfg, EncDecConfig):
        raise ValueError("this is an encoder-decoder config: train it with jaxformer.seq2seq.train (or `jaxformer "
                         "train`, which picks the task from the config)")
    if cfgs["data"].seq_len > mcfg.max_seq_len:
        raise ValueError(f"data.seq_len={cfgs['data'].seq_len} exceeds model.max_seq_len={mcfg.max_seq_len}")
    if cfgs.get("mesh", MeshConfig()).context > 1:  # before any data or compile work
        check_length(cfgs["data"].seq_len, cfgs["mesh"].context)
    return run(Pretraining(cfgs, progress=progress), cfgs, resume=resume, progress=progress)


class Pretraining:
    """The run skeleton's task for next-token pretraining on token shards."""

    resume_sections = {"model": None, "data": None}

    def __init__(self, cfgs: dict[str, Any], *, progress: bool = True):
        self.cfgs, self.progress = cfgs, progress
        self.model_config: ModelConfig = cfgs["model"]
        self.graphdef: nnx.GraphDef | None = None
        self.data_dir: Path | None = None
        self.tok: Tokenizer | None = None

    def setup(self, mesh: Mesh) -> Setup:
        mcfg, dcfg, tcfg = self.model_config, self.cfgs["data"], self.cfgs["train"]
        lead = jax.process_index() == 0
        if dcfg.mixture:
            sources, self.tok = open_mixture(dcfg)
            self.data_dir = sources[0][1]  # its tokenizer files go with the model
        else:
            self.data_dir, self.tok = ensure_data(dcfg, mcfg.vocab_size, progress=self.progress and lead)
            sources = [("data", self.data_dir, 1.0)]
        if self.tok.vocab_size > mcfg.vocab_size:
            raise ValueError(f"tokenizer has {self.tok.vocab_size} tokens but model.vocab_size={mcfg.vocab_size}; "
                             f"set --model.vocab_size={self.tok.vocab_size} or more")
        val_splits = {name: (open_split(d, "val"), w) for name, d, w in sources}
        it = train_iterator(sources, dcfg, tcfg.batch_size)
        val_split = next(iter(val_splits.values()))[0]
        tx = make_optimizer(tcfg)
        self.graphdef, state, shardings = init_train_state(mcfg, tx, mesh, tcfg.seed)
        loss = lm_loss(self.graphdef, packed=dcfg.packed, z_loss=tcfg.z_loss,
                       loss_chunk=tcfg.loss_chunk)
        balance = balance_router_biases(mcfg) if mcfg.moe.bias_update_rate else None
        train_fn = jax.jit(make_train_step(loss, tx, grad_accum=tcfg.grad_accum, after_update=balance),
                           out_shardings=(shardings["params"], shardings["opt_state"], None), donate_argnums=(0, 1))
        eval_fn = jax.jit(make_eval_step(loss))
        return Setup(state=state, iterator=it, step=lambda p, o, batch, step, limits: train_fn(p, o, batch, (), limits),
                     evaluate=lambda p: evaluate_sources(eval_fn, p, val_splits, dcfg, tcfg.batch_size,
                                                         tcfg.eval_batches, mesh),
                     flops_per_token=train_flops_per_token(mcfg, dcfg.seq_len),
                     meta={"tokenizer_sha256": self.tok.sha256()},
                     parity_batch=held_out_batch(val_split, dcfg, mesh) if tcfg.parity_every else None)

    def model(self, params: Any) -> nnx.Module:
        return nnx.merge(self.graphdef, gather_to_host(params))

    def export(self, model: nnx.Module, result: dict) -> dict:
        run_dir, tcfg = Path(self.cfgs["train"].run_dir), self.cfgs["train"]
        export = native.save(model, run_dir / "model")
        copy_tokenizer_files(self.data_dir, export)
        out = {"model_dir": str(export), "loss_plot": str(plot_losses(run_dir))}
        if tcfg.sample_tokens:
            out["sample"] = tcfg.sample_prompt + draw_sample(model, self.tok, tcfg)
            say("sample:\n" + out["sample"])
        return out


def draw_sample(model: nnx.Module, tok: Tokenizer, tcfg: TrainConfig) -> str:
    """A continuation of tcfg.sample_prompt (after BOS) by the inference engine, as the CLI and server decode."""
    prompt = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(tcfg.sample_prompt)
    params = SamplingParams(max_new_tokens=tcfg.sample_tokens, temperature=tcfg.sample_temperature,
                            top_k=tcfg.sample_top_k, seed=tcfg.seed)
    [seq] = generate(Engine(model, max_batch=1), [prompt], params, tokenizer=tok, stop_ids=tok.eos_ids)
    return seq.text


def train_iterator(sources: list[tuple[str, Path, float]], data: DataConfig, batch_size: int) -> DataIterator:
    """This process's batches of the training windows: one prepared directory, or a weighted mixture of several."""
    where = dict(process_index=jax.process_index(), process_count=jax.process_count())
    splits = [open_split(d, "train") for _, d, _ in sources]
    if not data.mixture:
        return DataIterator(make_dataset(splits[0], seq_len=data.seq_len, batch_size=batch_size, packed=data.packed,
                                         seed=data.seed, **where))
    ds, pattern = make_mixture_dataset(splits, [w for _, _, w in sources], seq_len=data.seq_len,
                                       batch_size=batch_size, packed=data.packed, seed=data.seed, **where)
    return MixtureIterator(ds, pattern, [name for name, _, _ in sources], batch_size, data.seq_len)


def evaluate_sources(eval_fn, params, splits: dict[str, tuple[SplitTokens, float]], data: DataConfig,
                     batch_size: int, max_batches: int, mesh: Mesh) -> dict:
    """evaluate_lm on one validation split; for a mixture, on each source's (its share of the batches, at least
    one) with val_loss/<source>, val_bpb/<source>, and val_loss, val_bpb as their means under the weights."""
    if len(splits) == 1 and not data.mixture:
        return evaluate_lm(eval_fn, params, next(iter(splits.values()))[0], data, batch_size, max_batches, mesh)
    out: dict[str, float] = {"val_loss": 0.0, "val_bpb": 0.0, "val_tokens": 0.0}
    for name, (split, weight) in splits.items():
        one = evaluate_lm(eval_fn, params, split, data, batch_size, max(1, max_batches // len(splits)), mesh)
        out.update({f"val_loss/{name}": one["val_loss"], f"val_bpb/{name}": one["val_bpb"]})
        out["val_loss"] += weight * one["val_loss"]
        out["val_bpb"] += weight * one["val_bpb"]
        out["val_tokens"] += one["val_tokens"]
    out["val_ppl"] = math.exp(min(out["val_loss"], 50.0))
    return out


def evaluate_lm(eval_fn, params, split: SplitTokens, data: DataConfig, batch_size: int, max_batches: int,
                mesh: Mesh) -> dict:
    """Validation loss, perplexity and bits per byte on `max_batches` held-out batches.

    The windows are a fixed-seed random sample of the whole split (the same every call), so a few
    batches estimate the split's loss without the bias of its first documents.
    """
    n_windows = max(1, (split.n_tokens - 1) // data.seq_len)
    ds = make_dataset(split, seq_len=data.seq_len, batch_size=eval_batch_size(batch_size, mesh, n_windows),
                      packed=data.packed, shuffle=True, seed=EVAL_SEED, repeat=False,
                      process_index=jax.process_index(), process_count=jax.process_count())
    out = mean_loss(eval_fn, params, windows(ds[:max_batches]), mesh)
    # bits per byte: nats/token -> bits/token, times this split's tokens per UTF-8 byte
    out["val_bpb"] = out["val_loss"] / math.log(2) * split.n_tokens / max(split.n_bytes, 1)
    return out


def held_out_batch(split: SplitTokens, data: DataConfig, mesh: Mesh) -> dict:
    """The first of evaluate_lm's held-out windows, one row per batch shard of the mesh, the same on every process
    (train.parity_every's fixed batch)."""
    return make_dataset(split, seq_len=data.seq_len, batch_size=eval_batch_size(1, mesh), packed=data.packed,
                        shuffle=True, seed=EVAL_SEED, repeat=False)[0]


def evaluate_checkpoint(model: nnx.Module, src: str | Path, *, data_dir: str | None = None, split: str = "val",
                        seq_len: int | None = None, batch_size: int = 16, batches: int = 50) -> dict:
    """`jaxformer eval` for a language model: held-out loss, perplexity and bits/byte on one device.

    The data settings are the run's (when `src` is a run directory), with data_dir / seq_len overridden; a run
    trained on a mixture is evaluated on each of its sources (unless data_dir names one directory).
    """
    run_cfg = read_run_config(src) or {}
    data = DataConfig(**run_cfg["data"]) if "data" in run_cfg else DataConfig()
    if data_dir:
        data = dataclasses.replace(data, data_dir=data_dir, mixture=None)
    data = dataclasses.replace(data, seq_len=min(seq_len or data.seq_len, model.config.max_seq_len))
    sources = open_mixture(data)[0] if data.mixture else [("data", Path(data.data_dir), 1.0)]
    graphdef, params = nnx.split(model)
    eval_fn = jax.jit(make_eval_step(lm_loss(graphdef, packed=data.packed)))
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        out = evaluate_sources(eval_fn, params, {n: (open_split(d, split), w) for n, d, w in sources}, data,
                               batch_size, batches, mesh)
    return {"split": split, "data_dir": data.mixture or data.data_dir, **out}
