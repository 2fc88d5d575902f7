"""`jaxformer parity SOURCE`: the same tokens through jaxformer and PyTorch, compared layer by layer.

    check(source, against="torch_ref" | "hf" | HF_DIR, ...) -> Report     the programmatic form
    run(args) -> exit status                                             0 agree, 1 diverge (usage errors raise)

The reference runs in float32: torch_ref (the twin built from the same weights), or transformers (SOURCE's own
Hugging Face directory, or SOURCE exported to a temporary one, or another directory). jaxformer runs in the
compute dtype and attention implementation asked for, so a bf16 run or a Pallas kernel is checked against the
float32 reference; Pallas runs in interpret mode where there is no GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
from pathlib import Path

import jax
import numpy as np

from jaxformer.config import EncDecConfig, ModelConfig
from jaxformer.data.tokenizer import load_tokenizer_for
from jaxformer.interop import hf as hf_interop
from jaxformer.interop.auto import load_any
from jaxformer.parity.compare import grad_rows, logits_summary, matching_prefix, tensor_row, tolerance
from jaxformer.parity.report import Report
from jaxformer.parity.sides import HFSide, Inputs, JaxSide, TorchRefSide, greedy, read_hf_config
from pallas_kernels.common import INTERPRET_ENV

DEFAULT_TOKENS = 32
SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_encoder_layers")  # what two compared models share


def run(args: argparse.Namespace) -> int:
    """Print the table and summary, write --json, return the exit status (0 within tolerance, 1 not)."""
    report = check(args.source, against=args.against, prompt=args.prompt, n_tokens=args.tokens, batch=args.batch,
                   dtype=args.dtype, attention_impl=args.attention_impl, grads=args.grads, atol=args.atol,
                   greedy_tokens=args.greedy, seed=args.seed, tokenizer=args.tokenizer)
    print(report.format())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=2))
    return report.exit_status


def check(source: str | Path, *, against: str = "torch_ref", prompt: str | None = None, n_tokens: int | None = None,
          batch: int = 2, dtype: str = "float32", attention_impl: str | None = None, grads: bool = False,
          atol: float | None = None, greedy_tokens: int = 32, seed: int = 0, tokenizer: str | None = None) -> Report:
    """Run SOURCE through jaxformer and the reference on the same tokens; the per-layer comparison as a Report."""
    if batch < 1 or greedy_tokens < 0 or (n_tokens is not None and n_tokens < 2):
        raise ValueError(f"need --batch >= 1, --tokens >= 2 and --greedy >= 0; got {batch}, {n_tokens}, "
                         f"{greedy_tokens}")
    overrides = {"compute_dtype": dtype, "remat": "none", "scan_layers": False}
    if attention_impl:
        overrides["attention_impl"] = attention_impl
    model = load_any(source, **overrides)
    jax_side = JaxSide(model)
    inputs, inputs_label = make_inputs(model.config, source, prompt, n_tokens, batch, seed, tokenizer)
    with contextlib.ExitStack() as stack:
        ref = reference(model, source, against, stack)
        tol = tolerance(dtype, against_hf=not isinstance(ref, TorchRefSide), atol=atol)
        stack.enter_context(pallas_interpret_off_gpu(model.config.attention_impl))
        got, want = jax_side.trace(inputs), ref.trace(inputs)
        if set(got.hidden) != set(want.hidden):
            raise RuntimeError(f"the two sides recorded different layers: {sorted(got.hidden)} and "
                               f"{sorted(want.hidden)} ({ref.label})")
        layers = [tensor_row(k, v, want.hidden[k], tol) for k, v in got.hidden.items()]
        layers.append(tensor_row("lm_head", got.logits, want.logits, tol))
        prompt_row, n = greedy_prompt(model.config, inputs, greedy_tokens)
        ours, theirs = greedy(jax_side, prompt_row, n), greedy(ref, prompt_row, n)
        grad_table, losses = None, None
        if grads:
            (loss_j, g_j), (loss_r, g_r) = jax_side.grads(inputs), ref.grads(inputs)
            grad_table, losses = grad_rows(g_j, g_r, tol), (loss_j, loss_r)
    return Report(source=str(source), jax_label=jax_side.label, ref_label=ref.label, inputs_label=inputs_label,
                  tolerance=tol, layers=layers, summary=logits_summary(got.logits, want.logits),
                  greedy_match=matching_prefix(ours, theirs), greedy_tokens=n, grads=grad_table, loss=losses)


def reference(model, source: str | Path, against: str, stack: contextlib.ExitStack):
    """The side jaxformer is checked against (a temporary export lives as long as `stack`)."""
    if against == "torch_ref":
        return TorchRefSide(model)
    if against == "hf":
        if is_hf_dir(source):
            return HFSide(source)
        out = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="jaxformer-parity-")))
        hf_interop.save_hf(model, out)  # a config the Hugging Face families cannot express is refused here
        return HFSide(out)
    if not Path(against).exists():
        raise FileNotFoundError(f"--against {against}: no such directory; give torch_ref, hf or a Hugging Face "
                                "directory")
    theirs = hf_interop.config_from_hf(read_hf_config(against))
    differ = {k: (getattr(model.config, k, None), getattr(theirs, k, None)) for k in SHAPE_FIELDS
              if getattr(model.config, k, None) != getattr(theirs, k, None)}
    if isinstance(model.config, EncDecConfig) != isinstance(theirs, EncDecConfig):
        differ["encoder-decoder"] = (isinstance(model.config, EncDecConfig), isinstance(theirs, EncDecConfig))
    if differ:
        raise ValueError(f"{source} and {against} are models of different shapes ({differ}, as (SOURCE, HF_DIR)); "
                         "parity compares two checkpoints of one architecture")
    return HFSide(against)


def is_hf_dir(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.is_file() and "model_type" in json.loads(cfg.read_text())


@contextlib.contextmanager
def pallas_interpret_off_gpu(impl: str):
    """attention_impl=pallas without a GPU: the kernels run in Pallas' interpret mode for the duration."""
    if impl != "pallas" or jax.default_backend() == "gpu":
        yield
        return
    old = os.environ.get(INTERPRET_ENV)
    os.environ[INTERPRET_ENV] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(INTERPRET_ENV)
        else:
            os.environ[INTERPRET_ENV] = old


