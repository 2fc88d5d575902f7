"""`jaxformer <verb>`: the command-line entry point."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jaxformer.runtime import reexec_with_hugepages


def cmd_convert(args: argparse.Namespace) -> None:
    from jaxformer.data.tokenizer import copy_tokenizer_files, tokenizer_candidates
    from jaxformer.interop import hf, native
    from jaxformer.interop.auto import load_any

    model = load_any(args.src)
    dst = Path(args.dst)
    if args.to == "hf":
        hf.save_hf(model, dst)
    elif args.to == "jaxformer":
        if dst.suffix == ".safetensors":
            raise ValueError("--to jaxformer writes a directory; use --to torch for a single .safetensors file")
        native.save(model, dst)
    else:
        if dst.suffix != ".safetensors":
            dst = dst.with_suffix(".safetensors")
        native.save(model, dst)
    found = next((p.parent for p in tokenizer_candidates(args.src) if p.is_file()), None)
    if found is not None and dst.is_dir():  # a converted directory carries its tokenizer (and chat template)
        copy_tokenizer_files(found, dst)
    print(f"wrote {args.to} weights to {dst}" + (f", with the tokenizer of {found}" if found and dst.is_dir() else ""))


def cmd_inspect(args: argparse.Namespace) -> None:
    from flax import nnx

    from jaxformer.config import load_model_config
    from jaxformer.interop import native
    from jaxformer.models import count_params, model_class

    src = Path(args.src)
    if src.exists() and (native.is_native(src) or (src / "config.json").exists()):
        from jaxformer.interop.hf import config_from_hf

        cfg = native.read_config(src) if native.is_native(src) else config_from_hf(
            json.loads((src / "config.json").read_text()))
    else:
        cfg = load_model_config(args.src, args.overrides)
    n = count_params(nnx.eval_shape(lambda: model_class(cfg)(cfg, rngs=nnx.Rngs(0))))
    info = {"model": cfg.to_dict(), "family": cfg.family, "attention": attention_pattern(cfg),
            "heads": head_sharing(cfg), "params": n}
    if cfg.moe.n_experts:  # a Mixture of Experts: what one token runs through
        from jaxformer.models.moe import active_params

        info["active_params"] = active_params(cfg, n)
    print(json.dumps(info, indent=2))


def attention_pattern(cfg) -> str:
    """Layer types in words: 'all full', 'all sliding (window 4096)', '5 sliding (window 512) : 1 full'; a
    hybrid's by count in order of first appearance: '18 linear_attention, 6 full_attention (period 4)'."""
    types = [cfg.layer_type(i) for i in range(cfg.n_layers)]
    if cfg.has_state_layers or "chunked_attention" in types:
        period = next(p for p in range(1, len(types) + 1)
                      if len(types) % p == 0 and all(t == types[i % p] for i, t in enumerate(types)))
        counts = ", ".join(f"{types.count(t)} {t}" for t in dict.fromkeys(types))
        return counts + (f" (period {period}: {' '.join(types[:period])})" if period < len(types) else "")
    n_sliding = types.count("sliding_attention")
    if n_sliding in (0, len(types)):
        return "all full" if n_sliding == 0 else f"all sliding (window {cfg.attention.sliding_window})"
    period = next(p for p in range(1, len(types) + 1) if all(t == types[i % p] for i, t in enumerate(types)))
    if period < len(types):  # a repeating pattern (Gemma 2: 1 : 1, Gemma 3: 5 : 1); the last may be cut short
        s = types[:period].count("sliding_attention")
        return f"{s} sliding (window {cfg.attention.sliding_window}) : {period - s} full"
    return f"{n_sliding} sliding (window {cfg.attention.sliding_window}), {len(types) - n_sliding} full"


def head_sharing(cfg) -> str:
    """Query heads per key/value head: 'MHA 12:12', 'GQA 32:8' or 'MQA 8:1' (N:K)."""
    kind = "MHA" if cfg.n_kv_heads == cfg.n_heads else "MQA" if cfg.n_kv_heads == 1 else "GQA"
    return f"{kind} {cfg.n_heads}:{cfg.n_kv_heads}"


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from jaxformer.data.shards import iter_sources_text
    from jaxformer.data.tokenizer import train_tokenizer

    tok = train_tokenizer(iter_sources_text(args.input, args.field), args.vocab_size)
    path = tok.save(args.out)
    print(f"wrote {path} ({tok.vocab_size} tokens)")


