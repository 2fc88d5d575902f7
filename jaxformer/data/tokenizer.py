"""The one tokenizer wrapper: any `tokenizers` tokenizer.json with its special tokens and chat template.

jaxformer trains byte-level BPE tokenizers (`train_tokenizer`) whose reserved tokens are PAD, BOS, EOS and
the chat role markers, saved as files transformers loads as they are. The same class opens any Hugging Face
tokenizer directory and reads it as transformers 5 does (tokenization_utils_base.py, _from_pretrained):

  tokenizer.json          the vocabulary; its post-processor adds a prompt's special tokens (Llama 3's
                          <|begin_of_text|>), as `tokenizer(text)` does; add_bos_token beside a tokenizer.json
                          is ignored, as transformers 5 pops it
  tokenizer_config.json   bos/eos/pad tokens and "chat_template" (a string, or a list of named templates)
  chat_template.jinja     the chat template transformers 5 writes; it takes priority over the config's
  generation_config.json  eos_token_id, one id or a list (Llama 3: <|end_of_text|>, <|eom_id|>, <|eot_id|>);
                          config.json's eos_token_id when there is none

Chat prompts are rendered as transformers' apply_chat_template renders them (the same jinja sandbox, trim
and lstrip of blocks, loop controls, tojson, strftime_now, the named special tokens as variables) and are
tokenized without the post-processor: the template writes its own special tokens. A tokenizer without a
chat template gets jaxformer's documented default (CHAT_TEMPLATE: <|role|>content<|end|> per message, then
<|assistant|>) only when its vocabulary holds those role tokens; otherwise chat raises a clear error.
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
# tokens that end a chat turn in common templates: ours and Phi-3 <|end|>, ChatML (Qwen) <|im_end|>, Llama 3
# <|eot_id|>, Gemma <end_of_turn>; those in the vocabulary stop chat replies (besides the eos ids)
CHAT_END_TOKENS = ("<|end|>", "<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<end_of_turn>")
TOKENIZER_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers 5 writes the template here, beside tokenizer_config.json
GENERATION_CONFIG_FILE = "generation_config.json"  # eos_token_id (one id or a list)
# what a model directory carries for its tokenizer, chat format and stop ids
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json", CHAT_TEMPLATE_FILE,
                   GENERATION_CONFIG_FILE)
SPECIAL_TOKENS_MAP = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
                      "additional_special_tokens": list(CHAT_TOKENS)}
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token")
SPECIAL_TOKEN_KEYS = SPECIAL_TOKEN_NAMES + ("additional_special_tokens",)
JAXFORMER_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE,
                    "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000, **SPECIAL_TOKENS_MAP}


class Tokenizer:
    """Encode/decode, special-token ids and chat formatting for one tokenizer.json."""

    def __init__(self, tok: HFTokenizer, config: dict[str, Any] | None = None, model_config: dict | None = None,
                 path: Path | None = None):
        """`config`: tokenizer_config.json (chat_template.jinja's text already under "chat_template");
        `model_config`: the dict whose eos_token_id counts (generation_config.json, else config.json)."""
        self.tok, self.path = tok, path
        ours = all(tok.token_to_id(t) is not None for t in (PAD, BOS, EOS))
        self.config = dict(config) if config else (dict(JAXFORMER_CONFIG) if ours else {})
        config, model_config = self.config, model_config or {}
        # the named special tokens, as transformers' special_tokens_map (also the chat template's variables)
        self.special_tokens = {k: n for k in SPECIAL_TOKEN_NAMES if (n := _token_name(config.get(k)))}
        self.bos_token = self.special_tokens.get("bos_token") or (BOS if tok.token_to_id(BOS) is not None else None)
        self.bos_id = None if self.bos_token is None else tok.token_to_id(self.bos_token)
        self.eos_ids = frozenset(i for i in {tok.token_to_id(self.special_tokens.get("eos_token", "")),
                                             *_ids(model_config.get("eos_token_id"))} if i is not None)
        if not self.eos_ids:  # nothing names one: jaxformer's <|eos|>, else GPT-2's <|endoftext|>
            self.eos_ids = frozenset(i for i in (tok.token_to_id(EOS), tok.token_to_id("<|endoftext|>"))
                                     if i is not None)
        self.eos_token = self.special_tokens.get("eos_token") or next(
            (tok.id_to_token(i) for i in sorted(self.eos_ids)), None)
        self.eos_id = None if self.eos_token is None else tok.token_to_id(self.eos_token)
        pad = self.special_tokens.get("pad_token") or (PAD if tok.token_to_id(PAD) is not None else None)
        self.pad_id = None if pad is None else tok.token_to_id(pad)
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = {t.get("name"): t.get("template") for t in template}
        if isinstance(template, dict):
            template = template.get("default") or next(iter(template.values()), None)
        has_roles = all(tok.token_to_id(t) is not None for t in CHAT_TOKENS)
        self.chat_template: str | None = template or (CHAT_TEMPLATE if has_roles else None)
        ends = {tok.token_to_id(t) for t in CHAT_END_TOKENS}
        self.chat_stop_ids = frozenset(self.eos_ids | {i for i in ends if i is not None})

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` with no special tokens added (special tokens written in it are matched)."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes in parallel on all cores (the Rust library's thread pool), without character offsets."""
        return [e.ids for e in self.tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def encode_prompt(self, text: str) -> list[int]:
        """A completion prompt's ids as transformers' `tokenizer(text)` gives them: with the special tokens that
        tokenizer.json's post-processor adds (Llama 3 and Gemma prepend BOS; Qwen and jaxformer's add none)."""
        return self.tok.encode(text, add_special_tokens=True).ids

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """A chat prompt's ids, as transformers' apply_chat_template(tokenize=True): the rendered template with no
        special tokens added (the template writes its own BOS)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token as text (special tokens included; partial UTF-8 shows as U+FFFD)."""
        return self.tok.decode([int(token_id)], skip_special_tokens=False)

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text for chat `messages` ([{"role": ..., "content": ...}]), ready for the reply.

        Rendered as transformers renders it: the named special tokens, tools=None and documents=None are
        variables (kwargs add or override them); message keys whose value is None are dropped."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template: add \"chat_template\" to tokenizer_config.json "
                             f"or a {CHAT_TEMPLATE_FILE} beside it (an instruct model's), or send plain completion "
                             "prompts")
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {**self.special_tokens, "tools": None, "documents": None, **kwargs}
        return _compile(self.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                   **variables)

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
    """The template in transformers' chat environment (utils/chat_template_utils.py, _compile_jinja_template)."""
    from datetime import datetime

    from jinja2 import nodes
    from jinja2.exceptions import TemplateError
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):  # {% generation %}...{% endgeneration %} marks assistant text; renders its body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):  # no HTML escaping
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _token_name(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<|eos|>", ...} as transformers writes AddedToken
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _ids(value: Any) -> list[int]:
    """eos_token_id as a list: config files hold one id, a list of ids, or null."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load tokenizer.json (or a directory holding it) with the files beside it (see the module docstring)."""
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.is_file():
        raise FileNotFoundError(f"no tokenizer at {p}; train one with `jaxformer tokenizer train`")
    d = p.parent
    config = _read_json(d / "tokenizer_config.json")
    if "added_tokens_decoder" not in config:  # legacy directories: special_tokens_map.json overrides, as transformers
        config.update({k: v for k, v in _read_json(d / "special_tokens_map.json").items() if k in SPECIAL_TOKEN_KEYS})
    if (d / CHAT_TEMPLATE_FILE).is_file():  # transformers 5's file wins over the config's entry
        config["chat_template"] = (d / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    generation = _read_json(d / GENERATION_CONFIG_FILE)
    model_config = generation if "eos_token_id" in generation else _read_json(d / "config.json")
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
