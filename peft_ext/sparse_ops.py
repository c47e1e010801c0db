"""Old import path of peft_ext.ops.sparse, kept for one release."""
from .ops.sparse import bsr_linear, csr_linear, sparse24_linear

__all__ = ["bsr_linear", "csr_linear", "sparse24_linear"]
