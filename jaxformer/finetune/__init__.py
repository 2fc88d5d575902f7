"""Fine-tuning: LoRA adapters, supervised fine-tuning on chat / prompt-completion data, PEFT adapters."""

from jaxformer.finetune.config import SFTConfig, load_finetune_config
from jaxformer.finetune.lora import (LoRAConfig, LoRALinear, apply_lora, lora_modules, merge_lora, set_dropout,
                                     split_trainable, trainable_report)
from jaxformer.finetune.peft import load_peft, save_peft
from jaxformer.finetune.task import finetune

__all__ = ["LoRAConfig", "LoRALinear", "SFTConfig", "apply_lora", "finetune", "load_finetune_config", "load_peft",
           "lora_modules", "merge_lora", "save_peft", "set_dropout", "split_trainable", "trainable_report"]
