"""The one tokenizer wrapper: any `tokenizers` tokenizer.json with its special tokens and chat template.

jaxformer trains byte-level BPE tokenizers (`train_tokenizer`) whose reserved tokens are PAD, BOS, EOS and
the chat role markers, saved as files transformers loads as they are. The same class opens any Hugging Face
tokenizer.json: special tokens come from tokenizer_config.json (bos/eos/pad), then config.json /
generation_config.json beside it (eos_token_id), then well-known names. The chat template is
tokenizer_config.json's "chat_template", else jaxformer's documented default (CHAT_TEMPLATE:
<|role|>content<|end|> per message, then <|assistant|>).
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
CHAT_ROLES = ("system", "user", "assistant")
CHAT_TOKENS = tuple(f"<|{r}|>" for r in CHAT_ROLES) + ("<|end|>",)  # reserved for fine-tuning
SPECIAL_TOKENS = (PAD, BOS, EOS) + CHAT_TOKENS  # ids 0..6 in this order
# The documented default chat format: <|role|>content<|end|> per message, then <|assistant|>.
CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
# tokens that end a chat turn in common templates (ours is <|end|>); those in the vocabulary stop chat replies
CHAT_END_TOKENS = ("<|end|>", "<|im_end|>", "<|eot_id|>", "<|endoftext|>")
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json")  # what a model dir carries
SPECIAL_TOKENS_MAP = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
                      "additional_special_tokens": list(CHAT_TOKENS)}
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token",
                      "additional_special_tokens")
JAXFORMER_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE,
                    "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000, **SPECIAL_TOKENS_MAP}


class Tokenizer:
    """Encode/decode, special-token ids and chat formatting for one tokenizer.json."""

    def __init__(self, tok: HFTokenizer, config: dict[str, Any] | None = None, model_config: dict | None = None,
                 path: Path | None = None):
        self.tok, self.path = tok, path
        ours = all(tok.token_to_id(t) is not None for t in (PAD, BOS, EOS))
        self.config = dict(config) if config else (dict(JAXFORMER_CONFIG) if ours else {})
        config, model_config = self.config, model_config or {}
        self.bos_token = _token_name(config.get("bos_token")) or (BOS if tok.token_to_id(BOS) is not None else None)
        self.bos_id = None if self.bos_token is None else tok.token_to_id(self.bos_token)
        self.add_bos = bool(config.get("add_bos_token", False)) and self.bos_id is not None
        eos = {tok.token_to_id(n) for n in (_token_name(config.get("eos_token")), EOS, "<|endoftext|>") if n}
        ids = model_config.get("eos_token_id")
        eos |= set(ids if isinstance(ids, list) else [ids] if isinstance(ids, int) else [])
        self.eos_ids = frozenset(i for i in eos if i is not None)
        self.eos_token = _token_name(config.get("eos_token")) or next(
            (tok.id_to_token(i) for i in sorted(self.eos_ids)), None)
        self.eos_id = None if self.eos_token is None else tok.token_to_id(self.eos_token)
        pad = _token_name(config.get("pad_token")) or (PAD if tok.token_to_id(PAD) is not None else None)
        self.pad_id = None if pad is None else tok.token_to_id(pad)
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

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes in parallel on all cores (the Rust library's thread pool)."""
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt's ids: BOS first only where tokenizer_config.json asks for it (add_bos_token)."""
        return ([self.bos_id] if self.add_bos else []) + self.encode(text)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token as text (special tokens included; partial UTF-8 shows as U+FFFD)."""
        return self.tok.decode([int(token_id)], skip_special_tokens=False)

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for chat `messages` ([{"role": ..., "content": ...}]), ready for the reply."""
        return _compile(self.chat_template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                                   bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def sha256(self) -> str:
        """Content hash of the tokenizer (recorded in shard manifests and checkpoints to catch mismatches)."""
        return hashlib.sha256(self.tok.to_str().encode()).hexdigest()

    def save(self, out_dir: str | Path) -> Path:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json to out_dir."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(out / TOKENIZER_FILE))
        (out / "tokenizer_config.json").write_text(json.dumps(self.config, indent=2))
        special = {k: v for k, v in self.config.items() if k in SPECIAL_TOKEN_KEYS}
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
        self.path = out / TOKENIZER_FILE
        return self.path


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


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load tokenizer.json (or a directory holding it) with the configs beside it."""
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.is_file():
        raise FileNotFoundError(f"no tokenizer at {p}; train one with `jaxformer tokenizer train`")
    config = _read_json(p.parent / "tokenizer_config.json")
    model_config = {**_read_json(p.parent / "config.json"), **_read_json(p.parent / "generation_config.json")}
    return Tokenizer(HFTokenizer.from_file(str(p)), config, model_config, p)


def tokenizer_candidates(src: str | Path) -> list[Path]:
    """Where a checkpoint's tokenizer may live: beside it, in RUN/model/, or next to a .safetensors file."""
    src = Path(src)
    if src.is_file():
        return [src.parent / TOKENIZER_FILE]
    return [src / TOKENIZER_FILE, src / "model" / TOKENIZER_FILE]


def load_tokenizer_for(checkpoint: str | Path, tokenizer: str | Path | None = None) -> Tokenizer:
    """The tokenizer of a checkpoint (found beside it), or the explicit `tokenizer` file / directory."""
    candidates = ([Path(tokenizer) / TOKENIZER_FILE if Path(tokenizer).is_dir() else Path(tokenizer)]
                  if tokenizer else tokenizer_candidates(checkpoint))
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(
            f"no tokenizer for {checkpoint}: looked for {', '.join(str(p) for p in candidates)}. Pass --tokenizer "
            "PATH (a tokenizer.json or its directory); training runs copy theirs into RUN/model/")
    return load_tokenizer(path)


def copy_tokenizer_files(src_dir: str | Path, dst: str | Path) -> None:
    """Copy the tokenizer files found in src_dir next to a model (so a model directory carries its tokenizer)."""
    for name in TOKENIZER_FILES:
        if (Path(src_dir) / name).is_file():
            shutil.copy(Path(src_dir) / name, Path(dst) / name)


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2,
                    show_progress: bool = True) -> Tokenizer:
    """Train byte-level BPE (every byte is in the base alphabet: no unknown tokens, ever)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least "
                         f"{256 + len(SPECIAL_TOKENS)} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok, dict(JAXFORMER_CONFIG))
