"""The training loop: data -> jitted step -> metrics, evaluation, checkpoints, and the end-of-run report."""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from jaxformer.config import DataConfig, EncDecConfig, MeshConfig, ModelConfig, TrainConfig
from jaxformer.data.build import ensure_data
from jaxformer.data.pipeline import DataIterator, make_dataset
from jaxformer.data.shards import SplitTokens, copy_tokenizer, open_split
from jaxformer.infer.sampling import generate_uncached
from jaxformer.interop import native
from jaxformer.sharding import global_batch, make_mesh
from jaxformer.train.checkpoint import Checkpointer, abstract_like, read_run_config
from jaxformer.train.flops import peak_tflops, train_flops_per_token
from jaxformer.train.metrics import MetricsLogger, plot_losses
from jaxformer.train.optim import make_optimizer, make_schedule
from jaxformer.train.state import gather_to_host, init_train_state
from jaxformer.train.step import make_eval_step, make_train_step


EVAL_SEED = 1234


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf."""


class GracefulStop:
    """SIGINT/SIGTERM request a checkpoint and a clean exit at the end of the current step."""

    def __init__(self):
        self.requested: str | None = None
        self._old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay as they were
                pass

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def run_config_dict(cfgs: dict[str, Any]) -> dict[str, dict]:
    return {name: dataclasses.asdict(c) for name, c in cfgs.items()}


def evaluate(eval_fn, params, split: SplitTokens, data: DataConfig, batch_size: int, max_batches: int,
             mesh: Mesh) -> dict:
    """Validation loss, perplexity and bits per byte on `max_batches` held-out batches.

    The windows are a fixed-seed random sample of the whole split (the same every call), so a few
    batches estimate the split's loss without the bias of its first documents.
    """
    n_windows = max(1, (split.n_tokens - 1) // data.seq_len)
    rows = mesh.shape["data"] * mesh.shape["fsdp"] * jax.process_count()  # batch must split evenly
    eval_batch = max(rows, min(batch_size, n_windows) // rows * rows)
    ds = make_dataset(split, seq_len=data.seq_len, batch_size=eval_batch, packed=data.packed,
                      shuffle=True, seed=EVAL_SEED, repeat=False, process_index=jax.process_index(),
                      process_count=jax.process_count())
    total, count = 0.0, 0.0
    for i in range(min(max_batches, len(ds))):
        ce, n = eval_fn(params, global_batch(ds[i], mesh))
        total, count = total + float(ce), count + float(n)
    loss = total / max(count, 1.0)
    # bits per byte: nats/token -> bits/token, times this split's tokens per UTF-8 byte
    bpb = loss / math.log(2) * split.n_tokens / max(split.n_bytes, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_bpb": bpb, "val_tokens": count}


def _check_resumable(saved: dict, cfgs: dict, ckpt_dir: Path) -> None:
    """Resuming needs the same model and data configs (train settings such as steps may change)."""
    for section in ("model", "data"):
        now = dataclasses.asdict(cfgs[section])
        then = saved.get(section, {})
        diff = sorted(k for k in now if k in then and _norm(now[k]) != _norm(then[k]))
        if diff:
            raise ValueError(f"cannot resume from {ckpt_dir}: {section} config differs in {diff} "
                             f"(checkpoint: {[then[k] for k in diff]}, now: {[now[k] for k in diff]})")


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def open_checkpoints(tcfg: TrainConfig, resume: bool) -> Checkpointer:
    """The run's checkpoint manager; a run directory that already holds checkpoints needs --resume."""
    ckpt = Checkpointer(Path(tcfg.run_dir) / "checkpoints", keep_last=tcfg.keep_last,
                        async_save=tcfg.async_checkpoint)
    if ckpt.steps() and not resume:
        steps = ckpt.steps()
        ckpt.close()
        raise ValueError(f"{tcfg.run_dir} already holds checkpoints (steps {steps}); pass --resume to continue "
                         "it, or choose another --train.run_dir")
    return ckpt


