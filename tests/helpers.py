"""Helpers shared by the tests: CPU tiers and CUDA detection, input makers,
tolerances, moving inputs to a device and the poisoned-allocator runner.

Tests import from here (`from helpers import ...`), never from another test
module or from conftest.py, which holds only fixtures."""
import pytest
import torch
from torch import nn

from peft_ext import formats, ops

# Every CPU kernel tier, lowest first; a CPU that has a tier has all below it.
ALL_ISAS = ["scalar", "avx2", "avx_vnni", "avx512_vnni"]
DETECTED_ISA = ops.build_info()["cpu_isa_detected"]
ISAS = ALL_ISAS[: ALL_ISAS.index(DETECTED_ISA) + 1]
HAS_CUDA = torch.cuda.is_available() and ops.build_info().get("cuda") == "1"

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and the CUDA kernels")
# What every CUDA test carries: the marker bench/gpu_check.sh selects (-m cuda)
# and the skip without a GPU.
CUDA_MARKS = [pytest.mark.cuda, requires_cuda]


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref = ref.double()
    noise = (out.double() - ref).pow(2).sum()
    return float(10 * torch.log10(ref.pow(2).sum() / noise))


def tol(dtype):
    """Tolerances against the reference for each output dtype."""
    return {torch.float32: dict(atol=1e-4, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
            torch.float16: dict(atol=3e-3, rtol=2e-3)}[dtype]


def sparse_tol(dtype):
    """Tolerances of the sparse ops (float32 sums in another order than the reference)."""
    return {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
            torch.float16: dict(atol=3e-3, rtol=2e-3)}[dtype]


def to(device, *tensors):
    """The tensors (None and non-tensors passed through) on `device`."""
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in tensors]


def cuda(*tensors):
    return to("cuda", *tensors)


# ---- int8 inputs

def make_int8(m, k, n, dtype=torch.float32, bias=True, seed=None):
    """Fresh random CPU inputs of an int8 linear: x [m, k], int8 weight [n, k]
    with its scales, bias [n] (or None)."""
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    x = torch.randn(m, k, generator=g).to(dtype)
    q, s = ops.quantize_weight(torch.randn(n, k, generator=g))
    b = torch.randn(n, generator=g) if bias else None
    return x, q, s, b


# ---- sparse inputs (CPU tensors)

def gen():
    return torch.Generator().manual_seed(torch.seed() % 2**31)


def mask_24(n, k, g):
    keep = torch.rand(n, k // 4, 4, generator=g).argsort(dim=2)[..., :2]
    return torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(2, keep, True).view(n, k)


def make_24(m, k, n, g, dtype=torch.float32):
    """x [m, k] in `dtype`, float32 2:4 values and indices, float32 bias."""
    w = torch.randn(n, k, generator=g)
    values, indices = formats.compress_24(w, mask_24(n, k, g))
    return torch.randn(m, k, generator=g).to(dtype), values, indices, torch.randn(n, generator=g)


def make_24_in(m, k, n, g, dtype):
    """Everything in `dtype`: x [m, k], values, indices, bias."""
    w = torch.randn(n, k, generator=g).to(dtype)
    values, indices = formats.compress_24(w, mask_24(n, k, g))
    return torch.randn(m, k, generator=g).to(dtype), values, indices, torch.randn(n, generator=g).to(dtype)


def make_csr(m, k, n, g, density=0.3):
    w = torch.randn(n, k, generator=g)
    mask = torch.rand(n, k, generator=g) < density
    return (torch.randn(m, k, generator=g), *formats.compress_csr(w, mask), k, torch.randn(n, generator=g))


def make_bsr(m, block, rows, cols, g, density=0.4):
    bh, bw = block
    n, k = rows * bh, cols * bw
    w = torch.randn(n, k, generator=g)
    keep = torch.rand(rows, cols, generator=g) < density
    mask = keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)
    return (torch.randn(m, k, generator=g), *formats.compress_bsr(w, mask, block), k, torch.randn(n, generator=g))


def close(out, expected, dtype=torch.float32):
    t = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(out, expected, **t)


# ---- CUDA: every output element written, runs agree

def poison_allocator():
    """Leaves the caching allocator's free blocks (small and large pools) full
    of 0xFF bytes: NaN in every float dtype, -1 as int8, so any output element
    a kernel fails to write shows up."""
    blocks = [torch.empty(1 << 18, dtype=torch.int32, device="cuda") for _ in range(8)]
    blocks.append(torch.empty(1 << 24, dtype=torch.int32, device="cuda"))
    for b in blocks:
        b.fill_(-1)
    torch.cuda.synchronize()
    del blocks


def run_poisoned(fn, *args):
    """Runs fn twice into fresh, poisoned allocations; both runs must agree bit
    for bit (an unwritten float element is NaN and never equal to itself)."""
    poison_allocator()
    first = fn(*args)
    torch.cuda.synchronize()
    poison_allocator()
    second = fn(*args)
    torch.cuda.synchronize()
    pairs = zip(first, second) if isinstance(first, tuple) else [(first, second)]
    for a, b in pairs:
        assert torch.equal(a, b), "two runs differ: unwritten or racy output"
    return first


def run_on(device, fn, *args):
    """fn on `device` with the tensors among args moved there; on CUDA through
    run_poisoned (unwritten or racy output fails), on the CPU a plain call."""
    args = to(device, *args)
    if torch.device(device).type == "cuda":
        return run_poisoned(fn, *args)
    return fn(*args)


# ---- a small model for the patch() tests

class Block(nn.Module):
    def __init__(self, d=64):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        return x + self.mlp(self.q_proj(x) + self.v_proj(x))


class Toy(nn.Module):
    def __init__(self, d=64, vocab=50):
        super().__init__()
        self.layers = nn.ModuleList([Block(d), Block(d)])
        self.tiny = nn.Linear(4, 4)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


def toy():
    torch.manual_seed(0)
    return Toy()
