"""Drop-in modules backed by peft_ext kernels."""
from .int8_linear import Int8Linear
from .sparse_linear import SparseLinear

__all__ = ["Int8Linear", "SparseLinear"]
