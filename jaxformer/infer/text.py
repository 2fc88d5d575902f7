"""Text in and out of inference: any `tokenizers` tokenizer.json, its special tokens, its chat template.

A training run's model directory carries jaxformer's tokenizer (tokenizer.json + tokenizer_config.json);
a Hugging Face directory carries its own. Special tokens come from tokenizer_config.json (bos/eos),
then config.json / generation_config.json (eos_token_id), then well-known names. The chat template
is tokenizer_config.json's "chat_template", else jaxformer's documented default
(jaxformer.data.tokenizer.CHAT_TEMPLATE: <|role|>content<|end|> per message, then <|assistant|>).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Sequence

from tokenizers import Tokenizer as HFTokenizer

from jaxformer.data.tokenizer import BOS, CHAT_TEMPLATE, EOS, TOKENIZER_FILE

# tokens that end a chat turn in common templates (ours is <|end|>); those in the vocabulary stop chat replies
CHAT_END_TOKENS = ("<|end|>", "<|im_end|>", "<|eot_id|>", "<|endoftext|>")


class TextTokenizer:
    """Encode/decode, special-token ids and chat formatting for one tokenizer.json."""

    def __init__(self, tok: HFTokenizer, config: dict[str, Any] | None = None, model_config: dict | None = None,
                 path: Path | None = None):
        self.tok, self.path = tok, path
        config, model_config = config or {}, model_config or {}
        self.bos_token = _token_name(config.get("bos_token")) or (BOS if tok.token_to_id(BOS) is not None else None)
        self.bos_id = None if self.bos_token is None else tok.token_to_id(self.bos_token)
        self.add_bos = bool(config.get("add_bos_token", False)) and self.bos_id is not None
        eos = {tok.token_to_id(n) for n in (_token_name(config.get("eos_token")), EOS, "<|endoftext|>") if n}
        ids = model_config.get("eos_token_id")
        eos |= set(ids if isinstance(ids, list) else [ids] if isinstance(ids, int) else [])
        self.eos_ids = frozenset(i for i in eos if i is not None)
        self.eos_token = _token_name(config.get("eos_token")) or next(
            (tok.id_to_token(i) for i in sorted(self.eos_ids)), None)
        self.chat_template = config.get("chat_template") or CHAT_TEMPLATE
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in self.chat_template}
            self.chat_template = named.get("default") or next(iter(named.values()))
        ends = {tok.token_to_id(t) for t in CHAT_END_TOKENS}
        self.chat_stop_ids = frozenset(self.eos_ids | {i for i in ends if i is not None})

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` with no special tokens added."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt's ids: BOS first only where tokenizer_config.json asks for it (add_bos_token)."""
        return ([self.bos_id] if self.add_bos else []) + self.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        """One token as text (special tokens included; partial UTF-8 shows as U+FFFD)."""
        return self.tok.decode([int(token_id)], skip_special_tokens=False)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for chat `messages` ([{"role": ..., "content": ...}]), ready for the reply."""
        return _compile(self.chat_template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                                   bos_token=self.bos_token or "", eos_token=self.eos_token or "")


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders them
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def _token_name(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<|eos|>", ...} as transformers writes AddedToken
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def tokenizer_candidates(src: str | Path) -> list[Path]:
    """Where a checkpoint's tokenizer may live: beside it, in RUN/model/, or next to a .safetensors file."""
    src = Path(src)
    if src.is_file():
        return [src.parent / TOKENIZER_FILE]
    return [src / TOKENIZER_FILE, src / "model" / TOKENIZER_FILE]


def load_text_tokenizer(src: str | Path, tokenizer: str | Path | None = None) -> TextTokenizer:
    """The tokenizer for checkpoint `src` (or the explicit `tokenizer` file/directory), with its configs."""
    candidates = [Path(tokenizer) / TOKENIZER_FILE if Path(tokenizer).is_dir() else Path(tokenizer)] \
        if tokenizer else tokenizer_candidates(src)
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(
            f"no tokenizer for {src}: looked for {', '.join(str(p) for p in candidates)}. Pass --tokenizer "
            "PATH (a tokenizer.json or its directory); training runs copy theirs into RUN/model/")
    config = _read_json(path.parent / "tokenizer_config.json")
    model_config = {**_read_json(path.parent / "config.json"), **_read_json(path.parent / "generation_config.json")}
    return TextTokenizer(HFTokenizer.from_file(str(path)), config, model_config, path)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
