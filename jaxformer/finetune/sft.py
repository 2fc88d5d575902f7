"""Supervised fine-tuning data: chat / prompt-completion JSONL -> chat-template tokens -> packed rows.

Records, one JSON object per line:
  {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
  {"prompt": "...", "completion": "..."}          (= a user message and the assistant's reply;
                                                   an optional "system" field adds a system message)
Each conversation is rendered with the tokenizer's chat template, the same one the server applies
(a Hugging Face directory's tokenizer_config.json / chat_template.jinja, e.g. Llama 3's or ChatML; else
jaxformer's default: <|role|>content<|end|> per message, the reserved role tokens). Only the
assistant turns are trained: the text a template writes for an assistant message after the
generation prompt (its content and end-of-turn token) gets loss, everything else (system, user,
the role header of the assistant turn) is context with loss_mask 0, hence zero gradient.

Rows have the layout of jaxformer.data.pipeline's packed windows, so the train step is unchanged:
seq_len + 1 tokens -> inputs/targets [T], `positions` restarting at each example, `segment_ids`
1, 2, ... per example (0 for padding) and `loss_mask` 1 where the target is a trained token.
Packing is first-fit decreasing; without packing each row holds one example and padding.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import grain
import numpy as np

from jaxformer.data.pipeline import batch_rows

ROW_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


class SFTDataError(ValueError):
    """A record that is not a chat or prompt/completion example (names the file and line)."""


# ----------------------------------------------------------------------------- records

def read_records(paths: Sequence[str | Path] | str | Path) -> list[list[dict[str, str]]]:
    """Conversations (lists of {"role", "content"}) from JSONL files; bad lines raise SFTDataError."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise ValueError("no fine-tuning data: give one or more JSONL files (--data FILE)")
    out = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"fine-tuning data {path} does not exist")
        with path.open("rb") as f:
            for i, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise SFTDataError(f"{path}:{i}: not a JSON object ({e})") from None
                out.append(to_messages(record, f"{path}:{i}"))
    if not out:
        raise ValueError(f"no examples in {[str(p) for p in paths]}")
    return out


