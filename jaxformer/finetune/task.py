"""Fine-tuning: base weights + (LoRA adapters | all params) trained on SFT rows through the run skeleton.

What this task supplies: the base model and its tokenizer, the chat / prompt-completion rows
(jaxformer.finetune.sft), the trainable / frozen split (the same LM step as pretraining, the frozen
states passed in untouched, LoRA dropout keys folded with the step number), the held-out task loss,
and at the end the merged model, the PEFT adapter and a few held-out prompts answered. A LoRA
checkpoint holds only the adapters and their optimizer state; the frozen base is reloaded from
`sft.base` on resume and checked against a fingerprint.

RUN_DIR/ after a finished run:
  model/      the merged (or fully fine-tuned) model in jaxformer format + tokenizer files:
              `jaxformer serve --ckpt RUN_DIR/model`, `jaxformer convert --to hf RUN_DIR/model ...`
  adapter/    (LoRA, bases of a Hugging Face family) the adapter alone in Hugging Face PEFT format
  metrics.jsonl, tb/, loss.png, checkpoints/
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxformer import sharding
from jaxformer.data.pipeline import DataIterator
from jaxformer.data.tokenizer import Tokenizer, copy_tokenizer_files, load_tokenizer_for
from jaxformer.finetune import sft
from jaxformer.finetune.lora import (apply_lora, merge_lora, set_dropout, split_trainable, step_dropout_keys,
                                     trainable_report)
from jaxformer.finetune.peft import hf_projections, save_peft
from jaxformer.infer import Engine, SamplingParams, generate
from jaxformer.interop import native
from jaxformer.interop.auto import load_any
from jaxformer.train.flops import train_flops_per_token
from jaxformer.train.metrics import plot_losses
from jaxformer.train.optim import make_optimizer
from jaxformer.train.run import Setup, mean_loss, run, say
from jaxformer.train.state import gather_to_host
from jaxformer.train.step import LAYER_LOAD, lm_loss, make_eval_step, make_train_step

# sft settings that decide what a run learns from; a resume must keep them (and every lora setting)
DATA_KEYS = ("data", "val_data", "val_fraction", "method", "seq_len", "packed", "seed")


def finetune(cfgs: dict[str, Any], *, resume: bool = False, progress: bool = True, devices=None) -> dict:
    """Fine-tune per the config ({sft, lora, train, mesh}); returns final metrics and what was written."""
    scfg = cfgs["sft"]
    if not scfg.base:
        raise ValueError("no base model: give --base CKPT_OR_HF_DIR (a jaxformer model or run directory, or a "
                         "Hugging Face directory)")
    base = load_any(scfg.base)
    mcfg = base.config
    tok = load_tokenizer_for(scfg.base, scfg.tokenizer)
    if scfg.seq_len is None:
        cfgs = {**cfgs, "sft": dataclasses.replace(scfg, seq_len=mcfg.max_seq_len)}
        scfg = cfgs["sft"]
    if scfg.seq_len > mcfg.max_seq_len:
        raise ValueError(f"sft.seq_len={scfg.seq_len} exceeds the base model's max_seq_len={mcfg.max_seq_len}")
    if tok.vocab_size > mcfg.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the base model's vocab_size is "
                         f"{mcfg.vocab_size}: is it the base model's tokenizer?")
    if scfg.method == "lora" and mcfg.family is not None:
        hf_projections(base)  # the adapter's PEFT module names: a family that cannot name them fails before training
    return run(FineTuning(cfgs, base, tok), cfgs, resume=resume, progress=progress, devices=devices)


class FineTuning:
    """The run skeleton's task for supervised fine-tuning of a pretrained model."""

    resume_sections = {"sft": DATA_KEYS, "lora": None}

    def __init__(self, cfgs: dict[str, Any], base: nnx.Module, tok: Tokenizer):
        self.cfgs, self.base, self.tok = cfgs, base, tok
        self.model_config = base.config
        self.graphdef: nnx.GraphDef | None = None
        self.frozen: tuple = ()  # (LoRA dropout keys, the frozen rest) laid out on the mesh
        self.val_rows: dict | None = None
        self.report: dict = {}  # trainable parameters and optimizer bytes (trainable_report)
        self.data_stats: dict = {}

    def setup(self, mesh: Mesh) -> Setup:
        scfg, lcfg, tcfg = self.cfgs["sft"], self.cfgs["lora"], self.cfgs["train"]
        train_rows, self.val_rows, data_stats = load_rows(scfg, self.tok)
        it = DataIterator(sft.make_sft_dataset(train_rows, batch_size=tcfg.batch_size, seed=scfg.seed,
                                               process_index=jax.process_index(), process_count=jax.process_count()))
        fingerprint = base_fingerprint(self.base)
        tx = make_optimizer(tcfg)
        self.graphdef, state, self.frozen, sh, report = init_finetune_state(self.base, scfg.method, lcfg, tx, mesh,
                                                                            tcfg.seed)
        self.base = None  # the device copies are all the run needs
        say(f"{scfg.method}: {report['trainable_params']:,} trainable of {report['total_params']:,} parameters "
            f"({report['trainable_fraction']:.2%}); optimizer state {report['optimizer_bytes'] / 2**20:.2f} MiB "
            f"(full fine-tuning: {report['full_finetune_optimizer_bytes'] / 2**20:.2f} MiB)")
        # router biases are frozen while fine-tuning: their per-layer loads are not needed (nor logged)
        drop_loads = lambda p, m: (p, {k: v for k, v in m.items() if k != LAYER_LOAD})  # noqa: E731
        train_fn = jax.jit(make_train_step(lm_loss(self.graphdef, packed=True, z_loss=tcfg.z_loss,
                                                   loss_chunk=tcfg.loss_chunk), tx,
                                           grad_accum=tcfg.grad_accum, after_update=drop_loads),
                           out_shardings=(sh["params"], sh["opt_state"], None), donate_argnums=(0, 1))
        fold = jax.jit(step_dropout_keys)
        keys, rest = self.frozen
        eval_graphdef = nnx.graphdef(set_dropout(nnx.merge(self.graphdef, state["params"], *self.frozen), False))
        eval_fn = jax.jit(make_eval_step(lm_loss(eval_graphdef, packed=True,
                                                 loss_chunk=tcfg.loss_chunk)))

        def step(p, o, batch, n, limits):
            return train_fn(p, o, batch, (fold(keys, np.int32(n)), rest), limits)

        def evaluate(p):
            batches = sft.eval_batches(self.val_rows, tcfg.batch_size, process_index=jax.process_index(),
                                       process_count=jax.process_count())
            return mean_loss(eval_fn, p, (b for _, b in zip(range(tcfg.eval_batches), batches)), mesh, self.frozen)

        self.report, self.data_stats = report, data_stats
        return Setup(state=state, iterator=it, step=step, evaluate=evaluate,
                     flops_per_token=train_flops_per_token(self.model_config, scfg.seq_len),
                     meta={"base": scfg.base, "tokenizer_sha256": self.tok.sha256(), "trainable": report},
                     must_match={"base_fingerprint": fingerprint},
                     eval_at_start="held-out task loss before fine-tuning" if scfg.eval_at_start else "")

    def model(self, params: Any) -> nnx.Module:
        host = jax.tree.map(jnp.asarray, gather_to_host((params, *self.frozen)))
        return nnx.merge(self.graphdef, *host)

    def export(self, model: nnx.Module, result: dict) -> dict:
        """RUN/model (merged), RUN/adapter (PEFT); a few held-out prompts answered by the result."""
        scfg, run_dir = self.cfgs["sft"], Path(self.cfgs["train"].run_dir)
        out: dict[str, Any] = {"trainable": self.report, "data": self.data_stats, "method": scfg.method}
        if scfg.method == "lora":
            if model.config.family is not None:
                out["adapter_dir"] = str(save_peft(model, run_dir / "adapter", base_model_name_or_path=scfg.base))
            merged = merge_lora(model)
        else:
            merged = model
        export = native.save(merged, run_dir / "model")
        copy_tokenizer_files(Path(self.tok.path).parent, export)
        out.update(model_dir=str(export), loss_plot=str(plot_losses(run_dir)))
        if scfg.sample_prompts:
            out["samples"] = answer_prompts(merged, self.tok, held_out_prompts(self.val_rows, scfg.sample_prompts),
                                            scfg.sample_tokens)
            for s in out["samples"]:
                say(f"--- prompt:\n{s['prompt']}\n--- reply ({s['finish_reason']}):\n{s['reply']}")
        return out


