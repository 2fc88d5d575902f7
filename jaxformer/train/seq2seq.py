"""Seq2seq training of the encoder-decoder: the decoder-only loop's pieces over source -> target pairs.

Reused as they are: the mesh and sharded train state (train.state.init_train_state), AdamW and its
schedule (train.optim), orbax checkpoints holding the data iterator's state (exact resume), metrics
logging, and the step loop itself (train.loop.run_steps: logging, evaluation, checkpoints, signals).
Specific here: the data (jaxformer.data.seq2seq), the label-smoothed train step with dropout, the
validation loss, and the end-of-run report (jaxformer.evaluate: beam search, BLEU, ROUGE, perplexity,
and a trivial baseline). jaxformer.train.loop.train dispatches here for an EncDecConfig model.

The logged `loss` and `val_loss` are the plain per-token cross-entropy (perplexity = exp); the
gradient is that of the label-smoothed loss.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxformer.config import EncDecConfig, MeshConfig, Seq2SeqConfig, TrainConfig
from jaxformer.data.pipeline import DataIterator
from jaxformer.data.seq2seq import Pairs, ensure_seq2seq_data, eval_dataset, load_split, train_dataset
from jaxformer.data.shards import copy_tokenizer
from jaxformer.interop import native
from jaxformer.sharding import constrain, global_batch, make_mesh
from jaxformer.train.checkpoint import abstract_like, read_run_config
from jaxformer.train.loop import _check_resumable, open_checkpoints, run_config_dict, run_steps
from jaxformer.train.losses import label_smoothed_sums
from jaxformer.train.metrics import MetricsLogger, plot_losses
from jaxformer.train.optim import make_optimizer
from jaxformer.train.state import gather_to_host, init_train_state

Batch = dict[str, jax.Array]  # see jaxformer.data.seq2seq: src, src_mask, tgt_in, tgt_out, loss_mask, rows


def _forward_sums(graphdef: nnx.GraphDef, params, batch: Batch, smoothing: float, key: jax.Array | None):
    model = nnx.merge(graphdef, params)
    logits = model(batch["src"], batch["tgt_in"], batch["src_mask"], dropout_key=key)  # [B, T, V]
    return label_smoothed_sums(logits, batch["tgt_out"], batch["loss_mask"], smoothing)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, *, label_smoothing: float,
                    grad_accum: int = 1) -> Callable:
    """step(params, opt_state, batch, rng, step) -> (params, opt_state, metrics); dropout keys from (rng, step).

    Like the decoder-only step: micro-batch gradients are summed, then divided once by the total
    number of target tokens, so grad_accum changes memory, not the update.
    """

    def loss_fn(params, mb: Batch, key):
        loss, nll, n = _forward_sums(graphdef, params, mb, label_smoothing, key)
        return loss, (nll, n)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(params, opt_state, batch: Batch, rng: jax.Array, step: jax.Array):
        key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
        if grad_accum == 1:
            (_, (nll, n)), grads = grad_fn(params, batch, key)
        else:
            micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

            def body(carry, xs):
                g_acc, nll_acc, n_acc = carry
                i, mb = xs
                mb = jax.tree.map(lambda x: constrain(x, ("batch",) + (None,) * (x.ndim - 1)), mb)
                (_, (nll, n)), g = grad_fn(params, mb, jax.random.fold_in(key, i))
                return (jax.tree.map(jnp.add, g_acc, g), nll_acc + nll, n_acc + n), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            (grads, nll, n), _ = jax.lax.scan(body, (zeros, jnp.zeros(()), jnp.zeros(())),
                                              (jnp.arange(grad_accum), micro))
        denom = jnp.maximum(n, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": nll / denom, "grad_norm": optax.global_norm(grads), "tokens": n}

    return step


def make_eval_step(graphdef: nnx.GraphDef) -> Callable:
    """eval_step(params, batch) -> (sum of target-token cross-entropy, number of target tokens)."""

    def eval_step(params, batch: Batch):
        _, nll, n = _forward_sums(graphdef, params, batch, 0.0, None)
        return nll, n

    return eval_step


def evaluate_loss(eval_fn, params, pairs: Pairs, cfg: Seq2SeqConfig, model_cfg: EncDecConfig, batch_size: int,
                  mesh: Mesh, max_examples: int | None = None) -> dict:
    """Validation cross-entropy per target token and perplexity over (the first max_examples of) a split."""
    rows = mesh.shape["data"] * mesh.shape["fsdp"] * jax.process_count()
    batch_size = max(rows, batch_size // rows * rows)
    ds = eval_dataset(pairs, cfg, batch_size, pad_id=model_cfg.pad_id, start_id=model_cfg.decoder_start_id,
                      max_examples=max_examples, process_index=jax.process_index(),
                      process_count=jax.process_count())
    total, count = 0.0, 0.0
    for i in range(len(ds)):
        nll, n = eval_fn(params, global_batch(ds[i], mesh))
        total, count = total + float(nll), count + float(n)
    loss = total / max(count, 1.0)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": count}


def flops_per_target_token(cfg: EncDecConfig, pairs: Pairs) -> float:
    """Training FLOPs per target token: 6 x matmul weights per token (encoder weights once per source
    token), plus attention scores/values, at the split's mean lengths."""
    S = float(np.mean([len(s) for s in pairs.src]))
    T = float(np.mean([len(t) for t in pairs.tgt]))
    D, F, V, NH = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_heads * cfg.head_dim
    attn = 2 * D * NH + 2 * D * cfg.n_kv_heads * cfg.head_dim
    mlp = D * F * (3 if cfg.gated_mlp else 2)
    enc = cfg.n_encoder_layers * (attn + mlp)
    dec = cfg.n_layers * (2 * attn + mlp) + D * V
    return 6.0 * (dec + enc * S / T) + 12.0 * NH * (cfg.n_encoder_layers * S * S / T + cfg.n_layers * (T + S))


