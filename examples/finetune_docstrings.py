"""Fine-tune README's main-job model to write docstrings, with no download.

    .venv/bin/python examples/finetune_docstrings.py            # build data, fine-tune (LoRA), evaluate, serve
    .venv/bin/python examples/finetune_docstrings.py --steps 50 # a quicker run

1. The base model is runs/tiny_code/model (`make train`); it is trained first when missing.
2. An instruction set is built from the Python standard library: for each small function with a
   docstring, the user message is "Write the docstring for this function." and the function's code
   without its docstring; the assistant reply is the docstring's summary line. Held-out examples
   come only from files in the base model's own validation split, so the base never saw them.
3. `jaxformer finetune --config finetune_docstrings` trains LoRA adapters (base frozen).
4. On the held-out split: task loss (assistant tokens only) before and after, and how many greedy
   replies follow the format (one line, ending the turn with <|end|>), base vs fine-tuned.
5. The merged model is served by `jaxformer serve` and asked through /v1/chat/completions.
Everything lands in runs/finetune_docstrings/ (example_report.json sums it up).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

INSTRUCTION = "Write the docstring for this function."
DATA_DIR = ROOT / "data" / "sft_docstrings"
BASE = ROOT / "runs" / "tiny_code" / "model"
PRETRAIN_VAL_FRACTION = 0.02  # configs/tiny_code.yaml data.val_fraction: held-out files of the base model
MAX_CODE_CHARS, MAX_CODE_LINES = 640, 20


def summary_line(doc: str) -> str | None:
    """The docstring's first line when it is a usable one-sentence summary."""
    first = doc.strip().splitlines()[0].strip() if doc.strip() else ""
    if not 12 <= len(first) <= 90 or not first.endswith(".") or not first[0].isupper():
        return None
    if any(c in first for c in "`>:") or first.lower().startswith(("deprecated", "todo", "xxx")):
        return None
    return first


def function_examples(path: Path) -> list[dict]:
    """(code without docstring, summary) of the small documented functions of one source file."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return []
    lines = source.splitlines()
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.decorator_list:
            continue
        doc = ast.get_docstring(node, clean=True)
        if not doc or len(node.body) < 2:
            continue
        summary = summary_line(doc)
        if summary is None:
            continue
        d = node.body[0]
        body = lines[node.lineno - 1:d.lineno - 1] + lines[d.end_lineno:node.end_lineno]
        code = textwrap.dedent("\n".join(body)).strip("\n")
        if len(code) > MAX_CODE_CHARS or code.count("\n") + 1 > MAX_CODE_LINES or '"""' in code:
            continue
        out.append({"messages": [{"role": "user", "content": f"{INSTRUCTION}\n\n{code}"},
                                 {"role": "assistant", "content": summary}]})
    return out


def build_dataset(out_dir: Path = DATA_DIR, max_val: int = 200) -> dict:
    """train.jsonl / val.jsonl from the standard library; val = files the base model never trained on."""
    from jaxformer.data.corpus import named_files
    from jaxformer.data.shards import split_of

    if (out_dir / "train.jsonl").exists() and (out_dir / "val.jsonl").exists():
        return json.loads((out_dir / "stats.json").read_text())
    splits: dict[str, list] = {"train": [], "val": []}
    seen = set()
    for path, doc_id in named_files(["stdlib"]):
        split = split_of(doc_id, PRETRAIN_VAL_FRACTION)  # the base model's own document split
        for ex in function_examples(path):
            key = hashlib.sha1(ex["messages"][0]["content"].encode()).hexdigest()
            if key not in seen:  # identical functions in two files would leak across the split
                seen.add(key)
                splits[split].append(ex)
    splits["val"] = splits["val"][:max_val]
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, examples in splits.items():
        with (out_dir / f"{name}.jsonl").open("w") as f:
            f.writelines(json.dumps(ex) + "\n" for ex in examples)
    stats = {name: len(ex) for name, ex in splits.items()}
    (out_dir / "stats.json").write_text(json.dumps(stats))
    return stats


def ensure_base() -> None:
    if not (BASE / "config.json").exists():
        print(f"{BASE} is missing: running README's main job first (make train) ...", flush=True)
        subprocess.run([sys.executable, "-m", "jaxformer.cli", "train", "--config", "tiny_code", "--resume"],
                       cwd=ROOT, check=True)


