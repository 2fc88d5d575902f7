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
from jaxformer.data.build import ensure_data
from jaxformer.data.pipeline import DataIterator, make_dataset
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
from jaxformer.train.step import lm_loss, make_eval_step, make_train_step

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
        self.data_dir, self.tok = ensure_data(dcfg, mcfg.vocab_size, progress=self.progress and lead)
        if self.tok.vocab_size > mcfg.vocab_size:
            raise ValueError(f"tokenizer has {self.tok.vocab_size} tokens but model.vocab_size={mcfg.vocab_size}; "
                             f"set --model.vocab_size={self.tok.vocab_size} or more")
        train_split, val_split = open_split(self.data_dir, "train"), open_split(self.data_dir, "val")
        it = DataIterator(make_dataset(train_split, seq_len=dcfg.seq_len, batch_size=tcfg.batch_size,
                                       packed=dcfg.packed, seed=dcfg.seed, process_index=jax.process_index(),
                                       process_count=jax.process_count()))
        tx = make_optimizer(tcfg)
        self.graphdef, state, shardings = init_train_state(mcfg, tx, mesh, tcfg.seed)
        loss = lm_loss(self.graphdef, packed=dcfg.packed, z_loss=tcfg.z_loss)
        train_fn = jax.jit(make_train_step(loss, tx, grad_accum=tcfg.grad_accum),
                           out_shardings=(shardings["params"], shardings["opt_state"], None), donate_argnums=(0, 1))
        eval_fn = jax.jit(make_eval_step(loss))
        return Setup(state=state, iterator=it, step=lambda p, o, batch, step, limits: train_fn(p, o, batch, (), limits),
                     evaluate=lambda p: evaluate_lm(eval_fn, p, val_split, dcfg, tcfg.batch_size, tcfg.eval_batches,
                                                    mesh),
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

    The data settings are the run's (when `src` is a run directory), with data_dir / seq_len overridden.
    """
    run_cfg = read_run_config(src) or {}
    data = DataConfig(**run_cfg["data"]) if "data" in run_cfg else DataConfig()
    if data_dir:
        data = dataclasses.replace(data, data_dir=data_dir)
    data = dataclasses.replace(data, seq_len=min(seq_len or data.seq_len, model.config.max_seq_len))
    graphdef, params = nnx.split(model)
    eval_fn = jax.jit(make_eval_step(lm_loss(graphdef, packed=data.packed)))
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        out = evaluate_lm(eval_fn, params, open_split(data.data_dir, split), data, batch_size, batches, mesh)
    return {"split": split, "data_dir": data.data_dir, **out}
