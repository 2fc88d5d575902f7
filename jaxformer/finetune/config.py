"""Fine-tuning run configuration: sections sft, lora, train, mesh (frozen dataclasses, dotted overrides)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from jaxformer.config import MeshConfig, TrainConfig, build_section, parse_overrides, preset_path, require_local
from jaxformer.finetune.lora import LoRAConfig

METHODS = ("lora", "full")


def _paths(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    return (str(value),) if isinstance(value, (str, Path)) else tuple(str(v) for v in value)


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """What to fine-tune (base weights, method) on which data (JSONL chat or prompt/completion)."""

    base: str | None = None  # a jaxformer model / run directory or a Hugging Face directory
    data: tuple[str, ...] = ()  # JSONL files of training examples
    val_data: tuple[str, ...] = ()  # held-out JSONL; empty: val_fraction of data, split by content hash
    val_fraction: float = 0.05
    method: str = "lora"  # lora: adapters only, base frozen | full: every parameter
    tokenizer: str | None = None  # default: the tokenizer beside the base checkpoint
    seq_len: int | None = None  # tokens per row (None: the base model's max_seq_len); longer examples are truncated
    packed: bool = True  # several examples per row (segment ids keep them apart)
    seed: int = 0  # data order
    eval_at_start: bool = True  # held-out loss of the base before any step (logged at step 0)
    sample_prompts: int = 2  # held-out prompts answered greedily at the end (0: none)
    sample_tokens: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", _paths(self.data))
        object.__setattr__(self, "val_data", _paths(self.val_data))
        if self.method not in METHODS:
            raise ValueError(f"sft.method={self.method!r} is not supported; choose one of {list(METHODS)}")
        if self.seq_len is not None and (not isinstance(self.seq_len, int) or self.seq_len <= 0):
            raise ValueError(f"sft.seq_len must be a positive integer, got {self.seq_len!r}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"sft.val_fraction must be in (0, 1), got {self.val_fraction}")
        for path in (self.base, self.tokenizer, *self.data, *self.val_data):
            require_local("sft paths", path)


SECTIONS: dict[str, type] = {"sft": SFTConfig, "lora": LoRAConfig, "train": TrainConfig, "mesh": MeshConfig}


def load_finetune_config(name_or_path: str | Path | None = None,
                         overrides: Mapping[str, Any] | Sequence[str] = ()) -> dict[str, Any]:
    """{section: frozen dataclass} from a preset / YAML / JSON file (or defaults) plus dotted overrides."""
    raw: dict = {}
    if name_or_path is not None:
        path = preset_path(name_or_path)
        raw = (json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())) or {}
        if not isinstance(raw, Mapping) or not all(v is None or isinstance(v, Mapping) for v in raw.values()):
            raise ValueError(f"{path}: expected sections {sorted(SECTIONS)}, each a mapping of key: value")
        unknown = sorted(set(raw) - set(SECTIONS))
        if unknown:
            raise ValueError(f"{path}: unknown section(s) {unknown}; fine-tuning sections: {sorted(SECTIONS)}")
    merged = {s: dict(v or {}) for s, v in raw.items()}
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(list(overrides))
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if section not in SECTIONS:
            raise ValueError(f"unknown config section {section!r} in {dotted!r}; fine-tuning sections: "
                             f"{sorted(SECTIONS)}")
        valid = [f.name for f in dataclasses.fields(SECTIONS[section])]
        if key not in valid:
            raise ValueError(f"unknown key {key!r} in {dotted!r}; valid {section} keys: {valid}")
        merged.setdefault(section, {})[key] = value
    return {s: build_section(cls, merged.get(s, {}), s) for s, cls in SECTIONS.items()}
