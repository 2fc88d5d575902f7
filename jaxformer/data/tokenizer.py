"""Byte-level BPE tokenizer (Hugging Face `tokenizers`), saved so transformers loads it as is."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
CHAT_ROLES = ("system", "user", "assistant")
CHAT_TOKENS = tuple(f"<|{r}|>" for r in CHAT_ROLES) + ("<|end|>",)  # reserved for fine-tuning
SPECIAL_TOKENS = (PAD, BOS, EOS) + CHAT_TOKENS  # ids 0..6 in this order
# The documented default chat format: <|role|>content<|end|> per message, then <|assistant|>.
CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
TOKENIZER_FILE = "tokenizer.json"


class Tokenizer:
    """A thin handle on a `tokenizers.Tokenizer` with the special-token ids jaxformer uses."""

    def __init__(self, tok: HFTokenizer, path: Path | None = None):
        self.tok = tok
        self.path = path
        missing = [t for t in (BOS, EOS, PAD) if tok.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens {missing}; train it with `jaxformer tokenizer train`")
        self.bos_id, self.eos_id, self.pad_id = (tok.token_to_id(t) for t in (BOS, EOS, PAD))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes in parallel on all cores (the Rust library's thread pool)."""
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def sha256(self) -> str:
        """Content hash of the tokenizer (recorded in shard manifests to catch mismatches)."""
        return hashlib.sha256(self.tok.to_str().encode()).hexdigest()

    def save(self, out_dir: str | Path) -> Path:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json to out_dir."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(out / TOKENIZER_FILE))
        special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
                   "additional_special_tokens": list(CHAT_TOKENS)}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE,
                  "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000, **special}
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
        self.path = out / TOKENIZER_FILE
        return self.path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load tokenizer.json (or a directory holding it)."""
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.exists():
        raise FileNotFoundError(f"no tokenizer at {p}; train one with `jaxformer tokenizer train`")
    return Tokenizer(HFTokenizer.from_file(str(p)), p)


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
    return Tokenizer(tok)