def run_steps(step_fn, state: dict, it, *, mesh: Mesh, tcfg: TrainConfig, start: int, ckpt: Checkpointer,
              logger: MetricsLogger, flops_per_token: float, meta_base: dict, evaluate_fn, progress: bool
              ) -> tuple[Any, Any, dict]:
    """Optimizer steps start+1 .. tcfg.steps with logging, evaluation, checkpoints and graceful stops.

    step_fn(params, opt_state, batch, step) -> (params, opt_state, metrics), the batch laid out on the mesh;
    evaluate_fn(params) -> {"val_loss": ..., ...}; state holds params, opt_state and rng (checkpointed
    with the iterator `it`'s state). Returns (params, opt_state, {"step", "loss", eval metrics...,
    "stopped": signal name or None}); closes `ckpt` and `logger`.
    """
    lead = jax.process_index() == 0
    say = print if lead else (lambda *a, **k: None)
    schedule = make_schedule(tcfg)
    peak = peak_tflops(tcfg.peak_tflops) * 1e12 * jax.device_count()
    stop = GracefulStop()
    bar = tqdm(total=tcfg.steps, initial=start, desc="train", disable=not (progress and lead), dynamic_ncols=True)
    params, opt_state = state["params"], state["opt_state"]
    last_good, last_eval, loss = start, {}, float("nan")
    t_log, tokens_since = time.perf_counter(), 0.0
    try:
        for step in range(start + 1, tcfg.steps + 1):
            params, opt_state, metrics = step_fn(params, opt_state, global_batch(next(it), mesh), step)
            m = jax.device_get(metrics)
            loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):  # NaN grads would poison the params
                bad = loss if not math.isfinite(loss) else f"finite ({loss:.4f}) but the gradient norm is {grad_norm}"
                raise NonFiniteLossError(
                    f"loss became {bad} at step {step}; stopping. The last good checkpoint (step {last_good}) is "
                    f"kept in {ckpt.directory}; lower --train.lr, raise warmup, or check the data")
            tokens_since += float(m["tokens"])
            bar.update(1)
            if step % tcfg.log_every == 0 or step == tcfg.steps:
                dt = time.perf_counter() - t_log
                tps = tokens_since / dt
                logger.log(step, "train", {"loss": loss, "grad_norm": grad_norm,
                                           "lr": float(schedule(step - 1)), "tokens_per_s": tps,
                                           "mfu": tps * flops_per_token / peak})
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
                t_log, tokens_since = time.perf_counter(), 0.0
            val_loss = None
            if step % tcfg.eval_every == 0 or step == tcfg.steps:
                last_eval = evaluate_fn(params)
                val_loss = last_eval["val_loss"]
                logger.log(step, "eval", last_eval)
                t_log = time.perf_counter()  # evaluation time is not training throughput
            if step % tcfg.ckpt_every == 0 or step == tcfg.steps or stop.requested:
                ckpt.save(step, {"params": params, "opt_state": opt_state, "rng": state["rng"]}, it.get_state(),
                          {**meta_base, "step": step, "loss": loss, **last_eval}, val_loss)
                last_good = step
            if stop.requested:
                say(f"\n{stop.requested}: saved a checkpoint at step {step}; resume with --resume")
                break
    finally:
        bar.close()
        stop.restore()
        ckpt.close()
        logger.close()

    return params, opt_state, {"step": last_good, "loss": loss, **last_eval, "stopped": stop.requested}


def train(cfgs: dict[str, Any], *, resume: bool = False, progress: bool = True) -> dict:
    """Train per the run config; returns the final metrics (and writes everything under run_dir)."""
    if isinstance(cfgs["model"], EncDecConfig):  # an encoder-decoder trains on source -> target pairs
        from jaxformer.train.seq2seq import train_seq2seq

        return train_seq2seq(cfgs, resume=resume, progress=progress)
    mcfg: ModelConfig = cfgs["model"]
    dcfg: DataConfig = cfgs["data"]
    tcfg: TrainConfig = cfgs["train"]
    if dcfg.seq_len > mcfg.max_seq_len:
        raise ValueError(f"data.seq_len={dcfg.seq_len} exceeds model.max_seq_len={mcfg.max_seq_len}")
    mesh = make_mesh(cfgs.get("mesh", MeshConfig()), mcfg)  # fails here, before anything compiles
    if tcfg.batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
        raise ValueError(f"batch_size={tcfg.batch_size} must be a multiple of mesh data x fsdp = "
                         f"{mesh.shape['data'] * mesh.shape['fsdp']}")
    with jax.set_mesh(mesh):
        return _train(cfgs, mesh, resume=resume, progress=progress)


