"""Integrations with other libraries, each imported only when asked for (or,
for transformers, when transformers itself is imported): nothing here imports
a third-party package eagerly.

- peft_ext.integrations.transformers: PeftExtConfig and its HfQuantizer, so
  that from_pretrained / save_pretrained round-trip patched models.
"""
