"""Seq2seq evaluation: decode a split (beam search, or greedy at beam size 1), score the outputs with
BLEU and ROUGE (jaxformer.seq2seq.metrics), perplexity from the teacher-forced loss, and the same
text metrics for a trivial baseline when the pairs are code (the function name split into words).
`jaxformer eval` on an encoder-decoder (evaluate_checkpoint) and the end of `jaxformer train` both
print this report.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxformer.checkpoint import read_run_config
from jaxformer.config import Seq2SeqConfig
from jaxformer.data.tokenizer import load_tokenizer
from jaxformer.seq2seq.beam import beam_search, greedy_decode, strip
from jaxformer.seq2seq.code2doc import function_name, name_baseline
from jaxformer.seq2seq.data import Pairs, detruecase, eval_dataset, load_split
from jaxformer.seq2seq.metrics import format_table, text_metrics
from jaxformer.seq2seq.step import seq2seq_loss
from jaxformer.train.step import make_eval_step

BASELINE = "function name split into words"
N_SAMPLES = 5


def decode_pairs(model, tok, pairs: Pairs, cfg: Seq2SeqConfig, *, beam_size: int, length_penalty: float,
                 batch_size: int, max_examples: int | None = None) -> tuple[list[int], list[str], dict]:
    """(example rows, decoded texts, {"nll", "tokens"}) over the first max_examples pairs, batched by length."""
    mcfg = model.config
    graphdef, state = nnx.split(model)
    eval_fn = jax.jit(make_eval_step(seq2seq_loss(graphdef, label_smoothing=0.0)))
    ds = eval_dataset(pairs, cfg, batch_size, pad_id=mcfg.pad_id, start_id=mcfg.decoder_start_id,
                      max_examples=max_examples)
    rows, texts, nll, count = [], [], 0.0, 0.0
    for i in range(len(ds)):
        b = ds[i]
        if beam_size == 1:
            out = greedy_decode(model, b["src"], b["src_mask"], max_len=cfg.max_target_len)[0]
        else:
            out = beam_search(model, b["src"], b["src_mask"], beam_size=beam_size, max_len=cfg.max_target_len,
                              length_penalty=length_penalty).tokens[:, 0]
        s, n = eval_fn(state, {k: v for k, v in b.items() if k != "rows"}, None)
        nll, count = nll + float(s), count + float(n)
        for r, ids in zip(b["rows"], out):
            if r >= 0:
                rows.append(int(r))
                text = tok.decode(strip(ids, mcfg.eos_id))
                texts.append(detruecase(text) if cfg.truecase_targets else text.strip())
    return rows, texts, {"nll": nll, "tokens": count}


def evaluate_seq2seq(model, tok, pairs: Pairs, cfg: Seq2SeqConfig, *, split: str, beam_size: int | None = None,
                     length_penalty: float | None = None, batch_size: int | None = None,
                     max_examples: int | None = None) -> dict:
    """The report: decoding settings, model and baseline metrics, BLEU signature, a few samples."""
    beam_size = cfg.beam_size if beam_size is None else beam_size
    length_penalty = cfg.length_penalty if length_penalty is None else length_penalty
    max_examples = cfg.eval_max_examples if max_examples is None else max_examples
    t0 = time.perf_counter()
    rows, hyps, loss = decode_pairs(model, tok, pairs, cfg, beam_size=beam_size, length_penalty=length_penalty,
                                    batch_size=batch_size or cfg.eval_batch_size, max_examples=max_examples)
    order = np.argsort(rows, kind="stable")
    rows, hyps = [rows[i] for i in order], [hyps[i] for i in order]
    records = [pairs.records[r] for r in rows]
    refs = [r["target"] for r in records]
    nll = loss["nll"] / max(loss["tokens"], 1.0)
    ours = text_metrics(hyps, refs)
    report = {"split": split, "examples": len(rows),
              "decoding": {"beam_size": beam_size, "length_penalty": length_penalty, "max_len": cfg.max_target_len},
              "bleu_signature": ours.pop("bleu_signature"),
              "model": {**ours, "loss": nll, "perplexity": math.exp(min(nll, 50.0))}}
    names = [r.get("name") or function_name(r["source"]) for r in records]
    base = [name_baseline(n) for n in names]
    if all(names):
        scores = text_metrics(base, refs)
        scores.pop("bleu_signature")
        report["baseline"] = {"name": BASELINE, **scores}
    report["samples"] = [{"name": n, "reference": ref, "model": h, **({"baseline": b} if all(names) else {})}
                         for n, ref, h, b in list(zip(names, refs, hyps, base))[:N_SAMPLES]]
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def report_table(report: dict) -> str:
    """The report's metrics as a table: the model, then the baseline."""
    d = report["decoding"]
    system = "model (greedy)" if d["beam_size"] == 1 else f"model (beam {d['beam_size']}, lp {d['length_penalty']:g})"
    rows = {system: report["model"]}
    if "baseline" in report:
        rows[f"baseline: {report['baseline']['name']}"] = report["baseline"]
    return format_table(rows, ("bleu", "rouge1", "rouge2", "rougeL", "perplexity"))


def print_report(report: dict, json_path: str | Path | None = None) -> None:
    """Print the table, the BLEU signature and samples; write the report as JSON when a path is given."""
    print(f"\n{report['split']} split, {report['examples']} examples ({report['seconds']} s)")
    print(report_table(report))
    print(f"BLEU signature: {report['bleu_signature']}")
    for s in report["samples"]:
        print(f"  {s['name'] or '-'}\n    reference: {s['reference']}\n    model:     {s['model']}")
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2))
        print(f"wrote {json_path}")


def evaluate_checkpoint(model, src: str | Path, *, split: str = "val", data_dir: str | None = None,
                        beam_size: int | None = None, length_penalty: float | None = None,
                        batch_size: int | None = None, max_examples: int | None = None,
                        json_path: str | Path | None = None) -> dict:
    """`jaxformer eval` for an encoder-decoder: the report on a split of its pairs, printed and written as JSON.

    The seq2seq settings are the run's (when `src` is a run directory or its model/); the JSON goes to
    json_path, else RUN_DIR/eval_SPLIT.json.
    """
    src = Path(src)
    run_dir = src if (src / "checkpoints").is_dir() else src.parent if (src.parent / "checkpoints").is_dir() else None
    run = (read_run_config(run_dir) or {}) if run_dir else {}
    cfg = Seq2SeqConfig(**run.get("seq2seq", {}))
    if data_dir:
        cfg = dataclasses.replace(cfg, data_dir=data_dir)
    tok_dir = next((d for d in (src, src / "model", Path(cfg.data_dir)) if (d / "tokenizer.json").exists()), None)
    if tok_dir is None:
        raise FileNotFoundError(f"no tokenizer.json in {src}, {src / 'model'} or {cfg.data_dir}")
    tok = load_tokenizer(tok_dir)
    report = evaluate_seq2seq(model, tok, load_split(cfg.data_dir, split, tok, cfg), cfg, split=split,
                              beam_size=beam_size, length_penalty=length_penalty, batch_size=batch_size,
                              max_examples=max_examples)
    out = Path(json_path) if json_path else (run_dir or (src if src.is_dir() else src.parent)) / f"eval_{split}.json"
    print_report(report, out)
    return report