def _train(cfgs: dict[str, Any], mesh: Mesh, *, resume: bool, progress: bool) -> dict:
    mcfg: ModelConfig = cfgs["model"]
    dcfg: DataConfig = cfgs["data"]
    tcfg: TrainConfig = cfgs["train"]
    lead = jax.process_index() == 0
    say = print if lead else (lambda *a, **k: None)
    run_dir = Path(tcfg.run_dir)
    ckpt = open_checkpoints(tcfg, resume)
    data_dir, tok = ensure_data(dcfg, mcfg.vocab_size, progress=progress and lead)
    if tok.vocab_size > mcfg.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but model.vocab_size={mcfg.vocab_size}; "
                         f"set --model.vocab_size={tok.vocab_size} or more")
    train_split, val_split = open_split(data_dir, "train"), open_split(data_dir, "val")
    it = DataIterator(make_dataset(train_split, seq_len=dcfg.seq_len, batch_size=tcfg.batch_size,
                                   packed=dcfg.packed, seed=dcfg.seed, process_index=jax.process_index(),
                                   process_count=jax.process_count()))

    tx = make_optimizer(tcfg)
    graphdef, state, shardings = init_train_state(mcfg, tx, mesh, tcfg.seed)
    start = 0
    if resume and ckpt.steps():
        _check_resumable(read_run_config(run_dir) or {}, cfgs, ckpt.directory)
        start, state, data_state, _ = ckpt.restore(abstract_like(state))  # resharded onto this mesh
        it.set_state(data_state)
        say(f"resumed from step {start} ({ckpt.directory})")
    elif resume:
        say(f"no checkpoint in {ckpt.directory}: starting from step 0")

    step_fn = jax.jit(make_train_step(graphdef, tx, packed=dcfg.packed, grad_accum=tcfg.grad_accum,
                                      z_loss=tcfg.z_loss),
                      out_shardings=(shardings["params"], shardings["opt_state"], None), donate_argnums=(0, 1))
    eval_fn = jax.jit(make_eval_step(graphdef, packed=dcfg.packed))
    logger = MetricsLogger(run_dir, resume_step=start if resume else None, enabled=lead)
    meta_base = {"config": run_config_dict(cfgs), "tokenizer_sha256": tok.sha256()}
    params, opt_state, result = run_steps(
        lambda p, o, batch, step: step_fn(p, o, batch), state, it, mesh=mesh, tcfg=tcfg, start=start, ckpt=ckpt,
        logger=logger, flops_per_token=train_flops_per_token(mcfg, dcfg.seq_len), meta_base=meta_base,
        evaluate_fn=lambda p: evaluate(eval_fn, p, val_split, dcfg, tcfg.batch_size, tcfg.eval_batches, mesh),
        progress=progress)
    if result.pop("stopped"):
        return result
    model = nnx.merge(graphdef, gather_to_host(params))  # every process joins the gather
    if lead:
        export = native.save(model, run_dir / "model")
        copy_tokenizer(data_dir, export)
        result["model_dir"] = str(export)
        result["loss_plot"] = str(plot_losses(run_dir))
        if "val_loss" in result:
            say(f"validation: loss {result['val_loss']:.4f}  perplexity {result['val_ppl']:.2f}  "
                f"bits/byte {result['val_bpb']:.3f}")
        if tcfg.sample_tokens:
            ids = generate_uncached(model, [tok.bos_id] + tok.encode(tcfg.sample_prompt), tcfg.sample_tokens,
                                    temperature=tcfg.sample_temperature, top_k=tcfg.sample_top_k, seed=tcfg.seed,
                                    stop_ids=[tok.eos_id])
            result["sample"] = tcfg.sample_prompt + tok.decode(ids)
            say("sample:\n" + result["sample"])
        say(f"model: {export}  loss curve: {result['loss_plot']}")
    return result