def make_inputs(cfg: ModelConfig, source, prompt: str | None, n_tokens: int | None, batch: int, seed: int,
                tokenizer: str | None) -> tuple[Inputs, str]:
    """The tokens both sides run, and a line saying what they are.

    Decoder-only: the rows are the decoder's input. Encoder-decoder: the rows are the source; the decoder reads
    random target tokens (the start id first) of the same length.
    """
    rng = np.random.default_rng(seed)
    if prompt is not None:
        ids = load_tokenizer_for(source, tokenizer).encode_prompt(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        rows = np.tile(np.asarray(ids, np.int32), (batch, 1))
        label = f"the prompt {prompt[:40]!r} ({len(ids)} tokens) on {batch} rows"
    else:
        n = DEFAULT_TOKENS if n_tokens is None else n_tokens
        rows = rng.integers(0, cfg.vocab_size, (batch, n)).astype(np.int32)
        label = f"{batch} x {n} random tokens (seed {seed})"
    if rows.shape[1] > cfg.max_seq_len:
        raise ValueError(f"{rows.shape[1]} tokens, more than the model's max_seq_len={cfg.max_seq_len}; "
                         "shorten the prompt or lower --tokens")
    if not isinstance(cfg, EncDecConfig):
        return Inputs(rows), label
    tgt = rng.integers(0, cfg.vocab_size, rows.shape).astype(np.int32)
    tgt[:, 0] = cfg.decoder_start_id
    return Inputs(tgt, src=rows), label + " as the source; random targets"


def greedy_prompt(cfg: ModelConfig, inputs: Inputs, n: int) -> tuple[Inputs, int]:
    """Greedy decoding's start (row 0; the encoder-decoder's decoder starts at its start id) and how many tokens
    fit in max_seq_len."""
    if isinstance(cfg, EncDecConfig):
        start = Inputs(np.full((1, 1), cfg.decoder_start_id, np.int32), src=inputs.src[:1])
    else:
        start = Inputs(inputs.tokens[:1])
    return start, max(0, min(n, cfg.max_seq_len - start.tokens.shape[1]))
