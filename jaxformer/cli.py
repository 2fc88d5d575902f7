"""`jaxformer <verb>`: the command-line entry point."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def cmd_convert(args: argparse.Namespace) -> None:
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
    print(f"wrote {args.to} weights to {dst}")


def cmd_inspect(args: argparse.Namespace) -> None:
    from flax import nnx

    from jaxformer.config import load_model_config
    from jaxformer.interop import native
    from jaxformer.model import DecoderLM, count_params

    src = Path(args.src)
    if src.exists() and (native.is_native(src) or (src / "config.json").exists()):
        from jaxformer.interop.hf import config_from_hf

        cfg = native.read_config(src) if native.is_native(src) else config_from_hf(
            json.loads((src / "config.json").read_text()))
    else:
        cfg = load_model_config(args.src, args.overrides)
    n = count_params(nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0))))
    print(json.dumps({"model": cfg.to_dict(), "family": cfg.family, "params": n}, indent=2))


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from jaxformer.data.shards import iter_sources_text
    from jaxformer.data.tokenizer import train_tokenizer

    tok = train_tokenizer(iter_sources_text(args.input, args.jsonl_field), args.vocab_size)
    path = tok.save(args.out)
    print(f"wrote {path} ({tok.vocab_size} tokens)")


def cmd_prepare(args: argparse.Namespace) -> None:
    from jaxformer.data.shards import prepare

    m = prepare(args.input, args.tokenizer, args.out, val_fraction=args.val_fraction, jsonl_field=args.jsonl_field)
    report = {s: {k: v for k, v in info.items() if k != "shards"} for s, info in m["splits"].items()}
    print(json.dumps({"splits": report, "corpus": m["corpus"], "dtype": m["dtype"], "seconds": m["seconds"]},
                     indent=2))


def cmd_train(args: argparse.Namespace) -> None:
    from jaxformer.config import load_config
    from jaxformer.train.loop import train

    train(load_config(args.config, args.overrides), resume=args.resume, progress=not args.no_progress)


def cmd_eval(args: argparse.Namespace) -> None:
    import dataclasses

    import jax
    from flax import nnx

    from jaxformer.config import DataConfig, TrainConfig
    from jaxformer.data.shards import open_split
    from jaxformer.interop.auto import load_any
    from jaxformer.train.loop import evaluate
    from jaxformer.train.step import make_eval_step

    model = load_any(args.ckpt)
    run_meta = _run_config(args.ckpt)
    data = DataConfig(**{k: v for k, v in run_meta.get("data", {}).items()}) if run_meta else DataConfig()
    if args.data:
        data = dataclasses.replace(data, data_dir=args.data)
    if args.seq_len:
        data = dataclasses.replace(data, seq_len=args.seq_len)
    data = dataclasses.replace(data, seq_len=min(data.seq_len, model.config.max_seq_len))
    graphdef, params = nnx.split(model)
    eval_fn = jax.jit(make_eval_step(graphdef, packed=data.packed))
    out = evaluate(eval_fn, params, open_split(data.data_dir, args.split), data, args.batch_size, args.batches)
    out = {"split": args.split, "data_dir": data.data_dir, **out}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


def _run_config(src: str) -> dict | None:
    """The run config saved with a run directory's checkpoints (None for plain model files)."""
    from jaxformer.train.checkpoint import read_run_config

    return read_run_config(src)


def cmd_plot(args: argparse.Namespace) -> None:
    from jaxformer.train.metrics import plot_losses

    print(f"wrote {plot_losses(args.run_dir, args.out)}")


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
    tt.add_argument("--input", nargs="+", default=["stdlib"], help="files, directories, JSONL, or 'stdlib'")
    tt.add_argument("--vocab-size", type=int, default=8192)
    tt.add_argument("--jsonl-field", default="text")
    tt.add_argument("--out", required=True, help="output directory for tokenizer.json")
    tt.set_defaults(func=cmd_tokenizer_train)

    pr = sub.add_parser("prepare", help="tokenize a corpus into train/val token shards")
    pr.add_argument("--input", nargs="+", default=["stdlib"], help="files, directories, JSONL, or 'stdlib'")
    pr.add_argument("--tokenizer", required=True, help="tokenizer.json or its directory")
    pr.add_argument("--out", required=True)
    pr.add_argument("--val-fraction", type=float, default=0.02)
    pr.add_argument("--jsonl-field", default="text")
    pr.set_defaults(func=cmd_prepare)

    tr = sub.add_parser("train", help="train a model (builds tokenizer and shards on first use)")
    tr.add_argument("--config", default="tiny_code", help="preset name or config file")
    tr.add_argument("--resume", action="store_true", help="continue from the run's newest checkpoint")
    tr.add_argument("--no-progress", action="store_true", help="no progress bars")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="validation loss, perplexity and bits/byte on held-out shards")
    ev.add_argument("--ckpt", required=True, help="run directory, jaxformer model or Hugging Face directory")
    ev.add_argument("--data", help="shards directory (default: the run's)")
    ev.add_argument("--split", default="val")
    ev.add_argument("--seq-len", type=int)
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--batches", type=int, default=50)
    ev.add_argument("--json", help="also write the results to this file")
    ev.set_defaults(func=cmd_eval)

    pl = sub.add_parser("plot", help="write a run's loss curve PNG")
    pl.add_argument("run_dir")
    pl.add_argument("--out")
    pl.set_defaults(func=cmd_plot)
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # extra: dotted config overrides (--model.n_layers=4)
    if args.func in (cmd_train, cmd_inspect):
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