def train_seq2seq(cfgs: dict[str, Any], *, resume: bool = False, progress: bool = True) -> dict:
    """Train an encoder-decoder per the run config (model, seq2seq, train, mesh); returns the final metrics."""
    mcfg: EncDecConfig = cfgs["model"]
    scfg: Seq2SeqConfig = cfgs["seq2seq"]
    tcfg: TrainConfig = cfgs["train"]
    for name in ("max_source_len", "max_target_len"):
        if getattr(scfg, name) > mcfg.max_seq_len:
            raise ValueError(f"seq2seq.{name}={getattr(scfg, name)} exceeds model.max_seq_len={mcfg.max_seq_len}")
    mesh = make_mesh(cfgs.get("mesh", MeshConfig()), mcfg)  # fails here, before anything compiles
    if tcfg.batch_size % (mesh.shape["data"] * mesh.shape["fsdp"] * tcfg.grad_accum):
        raise ValueError(f"batch_size={tcfg.batch_size} must be a multiple of grad_accum x mesh data x fsdp = "
                         f"{tcfg.grad_accum * mesh.shape['data'] * mesh.shape['fsdp']}")
    with jax.set_mesh(mesh):
        result, model, tok, test_pairs = _train(cfgs, mesh, resume=resume, progress=progress)
    if model is not None:  # the lead process reports on the held-out split
        from jaxformer.evaluate import evaluate_seq2seq, print_report

        report = evaluate_seq2seq(model, tok, test_pairs, scfg, split=scfg.eval_split)
        path = Path(tcfg.run_dir) / f"eval_{scfg.eval_split}.json"
        print_report(report, path)
        result.update(eval=report, eval_json=str(path))
    return result


