"""Python side of the torch.ops.peft_ext library, one module per csrc concept:
ops.int8 (csrc/*/int8_*) and ops.sparse (csrc/*/sparse*). Importing the
package loads the compiled library and registers every fake and autograd."""
import torch

from .. import _C  # noqa: F401  (loads the library and registers the ops)
from .int8 import (int8_dequantize, int8_grad_input, int8_linear, int8_linear_packed, int8_linear_weight_only,
                   int8_pack_weight, quantize_per_token, quantize_weight)
from .sparse import bsr_linear, csr_linear, sparse24_linear

# The float dtypes every linear kernel accepts.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

__all__ = ["FLOAT_DTYPES", "build_info", "bsr_linear", "csr_linear", "int8_dequantize", "int8_grad_input",
           "int8_linear", "int8_linear_packed", "int8_linear_weight_only", "int8_pack_weight", "quantize_per_token",
           "quantize_weight", "set_cpu_isa", "sparse24_linear"]


def build_info() -> dict:
    """Facts about the compiled library: CPU ISA in use, CUDA archs built."""
    return dict(item.split("=", 1) for item in torch.ops.peft_ext.build_info().split(";") if item)


def set_cpu_isa(isa: str) -> None:
    """Choose the CPU kernel tier: "scalar", "avx2", "avx_vnni" or "avx512_vnni"
    (ValueError for an unknown name or one this CPU lacks); for tests and comparisons."""
    torch.ops.peft_ext.set_cpu_isa(isa)
