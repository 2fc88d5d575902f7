"""Fine-tuning: LoRA adapters and full supervised fine-tuning on chat / prompt-completion data."""

from jaxformer.finetune.config import SFTConfig, load_finetune_config
from jaxformer.finetune.lora import (LoRAConfig, LoRALinear, apply_lora, lora_modules, merge_lora, set_dropout,
                                     split_trainable, trainable_report)
from jaxformer.finetune.loop import finetune

__all__ = ["LoRAConfig", "LoRALinear", "SFTConfig", "apply_lora", "finetune", "load_finetune_config", "lora_modules",
           "merge_lora", "set_dropout", "split_trainable", "trainable_report"]
