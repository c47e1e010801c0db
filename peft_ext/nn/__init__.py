"""Drop-in modules backed by peft_ext kernels."""
from .int8_linear import Int8Linear

__all__ = ["Int8Linear"]
