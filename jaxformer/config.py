"""Frozen, validated configuration dataclasses and preset loading with dotted overrides."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

POSITIONS = ("learned", "rope", "sinusoidal", "none")
NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu")
ATTENTION_IMPLS = ("xla", "cudnn", "auto")
DTYPES = ("float32", "bfloat16", "float16")


def _choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(allowed)}")


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only LM shape and components; GPT-2 and Llama are two settings of these fields."""

    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: same as n_heads (MHA); 1: MQA; else GQA
    head_dim: int | None = None  # None: d_model // n_heads
    d_ff: int = 256
    max_seq_len: int = 256
    position: str = "rope"  # learned (GPT-2) | rope (Llama) | sinusoidal | none
    rope_theta: float = 10000.0
    norm: str = "rmsnorm"  # layernorm (with bias) | rmsnorm
    norm_eps: float = 1e-5
    activation: str = "silu"
    gated_mlp: bool = True  # gated + silu = SwiGLU (Llama); plain + gelu_tanh = GPT-2
    use_bias: bool = False  # biases on every projection (GPT-2)
    tie_embeddings: bool = False
    attention_impl: str = "xla"
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            _positive(name, getattr(self, name))
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        _positive("n_kv_heads", self.n_kv_heads)
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"n_heads={self.n_heads} must divide d_model={self.d_model} "
                    "(or set head_dim explicitly)"
                )
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        _positive("head_dim", self.head_dim)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads} "
                "(each kv head serves a whole group of query heads)"
            )
        _choice("position", self.position, POSITIONS)
        _choice("norm", self.norm, NORMS)
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        _choice("param_dtype", self.param_dtype, DTYPES)
        _choice("compute_dtype", self.compute_dtype, DTYPES)
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got head_dim={self.head_dim}")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if not 0 < self.norm_eps < 1:
            raise ValueError(f"norm_eps must be in (0, 1), got {self.norm_eps}")
        if self.init_std <= 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}")

    @classmethod
    def gpt2(cls, **overrides: Any) -> "ModelConfig":
        """GPT-2 family: learned positions, LayerNorm, GELU(tanh) MLP, biases, tied head."""
        base = dict(position="learned", norm="layernorm", activation="gelu_tanh",
                    gated_mlp=False, use_bias=True, tie_embeddings=True)
        return cls(**{**base, **overrides})

    @classmethod
    def llama(cls, **overrides: Any) -> "ModelConfig":
        """Llama family: RoPE, RMSNorm, SwiGLU, no biases."""
        base = dict(position="rope", norm="rmsnorm", activation="silu",
                    gated_mlp=True, use_bias=False)
        return cls(**{**base, **overrides})

    @property
    def family(self) -> str | None:
        """'gpt2' or 'llama' when the components match that Hugging Face architecture, else None."""
        if (self.position, self.norm, self.gated_mlp, self.use_bias) == ("learned", "layernorm", False, True) \
                and self.n_kv_heads == self.n_heads and self.head_dim * self.n_heads == self.d_model:
            return "gpt2"
        if (self.position, self.norm, self.activation, self.gated_mlp) == ("rope", "rmsnorm", "silu", True):
            return "llama"
        return None

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        return _build(cls, d, "model")


def _build(cls: type, d: Mapping[str, Any], section: str):
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(valid))
    if unknown:
        raise ValueError(f"unknown {section} key(s) {unknown}; valid keys: {valid}")
    return cls(**d)


# Sections of a run configuration; later stages (data, train, mesh) register their dataclass here.
SECTIONS: dict[str, type] = {"model": ModelConfig}


def preset_path(name_or_path: str | Path) -> Path:
    """A config file path, or the name of a preset in configs/ (e.g. 'tiny', 'gpt2-124m')."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml", ".json") and p.exists():
        return p
    for cand in (CONFIG_DIR / f"{name_or_path}.yaml", CONFIG_DIR / f"{name_or_path}.yml"):
        if cand.exists():
            return cand
    names = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"no config file or preset named {str(name_or_path)!r}; presets: {names}")


def parse_value(text: str) -> Any:
    """A command-line value as YAML scalar: '4' -> 4, 'true' -> True, '1e-5' -> 1e-05, 'null' -> None."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:  # YAML 1.1 reads '1e-5' as a string
            return float(value)
        except ValueError:
            return value
    return value


def parse_overrides(args: Sequence[str]) -> dict[str, Any]:
    """['--model.n_layers=4', '--model.position', 'rope'] -> {'model.n_layers': 4, ...}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ValueError(f"override {arg!r} must look like --section.key=value (e.g. --model.n_layers=4)")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
        elif i + 1 < len(args):
            key, text = arg[2:], args[i + 1]
            i += 1
        else:
            raise ValueError(f"override {arg!r} has no value")
        out[key] = parse_value(text)
        i += 1
    return out


def apply_overrides(raw: dict[str, dict[str, Any]], overrides: Mapping[str, Any]) -> dict:
    """Merge dotted overrides into a raw {section: {key: value}} mapping, rejecting unknown names."""
    merged = {s: dict(v) for s, v in raw.items()}
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if section not in SECTIONS:
            raise ValueError(f"unknown config section {section!r} in {dotted!r}; sections: {sorted(SECTIONS)}")
        valid = [f.name for f in dataclasses.fields(SECTIONS[section])]
        if key not in valid:
            raise ValueError(f"unknown key {key!r} in {dotted!r}; valid {section} keys: {valid}")
        merged.setdefault(section, {})[key] = value
    return merged


def load_config(name_or_path: str | Path, overrides: Mapping[str, Any] | Sequence[str] = ()) -> dict:
    """Load a preset or file into {section: frozen dataclass}, applying dotted overrides."""
    path = preset_path(name_or_path)
    raw = (json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())) or {}
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {unknown}; sections: {sorted(SECTIONS)}")
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(list(overrides))
    merged = apply_overrides(raw, overrides)
    return {s: _build(cls, merged.get(s, {}), s) for s, cls in SECTIONS.items()}


def load_model_config(name_or_path: str | Path, overrides: Mapping[str, Any] | Sequence[str] = ()) -> ModelConfig:
    """The ModelConfig of a preset or config file, with dotted overrides applied."""
    return load_config(name_or_path, overrides)["model"]