def cmd_prepare(args: argparse.Namespace) -> None:
    from jaxformer.data.prepare import prepare

    m = prepare(args.input, args.tokenizer, args.out, val_fraction=args.val_fraction, jsonl_field=args.field,
                workers=args.workers, tasks=args.tasks, task=args.task, dedup=args.dedup,
                skip_bad_files=args.skip_bad_files)
    report = {s: {k: v for k, v in info.items() if k != "shards"} for s, info in m["splits"].items()}
    print(json.dumps({"splits": report, "corpus": m["corpus"], "dedup": m["dedup"], "task": m["task"],
                      "dtype": m["dtype"], "seconds": m["seconds"]}, indent=2))


def cmd_train(args: argparse.Namespace) -> None:
    from jaxformer import seq2seq
    from jaxformer.config import EncDecConfig, load_config
    from jaxformer.sharding import maybe_initialize_distributed
    from jaxformer.train import lm

    maybe_initialize_distributed(args.distributed)
    cfgs = load_config(args.config, args.overrides)
    task = seq2seq.train if isinstance(cfgs["model"], EncDecConfig) else lm.train  # the config picks the task
    task(cfgs, resume=args.resume, progress=not args.no_progress)


def cmd_finetune(args: argparse.Namespace) -> None:
    from jaxformer.config import parse_overrides
    from jaxformer.finetune import finetune, load_finetune_config
    from jaxformer.sharding import maybe_initialize_distributed

    flags = {"sft.base": args.base, "sft.data": args.data, "sft.val_data": args.val_data}
    overrides = {k: v for k, v in flags.items() if v}
    if args.full:
        overrides["sft.method"] = "full"
    overrides.update(parse_overrides(args.overrides))  # dotted overrides win over the flags above
    maybe_initialize_distributed(args.distributed)
    out = finetune(load_finetune_config(args.config, overrides), resume=args.resume, progress=not args.no_progress)
    keys = ("step", "loss", "val_loss_before", "val_loss", "model_dir", "adapter_dir")
    print(json.dumps({"trainable": out.get("trainable"), **{k: out[k] for k in keys if k in out}}, indent=2))


def cmd_eval(args: argparse.Namespace) -> None:
    from jaxformer.config import EncDecConfig
    from jaxformer.interop.auto import load_any

    model = load_any(args.ckpt)
    if isinstance(model.config, EncDecConfig):
        from jaxformer.seq2seq import evaluate_checkpoint

        evaluate_checkpoint(model, args.ckpt, split=args.split, data_dir=args.data, beam_size=args.beam_size,
                            length_penalty=args.length_penalty, batch_size=args.batch_size,
                            max_examples=args.max_examples, json_path=args.json)
        return
    from jaxformer.train.lm import evaluate_checkpoint

    out = evaluate_checkpoint(model, args.ckpt, data_dir=args.data, split=args.split, seq_len=args.seq_len,
                              batch_size=args.batch_size, batches=args.batches)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


def cmd_data_code2doc(args: argparse.Namespace) -> None:
    from jaxformer.seq2seq.code2doc import build_code2doc

    stats = build_code2doc(args.out, args.input, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                           include_tests=args.include_tests, min_words=args.min_words)
    print(json.dumps(stats, indent=2))


def cmd_plot(args: argparse.Namespace) -> None:
    from jaxformer.train.metrics import plot_losses

    print(f"wrote {plot_losses(args.run_dir, args.out)}")


def _sampling_params(args: argparse.Namespace):
    from jaxformer.infer.sampling import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                          frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty,
                          seed=args.seed, stop=tuple(args.stop or ()), stop_token_ids=tuple(args.stop_token_id or ()))


