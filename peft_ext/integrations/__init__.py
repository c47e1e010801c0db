"""Integrations with other libraries, each imported when that library itself is
imported (integrations/_lazy.py): nothing here imports a third-party package
eagerly.

- peft_ext.integrations.transformers: PeftExtConfig and its HfQuantizer, so
  that from_pretrained / save_pretrained round-trip patched models.
- peft_ext.integrations.peft: HF peft's LoRA wraps Int8Linear and SparseLinear
  (target_modules lists, regexes, "all-linear"), merge_and_unload requantizes.
"""
