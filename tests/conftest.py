import pytest
import torch

import peft_ext
from peft_ext import ops

# Every CPU kernel tier, lowest first; a CPU that has a tier has all below it.
ALL_ISAS = ["scalar", "avx2", "avx_vnni", "avx512_vnni"]
DETECTED_ISA = ops.build_info()["cpu_isa_detected"]
ISAS = ALL_ISAS[: ALL_ISAS.index(DETECTED_ISA) + 1]
HAS_CUDA = torch.cuda.is_available() and ops.build_info().get("cuda") == "1"


@pytest.fixture(params=ALL_ISAS)
def isa(request):
    """Runs a test once on every CPU kernel tier; tiers this CPU lacks are
    skipped, naming the tier (see them with pytest -rs)."""
    if request.param not in ISAS:
        pytest.skip(f"CPU tier {request.param} not supported here (best: {DETECTED_ISA})")
    before = ops.build_info()["cpu_isa"]
    ops.set_cpu_isa(request.param)
    yield request.param
    ops.set_cpu_isa(before)


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref = ref.double()
    noise = (out.double() - ref).pow(2).sum()
    return float(10 * torch.log10(ref.pow(2).sum() / noise))


def make_int8(m, k, n, dtype=torch.float32, bias=True, seed=None):
    """Fresh random CPU inputs of an int8 linear: x [m, k], int8 weight [n, k]
    with its scales, bias [n] (or None)."""
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    x = torch.randn(m, k, generator=g).to(dtype)
    q, s = ops.quantize_weight(torch.randn(n, k, generator=g))
    b = torch.randn(n, generator=g) if bias else None
    return x, q, s, b


def tol(dtype):
    """Tolerances against the reference for each output dtype."""
    return {torch.float32: dict(atol=1e-4, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
            torch.float16: dict(atol=3e-3, rtol=2e-3)}[dtype]


requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and the CUDA kernels")
__all__ = ["peft_ext", "sqnr_db", "requires_cuda"]