def base_fingerprint(model: nnx.Module) -> str:
    """A cheap content hash of a model's parameters (names, shapes, dtypes, strided samples of values)."""
    h = hashlib.sha256()
    for path, v in sorted(nnx.to_flat_state(nnx.state(model, nnx.Param)), key=lambda kv: str(kv[0])):
        x = np.asarray(jax.device_get(v[...])).reshape(-1)
        h.update(f"{'.'.join(map(str, path))}{x.shape}{x.dtype}".encode())
        h.update(np.ascontiguousarray(x[:: max(1, x.size // 4096)]).tobytes())
    return h.hexdigest()


def load_rows(scfg, tok: Tokenizer) -> tuple[dict, dict, dict]:
    """(train rows, held-out rows, their stats) from the sft section's JSONL files."""
    records = sft.read_records(scfg.data)
    if scfg.val_data:
        train_recs, val_recs = records, sft.read_records(scfg.val_data)
    else:
        train_recs, val_recs = sft.split_records(records, scfg.val_fraction)
    train_rows, train_stats = sft.build_rows(train_recs, tok, scfg.seq_len, packed=scfg.packed)
    val_rows, val_stats = sft.build_rows(val_recs, tok, scfg.seq_len, packed=scfg.packed)
    say(f"fine-tuning data: {train_stats['examples']} train / {val_stats['examples']} held-out examples "
        f"({train_stats['truncated']} truncated, {train_stats['dropped_no_reply']} without a reply dropped), "
        f"{train_stats['rows']} rows of {scfg.seq_len} tokens ({train_stats['fill']:.0%} filled), "
        f"{train_stats['trained_tokens']:,} trained tokens")
    return train_rows, val_rows, {"train": train_stats, "val": val_stats}


def init_finetune_state(base: nnx.Module, method: str, lcfg, tx, mesh: Mesh, seed: int):
    """(graphdef, {params, opt_state, rng}, frozen states, their shardings, trainable report) on the mesh.

    LoRA wraps the base's projections (in place) and trains the adapters; "full" trains every Param.
    Every state is laid out by the logical-axis table (adapters by the axes they inherit).
    """
    model = apply_lora(base, lcfg, rngs=nnx.Rngs(seed)) if method == "lora" else base
    graphdef, params, (keys, rest) = split_trainable(model, method)
    report = trainable_report(model, params, tx)
    cfg = model.config
    p_sh = sharding.param_shardings(params, mesh, cfg)
    f_sh = (sharding.param_shardings(keys, mesh, cfg), sharding.param_shardings(rest, mesh, cfg))
    params = jax.device_put(params, p_sh)
    frozen = (jax.device_put(keys, f_sh[0]), jax.device_put(rest, f_sh[1]))
    o_sh = sharding.shard_like(jax.eval_shape(tx.init, params), params, p_sh, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    state = {"params": params, "opt_state": jax.jit(tx.init, out_shardings=o_sh)(params),
             "rng": jax.device_put(jax.random.key_data(jax.random.key(seed)), replicated)}
    return graphdef, state, frozen, {"params": p_sh, "opt_state": o_sh, "frozen": f_sh}, report


def held_out_prompts(rows: dict, n: int) -> list[list[int]]:
    """The prompt tokens (everything before the first trained token) of the first n held-out examples."""
    prompts = []
    for r in range(len(rows["inputs"])):
        seg, mask, inputs = rows["segment_ids"][r], rows["loss_mask"][r], rows["inputs"][r]
        for s in np.unique(seg[seg > 0]):
            idx = np.flatnonzero(seg == s)
            first = idx[mask[idx] > 0]
            if len(first):
                prompts.append([int(t) for t in inputs[idx[0]:first[0] + 1]])
            if len(prompts) == n:
                return prompts
    return prompts


def answer_prompts(model: nnx.Module, tok: Tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[dict]:
    """Greedy chat replies (stopping at end-of-turn) to prompt token lists."""
    engine = Engine(model, max_batch=max(1, min(len(prompts), 4)))
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    seqs = generate(engine, prompts, params, tokenizer=tok, stop_ids=tok.chat_stop_ids)
    return [{"prompt": tok.decode(p, skip_special_tokens=False), "reply": s.text,
             "finish_reason": s.finish_reason} for p, s in zip(prompts, seqs)]