def cmd_generate(args: argparse.Namespace) -> None:
    import time

    from jaxformer.infer import generate, load_model, load_tokenizer_for

    tok = load_tokenizer_for(args.ckpt, args.tokenizer)
    model = load_model(args.ckpt, quantize_to=args.quantize)
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    stop_ids = tok.eos_ids
    if args.chat:  # the template writes its own special tokens; end-of-turn tokens stop the reply
        text, stop_ids = tok.apply_chat_template([{"role": "user", "content": text}]), tok.chat_stop_ids
    ids = tok.encode(text) if args.chat else tok.encode_prompt(text)
    if not ids:
        raise ValueError("the prompt is empty")
    if len(ids) >= model.config.max_seq_len:
        raise ValueError(f"the prompt has {len(ids)} tokens; the model's context is {model.config.max_seq_len}")
    engine = _make_engine(args, model, max_batch=1)
    if not args.chat:
        sys.stdout.write(text)
    sys.stdout.flush()
    start = time.perf_counter()
    drafter = _make_drafter(args, engine)
    [seq] = generate(engine, [ids], _sampling_params(args), tokenizer=tok, stop_ids=stop_ids,
                     on_text=lambda _, delta: (sys.stdout.write(delta), sys.stdout.flush()),
                     **({"drafter": drafter} if drafter is not None else {}))
    seconds = time.perf_counter() - start
    sys.stdout.write("\n")
    print(f"[{len(seq.tokens)} tokens in {seconds:.2f}s (first call includes compilation), "
          f"finish_reason={seq.finish_reason}]", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> None:
    import logging
    import os

    from jaxformer.infer import load_model, load_tokenizer_for
    from jaxformer.serve import create_app, serve

    logging.basicConfig(level=logging.INFO)
    api_key = args.api_key or os.environ.get("JAXFORMER_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: serving on {args.host} without an API key (--api-key)", file=sys.stderr)
    tok = load_tokenizer_for(args.ckpt, args.tokenizer)
    model = load_model(args.ckpt, quantize_to=args.quantize)
    name = args.model_name or Path(args.ckpt).resolve().name
    engine = _make_engine(args, model, max_batch=args.max_batch)
    app = create_app(model, tok, model_name=name, api_key=api_key, max_batch=args.max_batch, max_queue=args.max_queue,
                     drain_timeout=args.drain_timeout, max_body_bytes=args.max_body_bytes, engine=engine,
                     prefill_chunk=args.prefill_chunk, drafter=_make_drafter(args, engine))
    serve(app, args.host, args.port)


def cmd_quantize(args: argparse.Namespace) -> None:
    from jaxformer.checkpoint import read_run_config
    from jaxformer.infer.quant import is_quantized, load_model, quantize, report, save_quantized

    model = load_model(args.ckpt)
    if is_quantized(model):
        raise ValueError(f"{args.ckpt} is already quantized; quantize its float checkpoint instead")
    if args.bits == 8 and args.group_size is not None:
        raise ValueError("--group-size is for --bits 4 (int8 has one scale per output channel)")
    qmodel = quantize(model, args.bits, args.group_size, embeddings=not args.float_embeddings)
    out = save_quantized(qmodel, args.out, tokenizer_from=args.ckpt)
    data_dir = args.data
    if data_dir is None:
        run = read_run_config(args.ckpt) or {}
        data_dir = run.get("data", {}).get("data_dir")
        data_dir = data_dir if data_dir and Path(data_dir, "manifest.json").exists() else None
    result = {"out": str(out), **report(model, qmodel, data_dir=data_dir, seq_len=args.seq_len,
                                        windows=args.windows)}
    print(json.dumps(result, indent=2))


def cmd_plan(args: argparse.Namespace) -> None:
    from jaxformer.config import load_config
    from jaxformer.plan import format_report, plan_decode, plan_train

    from pallas_kernels.targets import GpuCompileUnavailable

    cfgs = load_config(args.config, args.overrides)
    common = dict(hosts=args.hosts, mem_fraction=args.mem_fraction, search=not args.no_search, config_name=args.config)
    try:
        if args.step == "train":
            out = plan_train(cfgs, args.target, args.devices, **common)
        else:
            out = plan_decode(cfgs, args.target, args.devices, batch=args.batch, context=args.context, **common)
    except GpuCompileUnavailable as e:  # the extra is missing: say how to install it, no traceback
        raise ValueError(str(e)) from None
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    print(format_report(out))


def cmd_export_onnx(args: argparse.Namespace) -> None:
    from jaxformer.interop.auto import load_any
    from jaxformer.interop.onnx import export_onnx, verify_onnx

    model = load_any(args.ckpt)
    path = export_onnx(model, args.out, opset=args.opset)
    result = {"out": str(path)}
    if not args.no_verify:
        result["max_abs_diff_vs_jaxformer"] = verify_onnx(model, path)
    print(json.dumps(result, indent=2))


def cmd_parity(args: argparse.Namespace) -> None:
    try:
        from jaxformer.parity import run
    except ModuleNotFoundError as e:  # torch (and, for Hugging Face references, transformers) are optional
        raise ValueError(f"jaxformer parity needs PyTorch: {e}; pip install 'jaxformer[hf]'") from None

    status = run(args)  # 0: every layer within tolerance; usage errors raise (exit 2)
    if status:
        raise SystemExit(status)


def cmd_viz(args: argparse.Namespace) -> None:
    from jaxformer.viz import run

    run(args)


def _add_generation_args(g: argparse.ArgumentParser) -> None:
    g.add_argument("--ckpt", required=True, help="jaxformer model/run directory or Hugging Face directory")
    g.add_argument("--tokenizer", help="tokenizer.json or its directory (default: found beside the checkpoint)")
    g.add_argument("--quantize", choices=["int8", "int4"],
                   help="quantize the weights on load (int4: groups of 64); a quantized directory needs no flag")
    g.add_argument("--kv-cache", choices=["int8"], help="store the KV cache as int8 with a scale per position and "
                   "kv head (about 3.8x less cache memory; `jaxformer quantize` reports its perplexity cost); "
                   "dense engine only")
    g.add_argument("--engine", choices=["paged", "dense"], default="paged",
                   help="paged: a pool of KV pages shared through page tables, prefix caching, chunked prefill "
                        "(default); dense: a [batch, max_len] cache per slot")
    g.add_argument("--page-size", type=int, default=16, help="paged engine: tokens per KV page")
    g.add_argument("--kv-memory", help="paged engine: bytes of KV pages, e.g. 8GiB or 512MiB (default: as many "
                                       "tokens as a dense cache of the same batch)")
    g.add_argument("--no-prefix-cache", action="store_true", help="paged engine: never share prompt pages")
    g.add_argument("--prefill-chunk", type=int, default=512,
                   help="paged engine: prompt tokens prefilled per step between decode steps")
    g.add_argument("--speculate", help="speculative decoding (paged engine): 'ngram' drafts by prompt lookup; a "
                                       "checkpoint directory drafts with that smaller model (same tokenizer)")
    g.add_argument("--draft-tokens", type=int, default=4, help="--speculate: tokens drafted per step")
    g.add_argument("--mesh.tensor", dest="mesh_tensor", type=int, default=1,
                   help="split the model over N devices (tensor parallel: heads, MLP, vocab; the KV pages' heads)")
    g.add_argument("--mesh.expert", dest="mesh_expert", type=int, default=1,
                   help="Mixture-of-Experts: split the experts over N devices")


def _bytes(text: str | None) -> int | None:
    """'8GiB', '512MiB', '2GB', '1000000' -> bytes."""
    if text is None:
        return None
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9,
             "tb": 10**12, "b": 1}
    t = text.strip().lower()
    for unit, scale in units.items():
        if t.endswith(unit) and t[:-len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(t[:-len(unit)]) * scale)
    if t.isdigit():
        return int(t)
    raise ValueError(f"--kv-memory={text!r}: give bytes with a unit, e.g. 8GiB, 512MiB or 2GB")