def to_messages(record: Any, where: str = "record") -> list[dict[str, str]]:
    """A record as a validated conversation; prompt/completion becomes user + assistant messages."""
    if not isinstance(record, dict):
        raise SFTDataError(f"{where}: expected a JSON object with \"messages\" or \"prompt\"/\"completion\"")
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise SFTDataError(f"{where}: \"messages\" must be a non-empty list")
        for j, m in enumerate(msgs):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise SFTDataError(f"{where}: messages[{j}] must be {{\"role\": str, \"content\": str}}, got {m!r}")
        msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
    elif "prompt" in record and "completion" in record:
        if not (isinstance(record["prompt"], str) and isinstance(record["completion"], str)):
            raise SFTDataError(f"{where}: \"prompt\" and \"completion\" must be strings")
        system = record.get("system")
        msgs = ([{"role": "system", "content": system}] if isinstance(system, str) and system else []) + [
            {"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    else:
        raise SFTDataError(f"{where}: expected \"messages\" or \"prompt\" and \"completion\", got keys "
                           f"{sorted(record)}")
    if not any(m["role"] == "assistant" and m["content"] for m in msgs):
        raise SFTDataError(f"{where}: no assistant message with content: nothing to learn from")
    return msgs


def split_records(records: list, val_fraction: float) -> tuple[list, list]:
    """(train, val) by a hash of each conversation's text: deterministic, independent of order."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    train, val = [], []
    for msgs in records:
        h = int.from_bytes(hashlib.sha1(json.dumps(msgs, sort_keys=True).encode()).digest()[:8], "little")
        (val if (h % 1_000_000) < val_fraction * 1_000_000 else train).append(msgs)
    if not train or not val:
        raise ValueError(f"splitting {len(records)} examples with val_fraction={val_fraction} left an empty "
                         "split; give more examples or a separate validation file (sft.val_data)")
    return train, val


# ----------------------------------------------------------------------------- tokens

def render(messages: list[dict[str, str]], tokenizer) -> tuple[list[int], list[bool]]:
    """(token ids, trained flag per token) of one conversation under the tokenizer's chat template.

    `tokenizer` is a jaxformer.data.tokenizer.Tokenizer (encode, apply_chat_template); the ids equal its
    encode_chat(messages, add_generation_prompt=False), the server's prompts are a prefix of them.
    Each assistant turn is found by rendering the conversation up to it with the generation prompt
    and through it without: the difference is the reply (content + end-of-turn). Pieces are
    tokenized one by one, which equals whole-text tokenization where pieces meet at special tokens.
    """
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if not (prompt.startswith(done) and through.startswith(prompt)):
            raise SFTDataError("the chat template does not render conversations prefix by prefix (the text up to "
                               "an assistant reply changes when the reply is added); cannot locate replies")
        pieces += [(prompt[len(done):], False), (through[len(prompt):], True)]
        done = through
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    pieces.append((full[len(done):], False))
    ids: list[int] = []  # as transformers' apply_chat_template: no special tokens added, the template writes BOS
    trained: list[bool] = []
    for text, train in pieces:
        t = tokenizer.encode(text) if text else []
        ids += t
        trained += [train] * len(t)
    return ids, trained


def tokenize(records: Iterable[list[dict[str, str]]], tokenizer, max_tokens: int) -> tuple[list, dict]:
    """[(ids int32, trained bool)] truncated to max_tokens (seq_len + 1), and counts of what happened."""
    out, stats = [], {"examples": 0, "truncated": 0, "dropped_no_reply": 0, "tokens": 0, "trained_tokens": 0}
    for msgs in records:
        ids, trained = render(msgs, tokenizer)
        if len(ids) > max_tokens:
            stats["truncated"] += 1
            ids, trained = ids[:max_tokens], trained[:max_tokens]
        if not any(trained[1:]):  # the first token is never a target
            stats["dropped_no_reply"] += 1
            continue
        out.append((np.asarray(ids, np.int32), np.asarray(trained, bool)))
        stats["examples"] += 1
        stats["tokens"] += len(ids)
        stats["trained_tokens"] += int(np.sum(trained[1:]))
    return out, stats


def pack(examples: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int, *, packed: bool = True,
         pad_id: int = 0) -> dict[str, np.ndarray]:
    """Examples -> rows {inputs, targets, positions, segment_ids, loss_mask} each [N, seq_len]."""
    cap = seq_len + 1
    if any(len(ids) > cap for ids, _ in examples):
        raise ValueError(f"an example is longer than seq_len + 1 = {cap} tokens: tokenize() truncates them")
    bins: list[list[int]] = []
    if packed:  # first-fit decreasing
        free: list[int] = []
        for i in sorted(range(len(examples)), key=lambda i: -len(examples[i][0])):
            n = len(examples[i][0])
            b = next((j for j, f in enumerate(free) if f >= n), None)
            if b is None:
                bins.append([i])
                free.append(cap - n)
            else:
                bins[b].append(i)
                free[b] -= n
    else:
        bins = [[i] for i in range(len(examples))]
    N = len(bins)
    tok = np.full((N, cap), pad_id, np.int32)
    seg = np.zeros((N, cap), np.int32)
    pos = np.zeros((N, cap), np.int32)
    trained = np.zeros((N, cap), bool)
    for r, members in enumerate(bins):
        at = 0
        for s, i in enumerate(members, 1):
            ids, tr = examples[i]
            n = len(ids)
            tok[r, at:at + n], seg[r, at:at + n], trained[r, at:at + n] = ids, s, tr
            pos[r, at:at + n] = np.arange(n)
            at += n
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)  # a target inside the input token's example
    return {"inputs": tok[:, :-1], "targets": tok[:, 1:], "positions": pos[:, :-1], "segment_ids": seg[:, :-1],
            "loss_mask": (trained[:, 1:] & same).astype(np.float32)}


def build_rows(records, tokenizer, seq_len: int, *, packed: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """Conversations -> packed rows and a report (examples, truncated, rows, fill, trained tokens)."""
    examples, stats = tokenize(records, tokenizer, seq_len + 1)
    if not examples:
        raise ValueError(f"none of the {len(records)} examples has a reply within seq_len + 1 = {seq_len + 1} "
                         "tokens: raise sft.seq_len")
    pad = getattr(tokenizer, "pad_id", None)
    if pad is None:
        pad = next(iter(sorted(getattr(tokenizer, "eos_ids", ()) or [0])))
    rows = pack(examples, seq_len, packed=packed, pad_id=pad)
    stats["rows"] = len(rows["inputs"])
    stats["fill"] = float((rows["segment_ids"] > 0).mean())
    return rows, stats


# ----------------------------------------------------------------------------- grain

class RowSource:
    """Random access to the rows of build_rows (grain MapDataset source)."""

    def __init__(self, rows: dict[str, np.ndarray]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows["inputs"])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {k: self.rows[k][index] for k in ROW_KEYS}


def make_sft_dataset(rows: dict[str, np.ndarray], *, batch_size: int, seed: int = 0, shuffle: bool = True,
                     repeat: bool = True, process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """Rows -> seeded shuffle (a new order each epoch) -> this process's rows -> local batches."""
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} must be a multiple of the process count {process_count}")
    ds = grain.MapDataset.source(RowSource(rows))
    if len(ds) < batch_size:
        raise ValueError(f"only {len(ds)} rows of fine-tuning data, fewer than batch_size={batch_size}; lower the "
                         "batch size or add examples")
    return batch_rows(ds, batch_size, shuffle=shuffle, seed=seed, repeat=repeat, process_index=process_index,
                      process_count=process_count)


def eval_batches(rows: dict[str, np.ndarray], batch_size: int, *, process_index: int = 0,
                 process_count: int = 1) -> Iterable[dict[str, np.ndarray]]:
    """Every row once, in order, as this process's part of global batches; the last is padded with
    rows that have no loss (so every row counts exactly once)."""
    n = len(rows["inputs"])
    total = -(-n // batch_size) * batch_size
    local = batch_size // process_count
    for start in range(0, total, batch_size):
        lo = start + process_index * local
        idx = np.arange(lo, lo + local)
        batch = {k: rows[k][np.minimum(idx, n - 1)].copy() for k in ROW_KEYS}
        batch["loss_mask"][idx >= n] = 0.0
        yield batch
