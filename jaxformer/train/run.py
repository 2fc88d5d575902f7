"""The one run skeleton: pretraining, seq2seq training and fine-tuning all run through `run(task, cfgs)`.

The driver owns what every run does the same way: the device mesh and its checks, the checkpoint
manager and its --resume guard, the resume check, restoring the train state and the data iterator,
the step loop (logging to metrics.jsonl / TensorBoard, the progress bar, the evaluation cadence,
checkpoints, the NaN guard or, with train.spike_threshold, loss-spike skips and rollbacks (train/spikes.py),
SIGINT/SIGTERM stops), lead-process printing, and the report of a run that had already finished. A task
(the Task protocol below) supplies its data, its train state, its step and evaluation, and what it writes
at the end.

    task.setup(mesh)        -> Setup: state, data iterator, step, evaluate, meta   (inside the mesh)
    (a finished run re-run with --resume: its recorded evaluation and outputs are printed, nothing more)
    run_steps(...)             optimizer steps start+1 .. train.steps              (inside the mesh)
                               (with train.parity_every: the torch_ref cross-check, parity_check)
    task.model(params)      -> the trained model on the host (every process)       (inside the mesh)
    task.export(model, ...) -> files written and their report (lead process only)  (outside the mesh)
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from jaxformer.checkpoint import Checkpointer, abstract_like, read_run_meta
from jaxformer.config import EncDecConfig, MeshConfig, ModelConfig, TrainConfig, model_config_from_dict
from jaxformer.sharding import batch_rows, global_batch, make_mesh
from jaxformer.train.flops import peak_tflops
from jaxformer.train.metrics import MetricsLogger, moe_scalars
from jaxformer.train.optim import make_schedule
from jaxformer.train.spikes import MAX_ROLLBACKS, LossSpikeError, SpikeGuard
from jaxformer.train.state import gather_to_host


def say(*args, **kwargs) -> None:
    """print, on the lead process only (every process runs the same code)."""
    if jax.process_index() == 0:
        print(*args, **kwargs)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf."""


@dataclasses.dataclass
class Setup:
    """What a task hands the driver once its data and train state exist on the mesh."""

    state: dict[str, Any]  # params, opt_state, rng (key data): what checkpoints hold
    iterator: Any  # batches (dicts of numpy arrays) with get_state() / set_state() for exact resume (and optionally
    # scalars() -> {name: number} logged with each train record: a mixture's tokens per source)
    # (params, opt_state, batch laid out on the mesh, step number, limits) -> (params, opt_state, metrics); limits
    # are None (train.spike_threshold 0: the plain update) or float32 [max loss, max grad norm], passed to
    # make_train_step's step: over either, or non-finite, params and opt_state come back unchanged, skipped = 1
    step: Callable
    evaluate: Callable[[Any], dict]  # params -> {"val_loss": ..., ...}
    flops_per_token: float  # training FLOPs per counted token (MFU)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # more checkpoint meta (tokenizer hash, ...)
    must_match: dict[str, Any] = dataclasses.field(default_factory=dict)  # meta a resume must find unchanged
    eval_at_start: str = ""  # a name for it: evaluate the initial params (logged at step 0) on a fresh start
    parity_batch: dict | None = None  # a fixed held-out batch for train.parity_every (None: fixed random tokens)


class Task(Protocol):
    """One kind of run. `resume_sections` names the config sections (and keys; None = all, model = its
    architecture) that a resumed run must share with its checkpoints."""

    model_config: ModelConfig
    resume_sections: dict[str, tuple[str, ...] | None]

    def setup(self, mesh: Mesh) -> Setup: ...

    def model(self, params: Any) -> nnx.Module: ...

    def export(self, model: nnx.Module, result: dict) -> dict: ...