def _train(cfgs: dict[str, Any], mesh: Mesh, *, resume: bool, progress: bool):
    mcfg: EncDecConfig = cfgs["model"]
    scfg: Seq2SeqConfig = cfgs["seq2seq"]
    tcfg: TrainConfig = cfgs["train"]
    lead = jax.process_index() == 0
    say = print if lead else (lambda *a, **k: None)
    run_dir = Path(tcfg.run_dir)
    ckpt = open_checkpoints(tcfg, resume)
    data_dir, tok = ensure_seq2seq_data(scfg, mcfg.vocab_size, progress=progress and lead)
    check_tokenizer(tok, mcfg)
    train_pairs = load_split(data_dir, "train", tok, scfg)
    val_pairs = load_split(data_dir, "val", tok, scfg)
    say(f"{len(train_pairs):,} train / {len(val_pairs):,} val pairs from {data_dir}")
    it = DataIterator(train_dataset(train_pairs, scfg, tcfg.batch_size, pad_id=mcfg.pad_id,
                                    start_id=mcfg.decoder_start_id, process_index=jax.process_index(),
                                    process_count=jax.process_count()))

    tx = make_optimizer(tcfg)
    graphdef, state, shardings = init_train_state(mcfg, tx, mesh, tcfg.seed)
    start = 0
    if resume and ckpt.steps():
        saved = read_run_config(run_dir) or {}
        _check_resumable(saved, cfgs, ckpt.directory)
        _check_same("seq2seq", saved, cfgs, ckpt.directory)
        start, state, data_state, _ = ckpt.restore(abstract_like(state))  # resharded onto this mesh
        it.set_state(data_state)
        say(f"resumed from step {start} ({ckpt.directory})")
    elif resume:
        say(f"no checkpoint in {ckpt.directory}: starting from step 0")

    step_fn = jax.jit(make_train_step(graphdef, tx, label_smoothing=scfg.label_smoothing, grad_accum=tcfg.grad_accum),
                      out_shardings=(shardings["params"], shardings["opt_state"], None), donate_argnums=(0, 1))
    eval_fn = jax.jit(make_eval_step(graphdef))
    rng = state["rng"]
    logger = MetricsLogger(run_dir, resume_step=start if resume else None, enabled=lead)
    meta_base = {"config": run_config_dict(cfgs), "tokenizer_sha256": tok.sha256()}
    params, opt_state, result = run_steps(
        lambda p, o, batch, step: step_fn(p, o, batch, rng, step), state, it, mesh=mesh, tcfg=tcfg, start=start,
        ckpt=ckpt, logger=logger, flops_per_token=flops_per_target_token(mcfg, train_pairs), meta_base=meta_base,
        evaluate_fn=lambda p: evaluate_loss(eval_fn, p, val_pairs, scfg, mcfg, tcfg.batch_size, mesh,
                                            max_examples=tcfg.eval_batches * tcfg.batch_size),
        progress=progress)
    if result.pop("stopped"):
        return result, None, tok, None
    model = nnx.merge(graphdef, gather_to_host(params))  # every process joins the gather
    if not lead:
        return result, None, tok, None
    export = native.save(model, run_dir / "model")
    copy_tokenizer(data_dir, export)
    result.update(model_dir=str(export), loss_plot=str(plot_losses(run_dir)))
    if "val_loss" in result:
        say(f"validation: loss {result['val_loss']:.4f}  perplexity {result['val_ppl']:.2f}")
    say(f"model: {export}  loss curve: {result['loss_plot']}")
    return result, model, tok, load_split(data_dir, scfg.eval_split, tok, scfg)


def check_tokenizer(tok, cfg: EncDecConfig) -> None:
    """The tokenizer must fit the vocabulary and use the model's pad and EOS ids."""
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but model.vocab_size={cfg.vocab_size}; "
                         f"set --model.vocab_size={tok.vocab_size} or more")
    if (tok.pad_id, tok.eos_id) != (cfg.pad_id, cfg.eos_id):
        raise ValueError(f"tokenizer pad/eos ids ({tok.pad_id}, {tok.eos_id}) differ from the model's "
                         f"model.pad_id={cfg.pad_id}, model.eos_id={cfg.eos_id}")


def _check_same(section: str, saved: dict, cfgs: dict, ckpt_dir: Path) -> None:
    now, then = dataclasses.asdict(cfgs[section]), saved.get(section, {})
    data_keys = ("data_dir", "task", "tokenizer", "max_source_len", "max_target_len", "split_identifiers",
                 "truecase_targets", "min_bucket", "seed")
    diff = sorted(k for k in data_keys if k in then and now[k] != then[k])
    if diff:
        raise ValueError(f"cannot resume from {ckpt_dir}: {section} config differs in {diff} "
                         f"(checkpoint: {[then[k] for k in diff]}, now: {[now[k] for k in diff]})")
