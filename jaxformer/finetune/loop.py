"""The fine-tuning run: base weights + (LoRA adapters | all params) trained on SFT rows by the training loop.

Reuses jaxformer.train: the same jitted step (trainable params differentiated and optimized, the
rest passed in as `frozen`), the same step loop (logging, evaluation, orbax checkpoints, graceful
stops, exact resume). A LoRA checkpoint holds only the adapters and their optimizer state; the
frozen base is reloaded from `sft.base` on resume and checked against a fingerprint.

RUN_DIR/ after a finished run:
  model/      the merged (or fully fine-tuned) model in jaxformer format + tokenizer files:
              `jaxformer serve --ckpt RUN_DIR/model`, `jaxformer convert --to hf RUN_DIR/model ...`
  adapter/    (LoRA, GPT-2 / Llama bases) the adapter alone in Hugging Face PEFT format
  metrics.jsonl, tb/, loss.png, checkpoints/
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxformer import sharding
from jaxformer.data import sft
from jaxformer.finetune.lora import (apply_lora, merge_lora, set_dropout, split_trainable, step_dropout_keys,
                                     trainable_report)
from jaxformer.sharding import global_batch, make_mesh
from jaxformer.train.checkpoint import Checkpointer, abstract_like, read_run_config
from jaxformer.train.flops import train_flops_per_token
from jaxformer.train.loop import open_checkpoints, run_config_dict, run_steps
from jaxformer.train.metrics import MetricsLogger, plot_losses
from jaxformer.train.optim import make_optimizer
from jaxformer.train.state import gather_to_host
from jaxformer.train.step import make_eval_step, make_train_step

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def finetune(cfgs: dict[str, Any], *, resume: bool = False, progress: bool = True, devices=None) -> dict:
    """Fine-tune per the config ({sft, lora, train, mesh}); returns final metrics and what was written."""
    from jaxformer.infer.text import load_text_tokenizer
    from jaxformer.interop.auto import load_any

    scfg = cfgs["sft"]
    if not scfg.base:
        raise ValueError("no base model: give --base CKPT_OR_HF_DIR (a jaxformer model or run directory, or a "
                         "Hugging Face directory)")
    base = load_any(scfg.base)
    mcfg = base.config
    tok = load_text_tokenizer(scfg.base, scfg.tokenizer)
    if scfg.seq_len is None:
        cfgs = {**cfgs, "sft": dataclasses.replace(scfg, seq_len=mcfg.max_seq_len)}
        scfg = cfgs["sft"]
    if scfg.seq_len > mcfg.max_seq_len:
        raise ValueError(f"sft.seq_len={scfg.seq_len} exceeds the base model's max_seq_len={mcfg.max_seq_len}")
    if tok.vocab_size > mcfg.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the base model's vocab_size is "
                         f"{mcfg.vocab_size}: is it the base model's tokenizer?")
    mesh = make_mesh(cfgs["mesh"], mcfg, devices)
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfgs["train"].batch_size % rows:
        raise ValueError(f"batch_size={cfgs['train'].batch_size} must be a multiple of mesh data x fsdp = {rows}")
    with jax.set_mesh(mesh):
        return _finetune(cfgs, base, tok, mesh, resume=resume, progress=progress)


def base_fingerprint(model: nnx.Module) -> str:
    """A cheap content hash of a model's parameters (names, shapes, dtypes, strided samples of values)."""
    h = hashlib.sha256()
    for path, v in sorted(nnx.to_flat_state(nnx.state(model, nnx.Param)), key=lambda kv: str(kv[0])):
        x = np.asarray(jax.device_get(v[...])).reshape(-1)
        h.update(f"{'.'.join(map(str, path))}{x.shape}{x.dtype}".encode())
        h.update(np.ascontiguousarray(x[:: max(1, x.size // 4096)]).tobytes())
    return h.hexdigest()


def _check_resumable(saved: dict, cfgs: dict, fingerprint: str, ckpt_dir: Path) -> None:
    """Resuming needs the same base weights, method, adapters and data (train settings such as steps may change)."""
    if saved.get("base_fingerprint") not in (None, fingerprint):
        raise ValueError(f"cannot resume from {ckpt_dir}: the base model's weights differ from the ones this run "
                         "started from")
    keys = {"sft": ("data", "val_data", "val_fraction", "method", "seq_len", "packed", "seed"), "lora": None}
    for section, names in keys.items():
        now = dataclasses.asdict(cfgs[section])
        then = saved.get("config", {}).get(section, {})
        diff = sorted(k for k in (names or now) if k in then and _norm(now[k]) != _norm(then[k]))
        if diff:
            raise ValueError(f"cannot resume from {ckpt_dir}: {section} config differs in {diff} "
                             f"(checkpoint: {[then[k] for k in diff]}, now: {[now[k] for k in diff]})")


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def _load_rows(scfg, tok, say) -> tuple[dict, dict, dict]:
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


def sft_evaluate(eval_fn, params, frozen, rows: dict, batch_size: int, mesh: Mesh, max_batches: int | None = None
                 ) -> dict:
    """Held-out task loss: cross-entropy over the trained (assistant) tokens of every held-out row."""
    total = count = 0.0
    for i, batch in enumerate(sft.eval_batches(rows, batch_size, process_index=jax.process_index(),
                                               process_count=jax.process_count())):
        if max_batches is not None and i >= max_batches:
            break
        ce, n = eval_fn(params, global_batch(batch, mesh), frozen)
        total, count = total + float(ce), count + float(n)
    loss = total / max(count, 1.0)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": count}


def _finetune(cfgs: dict, base: nnx.Module, tok, mesh: Mesh, *, resume: bool, progress: bool) -> dict:
    tcfg = cfgs["train"]
    say = print if jax.process_index() == 0 else (lambda *a, **k: None)
    train_rows, val_rows, data_stats = _load_rows(cfgs["sft"], tok, say)
    ckpt = open_checkpoints(tcfg, resume)
    try:
        return _run(cfgs, base, tok, mesh, ckpt, train_rows, val_rows, data_stats, resume=resume, progress=progress)
    except BaseException:
        try:  # run_steps closes it once it runs; errors before that must too (no orbax threads left behind)
            ckpt.close()
        except Exception:  # noqa: BLE001 - already closed
            pass
        raise


def _run(cfgs: dict, base: nnx.Module, tok, mesh: Mesh, ckpt: Checkpointer, train_rows: dict, val_rows: dict,
         data_stats: dict, *, resume: bool, progress: bool) -> dict:
    scfg, lcfg, tcfg = cfgs["sft"], cfgs["lora"], cfgs["train"]
    mcfg = base.config
    lead = jax.process_index() == 0
    say = print if lead else (lambda *a, **k: None)
    run_dir = Path(tcfg.run_dir)
    it = sft_iterator(train_rows, tcfg.batch_size, scfg.seed)
    fingerprint = base_fingerprint(base)

    tx = make_optimizer(tcfg)
    graphdef, state, frozen, sh, report = init_finetune_state(base, scfg.method, lcfg, tx, mesh, tcfg.seed)
    say(f"{scfg.method}: {report['trainable_params']:,} trainable of {report['total_params']:,} parameters "
        f"({report['trainable_fraction']:.2%}); optimizer state {report['optimizer_bytes'] / 2**20:.2f} MiB "
        f"(full fine-tuning: {report['full_finetune_optimizer_bytes'] / 2**20:.2f} MiB)")
    del base  # the device copies are all the run needs
    p_sh, o_sh = sh["params"], sh["opt_state"]
    params = state["params"]

    train_fn = jax.jit(make_train_step(graphdef, tx, packed=True, grad_accum=tcfg.grad_accum, z_loss=tcfg.z_loss),
                       out_shardings=(p_sh, o_sh, None), donate_argnums=(0, 1))
    fold = jax.jit(step_dropout_keys)
    eval_graphdef = nnx.graphdef(set_dropout(nnx.merge(graphdef, params, *frozen), False))
    eval_fn = jax.jit(make_eval_step(eval_graphdef, packed=True))

    def evaluate_fn(p):
        return sft_evaluate(eval_fn, p, frozen, val_rows, tcfg.batch_size, mesh, tcfg.eval_batches)

    start = 0
    meta_base = {"config": run_config_dict(cfgs), "base_fingerprint": fingerprint, "base": scfg.base,
                 "tokenizer_sha256": hashlib.sha256(tok.tok.to_str().encode()).hexdigest(), "trainable": report}
    if resume and ckpt.steps():
        _check_resumable(_read_meta(run_dir), cfgs, fingerprint, ckpt.directory)
        start, state, data_state, _ = ckpt.restore(abstract_like(state))
        it.set_state(data_state)
        say(f"resumed from step {start} ({ckpt.directory})")
    elif resume:
        say(f"no checkpoint in {ckpt.directory}: starting from step 0")
    logger = MetricsLogger(run_dir, resume_step=start if resume else None, enabled=lead)
    before = None
    if start == 0 and scfg.eval_at_start:
        before = evaluate_fn(state["params"])
        logger.log(0, "eval", before)
        say(f"held-out task loss before fine-tuning: {before['val_loss']:.4f}")

    def step_fn(p, o, batch, step):
        return train_fn(p, o, batch, (fold(frozen[0], np.int32(step)), frozen[1]))

    params, _, result = run_steps(
        step_fn, state, it, mesh=mesh, tcfg=tcfg, start=start, ckpt=ckpt, logger=logger,
        flops_per_token=train_flops_per_token(mcfg, scfg.seq_len), meta_base=meta_base,
        evaluate_fn=evaluate_fn, progress=progress)
    result.update(trainable=report, data=data_stats, method=scfg.method)
    if before is not None:
        result["val_loss_before"] = before["val_loss"]
    if result.pop("stopped"):
        return result
    host = jax.tree.map(jax.numpy.asarray, gather_to_host((params, *frozen)))  # every process joins the gather
    model = nnx.merge(graphdef, *host)
    if lead:
        result.update(_export(model, tok, cfgs, run_dir, val_rows, say))
    return result


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


def sft_iterator(rows: dict, batch_size: int, seed: int):
    from jaxformer.data.pipeline import DataIterator

    return DataIterator(sft.make_sft_dataset(rows, batch_size=batch_size, seed=seed,
                                             process_index=jax.process_index(), process_count=jax.process_count()))


def _read_meta(run_dir: Path) -> dict:
    """{"config": ..., "base_fingerprint": ...} of the run's newest checkpoint."""
    import json

    cfg = read_run_config(run_dir) or {}
    for step_dir in sorted((p for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()),
                           key=lambda p: -int(p.name)):
        meta = step_dir / "meta" / "metadata"
        if meta.exists():
            data = json.loads(meta.read_text())
            return {"config": data.get("config", cfg), "base_fingerprint": data.get("base_fingerprint")}
    return {"config": cfg}


def _export(model: nnx.Module, tok, cfgs: dict, run_dir: Path, val_rows: dict, say) -> dict:
    """Write RUN/model (merged) and RUN/adapter (PEFT); answer a few held-out prompts with the result."""
    from jaxformer.interop import native

    scfg = cfgs["sft"]
    out: dict[str, Any] = {}
    if scfg.method == "lora":
        from jaxformer.interop.peft import save_peft

        if model.config.family is not None:
            out["adapter_dir"] = str(save_peft(model, run_dir / "adapter", base_model_name_or_path=scfg.base))
        merged = merge_lora(model)
    else:
        merged = model
    export = native.save(merged, run_dir / "model")
    src = Path(tok.path).parent
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, export / name)
    out["model_dir"] = str(export)
    out["loss_plot"] = str(plot_losses(run_dir))
    if scfg.sample_prompts:
        out["samples"] = answer_prompts(merged, tok, _held_out_prompts(val_rows, tok, scfg.sample_prompts),
                                        scfg.sample_tokens)
        for s in out["samples"]:
            say(f"--- prompt:\n{s['prompt']}\n--- reply ({s['finish_reason']}):\n{s['reply']}")
    say(f"model: {export}" + (f"  adapter: {out['adapter_dir']}" if "adapter_dir" in out else ""))
    return out


def _held_out_prompts(rows: dict, tok, n: int) -> list[list[int]]:
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


def answer_prompts(model: nnx.Module, tok, prompts: list[list[int]], max_new_tokens: int) -> list[dict]:
    """Greedy chat replies (stopping at end-of-turn) to prompt token lists."""
    from jaxformer.infer import Engine, SamplingParams, generate

    engine = Engine(model, max_batch=max(1, min(len(prompts), 4)))
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    seqs = generate(engine, prompts, params, tokenizer=tok, stop_ids=tok.chat_stop_ids)
    return [{"prompt": tok.tok.decode(p, skip_special_tokens=False), "reply": s.text,
             "finish_reason": s.finish_reason} for p, s in zip(prompts, seqs)]