def _make_drafter(args: argparse.Namespace, engine):
    """--speculate: None, prompt lookup, or a draft model loaded from a checkpoint."""
    if not args.speculate:
        return None
    from jaxformer.infer.paged_engine import PagedEngine

    if not isinstance(engine, PagedEngine):
        raise ValueError("--speculate needs the paged engine (drop --engine dense / --kv-cache)")
    if args.speculate == "ngram":
        from jaxformer.infer.speculative import NgramDrafter

        return NgramDrafter(args.draft_tokens)
    from jaxformer.infer import load_model
    from jaxformer.infer.draft_model import ModelDrafter

    if not Path(args.speculate).exists():
        raise ValueError(f"--speculate {args.speculate!r}: give 'ngram' or a draft model's checkpoint directory")
    return ModelDrafter(load_model(args.speculate), engine, args.draft_tokens)


def _make_engine(args: argparse.Namespace, model, max_batch: int):
    """The engine the generation flags ask for: paged (on a mesh when --mesh.* > 1) or dense."""
    from jaxformer.infer import Engine
    from jaxformer.infer.paged_engine import PagedEngine

    if args.engine == "dense" or args.kv_cache:
        if args.mesh_tensor * args.mesh_expert > 1:
            raise ValueError("--mesh.tensor / --mesh.expert need the paged engine (drop --engine dense / --kv-cache)")
        return Engine(model, max_batch=max_batch, kv_dtype=args.kv_cache)
    mesh = None
    if args.mesh_tensor * args.mesh_expert > 1:
        import jax

        from jaxformer import sharding
        from jaxformer.config import MeshConfig

        n = args.mesh_tensor * args.mesh_expert
        if n > jax.device_count():
            raise ValueError(f"--mesh.tensor x --mesh.expert = {n} devices, but {jax.device_count()} are here")
        mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=args.mesh_tensor, expert=args.mesh_expert),
                                  model.config, devices=jax.devices()[:n])
    return PagedEngine(model, max_batch=max_batch, page_size=args.page_size, kv_memory=_bytes(args.kv_memory),
                       prefix_cache=not args.no_prefix_cache, mesh=mesh)

