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
            raise SystemExit("error: --to jaxformer writes a directory; use --to torch for a single .safetensors file")
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxformer", description="Transformer LLMs in JAX/Flax NNX.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert weights between jaxformer, Hugging Face and torch_ref")
    c.add_argument("--to", required=True, choices=["jaxformer", "hf", "torch"],
                   help="jaxformer: directory; hf: save_pretrained directory; torch: one .safetensors for torch_ref")
    c.add_argument("src", help="a Hugging Face directory or a jaxformer checkpoint")
    c.add_argument("dst")
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser("inspect", help="print a config (preset, file or checkpoint) and its parameter count")
    i.add_argument("src", help="preset name, config file, jaxformer checkpoint or Hugging Face directory")
    i.add_argument("overrides", nargs=argparse.REMAINDER, help="--model.key=value ...")
    i.set_defaults(func=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:  # user errors: a message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