def run(task: Task, cfgs: dict[str, Any], *, resume: bool = False, progress: bool = True,
        devices: list | None = None) -> dict:
    """Train `task` per `cfgs` (train and mesh sections); returns the final metrics and what was written."""
    tcfg: TrainConfig = cfgs["train"]
    mesh = make_mesh(cfgs.get("mesh", MeshConfig()), task.model_config, devices)  # fails before anything compiles
    if mesh.shape["context"] > 1 and isinstance(task.model_config, EncDecConfig):
        raise ValueError(f"mesh.context={mesh.shape['context']}: context parallelism (ring attention) is for "
                         "decoder-only language models; train an encoder-decoder with --mesh.context=1")
    if mesh.shape["context"] > 1 and tcfg.parity_every:
        raise ValueError("train.parity_every compares logits in sequence order, which mesh.context > 1 lays out in ring"
                         " order; set --train.parity_every=0 (or check parity with --mesh.context=1)")
    rows = batch_rows(mesh)
    if tcfg.batch_size % (rows * tcfg.grad_accum):
        raise ValueError(f"batch_size={tcfg.batch_size} must be a multiple of grad_accum x mesh data x fsdp x expert = "
                         f"{tcfg.grad_accum} x {rows}")
    run_dir = Path(tcfg.run_dir)
    lead = jax.process_index() == 0
    with jax.set_mesh(mesh):
        check_fresh(tcfg, resume)  # before any work: a run directory with checkpoints needs --resume
        saved = read_run_meta(run_dir) if resume else None
        if saved and saved.get("step", 0) >= tcfg.steps and (run_dir / "model").is_dir():
            check_resumable(saved, cfgs, task.resume_sections, {}, run_dir / "checkpoints")
            return finished(run_dir, saved["step"], saved)  # nothing loaded, nothing written
        setup = task.setup(mesh)
        ckpt = Checkpointer(run_dir / "checkpoints", keep_last=tcfg.keep_last, async_save=tcfg.async_checkpoint)
        try:
            start, meta = restore(ckpt, setup, cfgs, task) if resume else (0, {})
            logger = MetricsLogger(run_dir, resume_step=start if resume else None, enabled=lead)
            result = recorded(meta)  # what the newest checkpoint measured, until this run measures anew
            if start == 0 and setup.eval_at_start:
                before = setup.evaluate(setup.state["params"])
                logger.log(0, "eval", before)
                say(f"{setup.eval_at_start}: {before['val_loss']:.4f}")
                result["val_loss_before"] = before["val_loss"]
        except BaseException:
            ckpt.close()  # no orbax threads left behind
            raise
        meta_base = {"config": run_config_dict(cfgs), **setup.meta, **setup.must_match}
        parity = parity_check(task, setup, mesh) if tcfg.parity_every else None
        params, result = run_steps(setup, mesh=mesh, tcfg=tcfg, start=start, ckpt=ckpt, logger=logger,
                                   meta_base=meta_base, progress=progress, result=result, parity=parity,
                                   spikes=meta.get("spikes"))
        if result.pop("stopped"):
            return result
        model = task.model(params)  # every process joins the gather
    if not lead:
        return result
    if "val_loss" in result:
        say(evaluation_line(result))
    result.update(task.export(model, result))
    say(outputs_line(result))
    return result


def restore(ckpt: Checkpointer, setup: Setup, cfgs: dict, task: Task) -> tuple[int, dict]:
    """(step, meta) of the newest usable checkpoint, its state and data position put into `setup`."""
    if not ckpt.steps():
        say(f"no checkpoint in {ckpt.directory}: starting from step 0")
        return 0, {}
    check_resumable(read_run_meta(ckpt.directory.parent) or {}, cfgs, task.resume_sections, setup.must_match,
                    ckpt.directory)
    start, setup.state, data_state, meta = ckpt.restore(abstract_like(setup.state))  # laid out on this mesh
    setup.iterator.set_state(data_state)
    say(f"resumed from step {start} ({ckpt.directory})")
    return start, meta


def outputs_line(result: dict) -> str:
    """'model: RUN/model  loss plot: RUN/loss.png  ...' for the paths a result holds."""
    names = {"_dir": "", "_plot": " plot", "_json": ""}
    return "  ".join(f"{k.rsplit('_', 1)[0].replace('_', ' ')}{names['_' + k.rsplit('_', 1)[1]]}: {v}"
                     for k, v in result.items() if k.endswith(tuple(names)))


def evaluation_line(metrics: dict) -> str:
    """'validation: loss 2.3456  perplexity 10.45  bits/byte 1.234' (what the metrics hold)."""
    parts = [f"loss {metrics['val_loss']:.4f}", f"perplexity {metrics['val_ppl']:.2f}"]
    if "val_bpb" in metrics:
        parts.append(f"bits/byte {metrics['val_bpb']:.3f}")
    return "validation: " + "  ".join(parts)


def recorded(meta: dict) -> dict:
    """The training loss and evaluation a checkpoint's meta recorded ({} for a fresh run)."""
    return {k: v for k, v in meta.items() if k == "loss" or k.startswith("val_")}


