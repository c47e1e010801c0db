import pytest
import torch

import peft_ext
from peft_ext import ops

ISAS = ["scalar"] + (["avx2"] if ops.build_info()["cpu_isa_detected"] == "avx2" else [])
HAS_CUDA = torch.cuda.is_available() and ops.build_info().get("cuda") == "1"


@pytest.fixture(params=ISAS)
def isa(request):
    """Runs a test once with the portable kernels and once with AVX2."""
    before = ops.build_info()["cpu_isa"]
    ops.set_cpu_isa(request.param)
    yield request.param
    ops.set_cpu_isa(before)


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref = ref.double()
    noise = (out.double() - ref).pow(2).sum()
    return float(10 * torch.log10(ref.pow(2).sum() / noise))


requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and the CUDA kernels")
__all__ = ["peft_ext", "sqnr_db", "requires_cuda"]