DISTRIBUTED_HELP = ("join a multi-host run that JAX detects by itself (Cloud TPU pod slice, GKE, Open MPI); "
                    "SLURM and JAX_COORDINATOR_ADDRESS runs are joined without it")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxformer", description="Transformer LLMs in JAX/Flax NNX.",
                                epilog="train and inspect also take config overrides: --section.key=value")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert weights between jaxformer, Hugging Face and torch_ref")
    c.add_argument("--to", required=True, choices=["jaxformer", "hf", "torch"],
                   help="jaxformer: directory; hf: save_pretrained directory; torch: one .safetensors for torch_ref")
    c.add_argument("src", help="a Hugging Face directory or a jaxformer checkpoint")
    c.add_argument("dst")
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser("inspect", help="print a config (preset, file or checkpoint) and its parameter count")
    i.add_argument("src", help="preset name, config file, jaxformer checkpoint or Hugging Face directory")
    i.set_defaults(func=cmd_inspect)

    tk = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tokenizer_command", required=True)
    tt = tk.add_parser("train", help="train a byte-level BPE tokenizer")
    tt.add_argument("--input", nargs="+", default=["stdlib"], help="files and directories (any prepare format), or 'stdlib'")
    tt.add_argument("--vocab-size", type=int, default=8192)
    tt.add_argument("--field", "--jsonl-field", default="text", help="the text field of JSONL / parquet / Arrow")
    tt.add_argument("--out", required=True, help="output directory for tokenizer.json")
    tt.set_defaults(func=cmd_tokenizer_train)

    pr = sub.add_parser("prepare", help="tokenize a corpus into train/val token shards",
                        description="Formats by suffix: text; JSON lines (.jsonl, and .json when compressed); "
                                    ".parquet; .arrow and `save_to_disk` directories; Common Crawl .warc/.wet; "
                                    "MediaWiki .xml dumps; each plain or .gz/.bz2/.xz/.zst (docs/data.md).")
    pr.add_argument("--input", nargs="+", default=["stdlib"], help="files and directories, or 'stdlib'")
    pr.add_argument("--tokenizer", required=True, help="tokenizer.json or its directory")
    pr.add_argument("--out", required=True)
    pr.add_argument("--val-fraction", type=float, default=0.02)
    pr.add_argument("--field", "--jsonl-field", default="text", help="the text field of JSONL / parquet / Arrow")
    pr.add_argument("--workers", type=int, default=1, help="processes on this machine (one file each at a time)")
    pr.add_argument("--tasks", type=int, default=None,
                    help="split the files over N tasks (machines); default SLURM_ARRAY_TASK_COUNT, else 1")
    pr.add_argument("--task", type=int, default=None, help="this task's index; default from SLURM_ARRAY_TASK_ID")
    pr.add_argument("--dedup", choices=["none", "exact", "minhash"], default="none",
                    help="drop duplicate documents within this task: exact (normalised text) or minhash (near)")
    pr.add_argument("--skip-bad-files", action="store_true",
                    help="skip files that cannot be read, recording why in the manifest, instead of stopping")
    pr.set_defaults(func=cmd_prepare)

    tr = sub.add_parser("train", help="train a model (builds tokenizer and shards on first use)")
    tr.add_argument("--config", default="tiny_code", help="preset name or config file")
    tr.add_argument("--resume", action="store_true", help="continue from the run's newest checkpoint")
    tr.add_argument("--no-progress", action="store_true", help="no progress bars")
    tr.add_argument("--distributed", action="store_true", help=DISTRIBUTED_HELP)
    tr.set_defaults(func=cmd_train)

    ft = sub.add_parser("finetune", help="LoRA or full supervised fine-tuning on chat / prompt-completion JSONL",
                        epilog="also takes dotted overrides of the sft, lora, train and mesh sections, "
                               "e.g. --lora.rank 16 --lora.targets q,v --train.steps=500")
    ft.add_argument("--config", default="finetune_lora", help="preset name or config file (sft/lora/train/mesh)")
    ft.add_argument("--base", help="base weights: jaxformer model or run directory, or a Hugging Face directory")
    ft.add_argument("--data", nargs="+", help="JSONL training examples ({\"messages\": [...]} or prompt/completion)")
    ft.add_argument("--val-data", nargs="+", help="held-out JSONL (default: a hash split of --data)")
    ft.add_argument("--full", action="store_true", help="full fine-tuning (every parameter) instead of LoRA")
    ft.add_argument("--resume", action="store_true", help="continue from the run's newest checkpoint")
    ft.add_argument("--no-progress", action="store_true", help="no progress bars")
    ft.add_argument("--distributed", action="store_true", help=DISTRIBUTED_HELP)
    ft.set_defaults(func=cmd_finetune)

    da = sub.add_parser("data", help="build a task's data").add_subparsers(dest="data_command", required=True)
    dc = da.add_parser("code2doc", help="code summarization pairs (function -> first docstring line) with ast")
    dc.add_argument("--input", nargs="+", default=["stdlib"], help=".py files, directories, or 'stdlib'")
    dc.add_argument("--out", required=True, help="output directory for {train,val,test}.jsonl and stats.json")
    dc.add_argument("--val-fraction", type=float, default=0.05, help="share of modules in the val split")
    dc.add_argument("--test-fraction", type=float, default=0.05, help="share of modules in the test split")
    dc.add_argument("--include-tests", action="store_true", help="also read test suites (test/, tests/ dirs)")
    dc.add_argument("--min-words", type=int, default=3, help="shortest docstring line kept, in words")
    dc.set_defaults(func=cmd_data_code2doc)

    ev = sub.add_parser("eval", help="held-out loss and perplexity (LM: bits/byte; encoder-decoder: BLEU, ROUGE)")
    ev.add_argument("--ckpt", required=True, help="run directory, jaxformer model or Hugging Face directory")
    ev.add_argument("--data", help="shards directory (default: the run's)")
    ev.add_argument("--split", default="val")
    ev.add_argument("--seq-len", type=int)
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--batches", type=int, default=50)
    ev.add_argument("--json", help="also write the results to this file (encoder-decoder: default "
                    "RUN/eval_SPLIT.json)")
    ev.add_argument("--beam-size", type=int, help="encoder-decoder: beam size (default: the run's; 1 is greedy)")
    ev.add_argument("--length-penalty", type=float, help="encoder-decoder: beam length penalty (default: the run's)")
    ev.add_argument("--max-examples", type=int, help="encoder-decoder: decode only the first N pairs")
    ev.set_defaults(func=cmd_eval)

    pl = sub.add_parser("plot", help="write a run's loss curve PNG")
    pl.add_argument("run_dir")
    pl.add_argument("--out")
    pl.set_defaults(func=cmd_plot)

    ge = sub.add_parser("generate", help="stream a continuation of a prompt to the terminal")
    _add_generation_args(ge)
    ge.add_argument("--prompt", required=True, help="the prompt text ('-' reads standard input)")
    ge.add_argument("--chat", action="store_true", help="send the prompt as a user message in the chat template")
    ge.add_argument("--max-new-tokens", type=int, default=128)
    ge.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    ge.add_argument("--top-k", type=int, default=0)
    ge.add_argument("--top-p", type=float, default=0.95)
    ge.add_argument("--repetition-penalty", type=float, default=1.0)
    ge.add_argument("--frequency-penalty", type=float, default=0.0)
    ge.add_argument("--presence-penalty", type=float, default=0.0)
    ge.add_argument("--seed", type=int, default=0)
    ge.add_argument("--stop", action="append", help="stop string (repeatable)")
    ge.add_argument("--stop-token-id", type=int, action="append", help="stop token id (repeatable)")
    ge.set_defaults(func=cmd_generate)

    se = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    _add_generation_args(se)
    se.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    se.add_argument("--port", type=int, default=8000)
    se.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (also read from JAXFORMER_API_KEY)")
    se.add_argument("--model-name", help="the model id clients send (default: the checkpoint's directory name)")
    se.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    se.add_argument("--max-queue", type=int, default=64, help="sequences waiting for a slot before 429")
    se.add_argument("--drain-timeout", type=float, default=30.0,
                    help="seconds running requests may take to finish at shutdown")
    se.add_argument("--max-body-bytes", type=int, default=1 << 20,
                    help="largest request body accepted; larger ones get 413 (default 1 MiB)")
    se.set_defaults(func=cmd_serve)

    qu = sub.add_parser("quantize", help="int8 / int4 weight-only quantization; reports memory, bytes per token, "
                        "perplexity, agreement, logits vs the dequantized reference, and an int8 KV cache's cost")
    qu.add_argument("--ckpt", required=True)
    qu.add_argument("--out", required=True, help="output directory (jaxformer format with a quantization entry)")
    qu.add_argument("--bits", type=int, choices=[8, 4], default=8,
                    help="8: int8, a scale per output channel; 4: int4, a scale and zero per group of inputs")
    qu.add_argument("--group-size", type=int, choices=[32, 64, 128], help="int4: inputs per group (default 64)")
    qu.add_argument("--float-embeddings", action="store_true",
                    help="keep the token embedding float (by default it is quantized: a tied LM head reads it all)")
    qu.add_argument("--data", help="token shards for the perplexity check (default: the run's, when present)")
    qu.add_argument("--seq-len", type=int)
    qu.add_argument("--windows", type=int, default=32, help="held-out windows to evaluate")
    qu.set_defaults(func=cmd_quantize)

    ex = sub.add_parser("export", help="export a model to another runtime").add_subparsers(
        dest="export_format", required=True)
    eo = ex.add_parser("onnx", help="ONNX via torch_ref (dynamic batch and sequence), checked with onnxruntime")
    eo.add_argument("--ckpt", required=True)
    eo.add_argument("--out", required=True, help="the .onnx file to write")
    eo.add_argument("--opset", type=int, default=18)
    eo.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    eo.set_defaults(func=cmd_export_onnx)

    pn = sub.add_parser("plan", help="compile a step for GPUs that are not here: memory per device, FLOPs, roofline, "
                        "the largest batch that fits", epilog="also takes dotted overrides: --mesh.fsdp=8 "
                        "--train.batch_size=16 --data.seq_len=4096 --model.remat=full ...")
    pn.add_argument("--config", required=True, help="preset name or config file")
    pn.add_argument("--target", required=True, help="GPU model: h100, h200, a100, a100-40gb")
    pn.add_argument("--devices", type=int, required=True, help="GPUs in all")
    pn.add_argument("--hosts", type=int, default=1, help="hosts they are spread over (devices / hosts per host)")
    pn.add_argument("--step", choices=["train", "decode"], default="train",
                    help="train: the optimizer step; decode: the inference engine's one-token step")
    pn.add_argument("--batch", type=int, default=8, help="decode: sequences decoded together")
    pn.add_argument("--context", type=int, help="decode: tokens of KV cache per sequence (default: max_seq_len)")
    pn.add_argument("--mem-fraction", type=float, default=0.75,
                    help="share of GPU memory JAX may use (XLA_PYTHON_CLIENT_MEM_FRACTION; JAX's default 0.75)")
    pn.add_argument("--no-search", action="store_true", help="skip the largest-batch search (fewer compiles)")
    pn.add_argument("--json", help="also write the full report to this file")
    pn.set_defaults(func=cmd_plan)

    pa = sub.add_parser("parity", help="run a checkpoint through jaxformer and PyTorch (torch_ref or transformers) "
                        "on the same tokens and compare every layer; exit 0 within tolerance, 1 not, 2 usage error")
    pa.add_argument("source", help="a jaxformer run or model directory, or a Hugging Face directory")
    pa.add_argument("--against", default="torch_ref", metavar="torch_ref|hf|HF_DIR",
                    help="torch_ref (default): the torch_ref twin with the same weights; hf: the transformers model of "
                         "SOURCE (exported to a temporary directory when SOURCE is jaxformer's); HF_DIR: another "
                         "Hugging Face directory, run by transformers")
    what = pa.add_mutually_exclusive_group()
    what.add_argument("--prompt", help="text, through the checkpoint's tokenizer (repeated on every row)")
    what.add_argument("--tokens", type=int, help="N random tokens per row, seeded (default 32)")
    pa.add_argument("--batch", type=int, default=2, help="rows (default 2)")
    pa.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="jaxformer's compute dtype; the reference stays float32")
    pa.add_argument("--attention-impl", choices=["xla", "auto", "cudnn", "pallas"],
                    help="jaxformer's attention implementation (default: the checkpoint's; pallas interprets off GPU)")
    pa.add_argument("--grads", action="store_true", help="also compare the loss gradient of every parameter")
    pa.add_argument("--json", help="write the result as JSON to this file")
    pa.add_argument("--atol", type=float, help="absolute tolerance (default 1e-5; 1e-4 against transformers)")
    pa.add_argument("--greedy", type=int, default=32, help="greedy tokens generated on each side (default 32)")
    pa.add_argument("--seed", type=int, default=0, help="seed of the random tokens")
    pa.add_argument("--tokenizer", help="tokenizer.json or its directory (default: found beside SOURCE)")
    pa.set_defaults(func=cmd_parity)

    vz = sub.add_parser("viz", help="figures of a model on a prompt: attention maps, positional encodings, "
                        "residual-stream norms, logit lens; PNGs and an index.html")
    vz.add_argument("source", help="a jaxformer run or model directory, or a Hugging Face directory")
    vz.add_argument("--prompt", required=True, help="the text the figures show (through the checkpoint's tokenizer)")
    vz.add_argument("--out", required=True, help="directory for the PNGs and index.html")
    vz.add_argument("--tokenizer", help="tokenizer.json or its directory (default: found beside SOURCE)")
    vz.set_defaults(func=cmd_viz)
    return p


def main(argv: list[str] | None = None) -> None:
    if argv is None:  # the `jaxformer` command (not a call from Python): malloc in huge pages (runtime.py)
        reexec_with_hugepages()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # extra: dotted config overrides (--model.n_layers=4)
    if args.func in (cmd_train, cmd_inspect, cmd_finetune, cmd_plan):
        args.overrides = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:  # user errors: a message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