def finished(run_dir: Path, step: int, meta: dict) -> dict:
    """A run already trained to its last step: report its recorded final evaluation and outputs, change nothing."""
    result = {"step": step, **recorded(meta), "finished": True}
    outputs = {"model_dir": run_dir / "model", "adapter_dir": run_dir / "adapter", "loss_plot": run_dir / "loss.png"}
    outputs.update({f"{p.stem}_json": p for p in sorted(run_dir.glob("eval_*.json"))})
    result.update({k: str(p) for k, p in outputs.items() if p.exists()})
    say(f"{run_dir} finished at step {step} (nothing to do; raise --train.steps to train further)")
    if "val_loss" in result:
        say(evaluation_line(result))
    say(outputs_line(result))
    return result


def check_fresh(tcfg: TrainConfig, resume: bool) -> None:
    """A run directory that already holds checkpoints continues only with --resume (never overwritten)."""
    ckpt_dir = Path(tcfg.run_dir) / "checkpoints"
    steps = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) if ckpt_dir.is_dir() else []
    if steps and not resume:
        raise ValueError(f"{tcfg.run_dir} already holds checkpoints (steps {steps}); pass --resume to continue "
                         "it, or choose another --train.run_dir")


def run_config_dict(cfgs: dict[str, Any]) -> dict[str, dict]:
    return {name: dataclasses.asdict(c) for name, c in cfgs.items()}