def follows_format(reply: str, finish_reason: str) -> bool:
    """One line that ends the turn by itself (<|end|>), as the training replies do."""
    return finish_reason == "stop" and bool(reply.strip()) and "\n" not in reply.strip()


def format_check(model, tok, messages: list[list[dict]], max_new_tokens: int = 40) -> tuple[float, list[dict]]:
    from jaxformer.finetune.task import answer_prompts

    prompts = [tok.encode_chat(m[:-1]) for m in messages]
    answers = answer_prompts(model, tok, prompts, max_new_tokens)
    for a, m in zip(answers, messages):
        a["expected"] = m[-1]["content"]
        a["follows_format"] = follows_format(a["reply"], a["finish_reason"])
    return sum(a["follows_format"] for a in answers) / len(answers), answers


def serve_check(model_dir: Path, user_message: str) -> dict:
    """Serve the fine-tuned model (as `jaxformer serve` does) and ask it through the chat endpoint."""
    import httpx

    from jaxformer.data.tokenizer import load_tokenizer_for
    from jaxformer.infer import load_model
    from jaxformer.serve import create_app
    from jaxformer.serve.app import ServerThread

    app = create_app(load_model(model_dir), load_tokenizer_for(model_dir), model_name="docstrings", max_batch=2)
    with ServerThread(app) as server:
        r = httpx.post(f"{server.url}/v1/chat/completions", timeout=300, json={
            "model": "docstrings", "messages": [{"role": "user", "content": user_message}],
            "max_tokens": 40, "temperature": 0})
        r.raise_for_status()
        choice = r.json()["choices"][0]
    return {"reply": choice["message"]["content"], "finish_reason": choice["finish_reason"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, help="optimizer steps (default: the preset's)")
    ap.add_argument("--format-examples", type=int, default=32, help="held-out prompts answered greedily")
    ap.add_argument("--no-serve", action="store_true", help="skip the chat-endpoint check")
    args = ap.parse_args()

    ensure_base()
    stats = build_dataset()
    print(f"instruction set: {stats['train']} train / {stats['val']} held-out examples in {DATA_DIR}", flush=True)

    from jaxformer.data.tokenizer import load_tokenizer_for
    from jaxformer.finetune import finetune, load_finetune_config
    from jaxformer.infer import load_model

    overrides = {"sft.base": str(BASE), "sft.data": [str(DATA_DIR / "train.jsonl")],
                 "sft.val_data": [str(DATA_DIR / "val.jsonl")]}
    if args.steps:
        overrides["train.steps"] = args.steps
    cfgs = load_finetune_config("finetune_docstrings", overrides)
    run_dir = ROOT / cfgs["train"].run_dir
    cfgs["train"] = dataclasses.replace(cfgs["train"], run_dir=str(run_dir))
    result = finetune(cfgs, resume=True)
    if "val_loss_before" not in result:  # resumed or already finished: the step-0 evaluation is in the log
        from jaxformer.train.metrics import read_metrics

        first = [r for r in read_metrics(run_dir) if r["kind"] == "eval" and r["step"] == 0]
        result["val_loss_before"] = first[0]["val_loss"] if first else None

    tok = load_tokenizer_for(BASE)
    held_out = [json.loads(line)["messages"] for line in (DATA_DIR / "val.jsonl").read_text().splitlines()]
    held_out = held_out[:args.format_examples]
    base_rate, base_answers = format_check(load_model(BASE), tok, held_out)
    tuned_rate, tuned_answers = format_check(load_model(run_dir / "model"), tok, held_out)
    report = {"train_examples": stats["train"], "held_out_examples": stats["val"], "steps": result["step"],
              "held_out_task_loss_before": result["val_loss_before"], "held_out_task_loss_after": result["val_loss"],
              "format_rate_base": base_rate, "format_rate_finetuned": tuned_rate,
              "trainable": result.get("trainable"), "samples": [
                  {"code": m[0]["content"].removeprefix(INSTRUCTION).strip(), "expected": t["expected"],
                   "base": b["reply"], "finetuned": t["reply"]}
                  for m, b, t in list(zip(held_out, base_answers, tuned_answers))[:4]]}
    if not args.no_serve:
        report["served"] = serve_check(run_dir / "model", held_out[0][0]["content"])
    (run_dir / "example_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))
    for s in report["samples"][:2]:
        print(f"\n{s['code']}\n  expected:   {s['expected']}\n  base:       {s['base']!r}\n"
              f"  fine-tuned: {s['finetuned']!r}")


if __name__ == "__main__":
    main()
