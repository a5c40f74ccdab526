"""
flash_dmattn.integrations -- framework integrations. Importing it registers "flash_dmattn" as a Hugging Face
transformers attention implementation (when transformers is installed), so that

    model = AutoModelForCausalLM.from_config(config, attn_implementation="flash_dmattn")

runs attention through flash_dmattn. register() can be called again at any time (idempotent).
"""
from .flash_dynamic_mask_attention import (flash_dmattn_mask, flash_dynamic_mask_attention_forward, register,
                                           split_attention_mask)

TRANSFORMERS_REGISTERED = register()

__all__ = ["flash_dynamic_mask_attention_forward", "flash_dmattn_mask", "register", "split_attention_mask",
           "TRANSFORMERS_REGISTERED"]
