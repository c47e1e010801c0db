"""Bridges to optional third-party libraries (HF peft, transformers). Nothing
here is imported eagerly: each bridge loads when its library does."""