def check_resumable(saved: dict, cfgs: dict, sections: dict[str, tuple[str, ...] | None], must_match: dict,
                    ckpt_dir: Path) -> None:
    """A resumed run must keep what its checkpoints were made from; how it executes and trains may change.

    The model section is compared by architecture (ModelConfig.architecture): attention_impl, remat,
    scan_layers and compute_dtype may differ, and so may every train / mesh setting.
    """
    for key, value in must_match.items():
        if saved.get(key) not in (None, value):
            raise ValueError(f"cannot resume from {ckpt_dir}: its {key.replace('_', ' ')} differs from this run's "
                             f"(the weights or data it started from changed)")
    for section, keys in sections.items():
        cfg = cfgs[section]
        now = cfg.architecture() if section == "model" else dataclasses.asdict(cfg)
        then = saved.get("config", {}).get(section, {})
        if section == "model" and then:  # as this version spells it (sub-configs by dotted name), whoever wrote it
            then = model_config_from_dict(then).architecture()
        diff = sorted(k for k in (keys or now) if k in then and _plain(now[k]) != _plain(then[k]))
        if diff:
            raise ValueError(f"cannot resume from {ckpt_dir}: {section} config differs in {diff} "
                             f"(checkpoint: {[then[k] for k in diff]}, now: {[now[k] for k in diff]})")


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def eval_batch_size(batch_size: int, mesh: Mesh, limit: int | None = None) -> int:
    """The largest batch <= min(batch_size, limit) that splits evenly over the mesh's batch rows (one each at least)."""
    rows = batch_rows(mesh) * jax.process_count()
    want = batch_size if limit is None else min(batch_size, limit)
    return max(rows, want // rows * rows)


def mean_loss(eval_fn: Callable, params: Any, batches: Iterable[dict], mesh: Mesh, *extra: Any) -> dict:
    """Token-weighted mean of eval_fn's (loss sum, token count) over batches: val_loss, val_ppl, val_tokens."""
    total, count = 0.0, 0.0
    for batch in batches:
        s, n = eval_fn(params, global_batch(batch, mesh), *extra)
        total, count = total + float(s), count + float(n)
    loss = total / max(count, 1.0)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": count}


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


def run_steps(setup: Setup, *, mesh: Mesh, tcfg: TrainConfig, start: int, ckpt: Checkpointer, logger: MetricsLogger,
              meta_base: dict, progress: bool, result: dict, parity: Callable[[Any], dict] | None = None,
              spikes: dict | None = None) -> tuple[Any, dict]:
    """Optimizer steps start+1 .. tcfg.steps with logging, evaluation, the parity check, checkpoints, graceful
    stops and, with tcfg.spike_threshold, loss-spike skips and rollbacks (`spikes`: the restored checkpoint's state
    of them).

    Returns (params, {**result, "step", "loss", eval metrics..., "stopped": signal name or None}); closes
    `ckpt` and `logger`.
    """
    lead = jax.process_index() == 0
    schedule = make_schedule(tcfg)
    peak = peak_tflops(tcfg.peak_tflops) * 1e12 * jax.device_count()
    stop = GracefulStop()
    bar = tqdm(total=tcfg.steps, initial=start, desc="train", disable=not (progress and lead), dynamic_ncols=True)
    state, it = setup.state, setup.iterator
    params, opt_state = state["params"], state["opt_state"]
    abstract = abstract_like(state)  # before the first step donates these buffers: what a rollback restores into
    guard = SpikeGuard(tcfg.spike_threshold, tcfg.spike_patience, spikes) if tcfg.spike_threshold else None
    last_good, last_eval = start, {k: v for k, v in result.items() if k.startswith("val_") and k != "val_loss_before"}
    loss = result.get("loss", float("nan"))
    t_log, tokens_since = time.perf_counter(), 0.0
    step = start
    try:
        while step < tcfg.steps:
            step += 1
            limits = guard.limits() if guard else None
            params, opt_state, metrics = setup.step(params, opt_state, global_batch(next(it), mesh), step, limits)
            m = jax.device_get(metrics)
            step_loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
            if guard is None:
                check_finite(step_loss, grad_norm, step, last_good, ckpt)
            tokens_since += float(m["tokens"])
            bar.update(1)
            if guard is not None and m["skipped"]:
                logger.log(step, "spike", guard.spike(step, step_loss, grad_norm, limits))
                if guard.must_roll_back():
                    to, state, meta = roll_back(ckpt, abstract, guard, step, it=it, logger=logger, meta_base=meta_base,
                                                eval_every=tcfg.eval_every)
                    setup.state, params, opt_state = state, state["params"], state["opt_state"]
                    loss, last_eval = meta["loss"], {k: v for k, v in recorded(meta).items() if k != "loss"}
                    step = last_good = to
                    t_log, tokens_since = time.perf_counter(), 0.0  # restoring is not training throughput
                    bar.n = step
                    bar.refresh()
                    if not stop.requested:
                        continue
                    say(f"{stop.requested}: saved a checkpoint at step {step}; resume with --resume")
                    break
            else:
                loss = step_loss
                if guard is not None:
                    guard.accept(step, loss, grad_norm)
                if step % tcfg.log_every == 0 or step == tcfg.steps:
                    dt = time.perf_counter() - t_log
                    tps = tokens_since / dt
                    logger.log(step, "train", {"loss": loss, "grad_norm": grad_norm, "lr": float(schedule(step - 1)),
                                               "tokens_per_s": tps, "mfu": tps * setup.flops_per_token / peak,
                                               **moe_scalars(m), **data_scalars(it)})
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
                    t_log, tokens_since = time.perf_counter(), 0.0
            val_loss = None
            if step % tcfg.eval_every == 0 or step == tcfg.steps:
                last_eval = setup.evaluate(params)
                val_loss = last_eval["val_loss"]
                logger.log(step, "eval", last_eval)
                t_log = time.perf_counter()  # evaluation time is not training throughput
            if parity is not None and step % tcfg.parity_every == 0:
                logger.log(step, "parity", parity(params))
                t_log = time.perf_counter()
            if step % tcfg.ckpt_every == 0 or step == tcfg.steps or stop.requested:
                spike_meta = {"spikes": guard.state()} if guard else {}
                ckpt.save(step, {"params": params, "opt_state": opt_state, "rng": state["rng"]}, it.get_state(),
                          {**meta_base, "step": step, "loss": loss, **last_eval, **spike_meta}, val_loss)
                last_good = step
            if stop.requested:
                say(f"\n{stop.requested}: saved a checkpoint at step {step}; resume with --resume")
                break
    finally:
        bar.close()
        stop.restore()
        ckpt.close()
        logger.close()
    return params, {**result, "step": last_good, "loss": loss, **last_eval, "stopped": stop.requested}


def data_scalars(iterator: Any) -> dict:
    """What the data iterator reports beside the loss (a mixture: tokens read per source); {} for most."""
    return iterator.scalars() if hasattr(iterator, "scalars") else {}


def check_finite(loss: float, grad_norm: float, step: int, last_good: int, ckpt: Checkpointer) -> None:
    """Without spike detection a NaN / Inf loss or gradient norm stops the run (NaN grads would poison the params)."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        bad = loss if not math.isfinite(loss) else f"finite ({loss:.4f}) but the gradient norm is {grad_norm}"
        raise NonFiniteLossError(
            f"loss became {bad} at step {step}; stopping. The last good checkpoint (step {last_good}) is "
            f"kept in {ckpt.directory}; lower --train.lr, raise warmup, or check the data")


def roll_back(ckpt: Checkpointer, abstract: Any, guard: SpikeGuard, step: int, *, it: Any, logger: MetricsLogger,
              meta_base: dict, eval_every: int) -> tuple[int, dict, dict]:
    """(step, state, meta) of the newest checkpoint before the guard's streak of spikes, restored: its params, optimizer
    state and spike window, not its data position (the batches since are skipped). It is saved again with the
    iterator's position, the checkpoints after it are deleted and metrics.jsonl drops their steps' train and eval
    records. LossSpikeError when there is no such checkpoint, or after MAX_ROLLBACKS."""
    first = guard.streak[0]
    what = (f"{len(guard.streak)} consecutive loss spikes at steps {first}..{step} (loss or gradient norm over "
            f"{guard.threshold} x the recent median, or not finite; metrics.jsonl's spike records hold the values)")
    fixes = "lower --train.lr, raise --train.warmup_steps, or check the data those steps read"
    if guard.rollbacks >= MAX_ROLLBACKS:
        raise LossSpikeError(f"{what}, after {guard.rollbacks} rollbacks in this run: the spikes keep coming back; "
                             f"stopping. {fixes}")
    ckpt.wait()  # pending saves listed
    before = [s for s in ckpt.steps() if s < first]
    if not before:
        raise LossSpikeError(f"{what}, and no checkpoint before step {first} to roll back to (checkpoints: "
                             f"{ckpt.steps()} in {ckpt.directory}); stopping. Checkpoint more often "
                             f"(--train.ckpt_every) or {fixes}")
    to, state, _, meta = ckpt.restore(abstract, step=before[-1])
    guard.rolled_back(meta.get("spikes"))
    ckpt.delete_from(to)  # a resume must never find the discarded steps, nor `to` with its old data position
    val_loss = meta.get("val_loss") if to % eval_every == 0 else None  # as it was saved (BestN's metric)
    ckpt.save(to, state, it.get_state(), {**meta, **meta_base, "spikes": guard.state()}, val_loss)
    logger.rewind(to)
    logger.log(to, "rollback", {"from_step": step, "to_step": to, "skipped_batches": step - to})
    say(f"\nloss spikes at steps {first}..{step}: rolled back to step {to}, skipping the {step - to} batches since")
    return to, state, meta


def parity_check(task: Task, setup: Setup, mesh: Mesh) -> Callable[[Any], dict]:
    """params -> {logits_max_abs, kl_mean, kl_max, top1_agreement}: jaxformer's logits on a fixed batch, computed on
    this run's mesh (its sharding, kernels and compute dtype), against torch_ref in float32 with the same weights.

    The batch is the task's held-out one (setup.parity_batch) or fixed random tokens. Every process joins the
    gathers; the lead process runs torch_ref (the others return {}, which the lead-only logger ignores).
    """
    from jaxformer.parity import Inputs, JaxSide, against_torch_ref  # torch is an optional dependency

    inputs = parity_inputs(task.model_config, setup.parity_batch, rows=batch_rows(mesh))
    replicated = NamedSharding(mesh, PartitionSpec())
    on_mesh = Inputs(**{k: None if v is None else jax.device_put(v, replicated) for k, v in inputs.arrays().items()})

    def check(params: Any) -> dict:
        host = task.model(params)  # the weights gathered, as torch_ref will hold them
        logits = gather_to_host(JaxSide(nnx.merge(nnx.graphdef(host), params)).logits_array(on_mesh))
        return against_torch_ref(host, inputs, np.asarray(logits)) if jax.process_index() == 0 else {}

    return check


def parity_inputs(cfg: ModelConfig, batch: dict | None, rows: int, seq: int = 64) -> Any:
    """parity_check's tokens: the task's batch (inputs, positions, segment ids), or `rows` random rows of `seq`."""
    from jaxformer.parity import Inputs

    if batch is not None:
        return Inputs(batch["inputs"], positions=batch.get("positions"), segment_ids=batch.get("segment_ids"))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (rows, min(seq, cfg.max_seq_len))).astype(np.int32)
    if not isinstance(cfg, EncDecConfig):
        return Inputs(tokens)
    tgt = rng.integers(0, cfg.vocab_size, tokens.shape).astype(np.int32)
    tgt[:, 0] = cfg.decoder_start_id
    return Inputs(tgt, src=tokens)


def windows(ds) -> Iterator[dict]:
    """Every batch of a finite grain MapDataset, in order."""
    for i in range(len(ds)):
        yield ds[i]
