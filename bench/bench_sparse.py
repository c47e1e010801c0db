"""Sparse (pruned) linear against its peers, CPU and CUDA, in one run per device.

    bench/run.sh sparse                  # or:
    pytest bench/bench_sparse.py --benchmark-only --benchmark-json=bench/results/raw/sparse.json
    python bench/summarize.py bench/results/raw/sparse.json

CPU, K = N = 4096, fp32, M in {1, 128}, same inputs for all: dense nn.Linear and
torch's CSR matmul (50 % and 90 % unstructured) against SparseLinear 2:4, 90 %
block-sparse (16x16 and 32x32 blocks) and 90 % CSR.

CUDA, K = 4096 and N in {4096, 14336}, bf16, no bias, M in {1, 16, 128, 2048,
4096, 8192}, weights rotated past the L2: dense bf16 F.linear (cuBLAS) and
torch's semi-structured 2:4 (cuSPARSELt / CUTLASS, where it accepts the shape)
against SparseLinear 2:4 (mma.sp) and 90 % block-sparse 16x16 (BSR). One CUDA
graph per timed round, CUDA-event timing.

Accuracy: SQNR (dB) against float64 with the same pruned weight (what the kernel
should compute). Roofline (CUDA): bytes of the stored format over the measured
copy bandwidth, useful products over the measured dense bf16 peak.
"""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import harness
from harness import QUICK

import peft_ext
from peft_ext.nn import SparseLinear

GROUP = "sparse"

# ---------------------------------------------------------------------------
# CPU

K = N = 256 if QUICK else 4096
MS = [1, 128] if not QUICK else [1, 16]
# name: (pattern, sparsity, block) of the pruned layer, or None for dense.
CASES = {
    "dense_fp32_linear": None,
    "torch_csr_50": ("unstructured", 0.5, None),
    "torch_csr_90": ("unstructured", 0.9, None),
    "peft_ext_24": ("2:4", 0.5, None),
    "peft_ext_block90_16x16": ("block", 0.9, (16, 16)),
    "peft_ext_block90_32x32": ("block", 0.9, (32, 32)),
    "peft_ext_csr90": ("unstructured", 0.9, None),
}
BASELINE = {"peft_ext_csr90": "torch_csr_90"}


def _pruned(lin, pattern, sparsity, block):
    layer = nn.Linear(lin.in_features, lin.out_features)
    layer.load_state_dict(lin.state_dict())
    peft_ext.prune(nn.Sequential(layer), sparsity, pattern, block=block or (16, 16), exclude_modules=None,
                   masked_training=False)
    return layer


def _torch_csr(layer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        w = layer.weight.detach().to_sparse_csr()
    bias = layer.bias.detach()
    return lambda x: torch.mm(w, x.t()).t() + bias


@pytest.fixture(scope="module")
def impls():
    """name -> (callable, the dense weight it stands for, its bias)."""
    torch.manual_seed(0)
    lin = nn.Linear(K, N).requires_grad_(False)
    found = {}
    for name, case in CASES.items():
        if case is None:
            found[name] = (lin, lin.weight.detach(), lin.bias.detach())
            continue
        layer = _pruned(lin, *case)
        w, b = layer.weight.detach().clone(), layer.bias.detach()
        if name.startswith("torch_csr"):
            found[name] = (_torch_csr(layer), w, b)
        else:
            found[name] = (SparseLinear.from_linear(layer, pattern=case[0], block=case[2] or (16, 16)), w, b)
    return found


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("impl", list(CASES))
def test_linear_cpu(benchmark, impls, impl, m):
    torch.manual_seed(m)
    x = torch.randn(m, K)
    fn, w, b = impls[impl]
    with torch.inference_mode():
        accuracy = harness.sqnr_db(x.double() @ w.double().t() + b.double(), fn(x))
        benchmark.group = GROUP
        benchmark.extra_info.update(op="linear", impl=impl, shape=f"{K}x{N}", dtype="float32", M=m, device="cpu",
                                    baseline=BASELINE.get(impl, "dense_fp32_linear"), accuracy=accuracy)
        rounds = 2 if QUICK else (10 if m >= 128 else 30)
        benchmark.pedantic(fn, args=(x,), warmup_rounds=1 if QUICK else 2, rounds=rounds)
        if impl.startswith("peft_ext"):
            # and in calls alternating with the baseline (harness.paired_ratio)
            base = BASELINE.get(impl, "dense_fp32_linear")
            benchmark.extra_info["paired_ratio"] = harness.paired_ratio(
                impls[base][0], fn, x, pairs=2 if QUICK else (8 if m >= 128 else 30))


# ---------------------------------------------------------------------------
# CUDA

CUDA_SHAPES = [(256, 512)] if QUICK else [(4096, 4096), (4096, 14336)]
CUDA_MS = [1, 16, 128] if QUICK else [1, 16, 128, 2048, 4096, 8192]
CUDA_IMPLS = ["bf16_linear", "torch_semi_structured_24", "peft_ext_24", "peft_ext_block90_16x16"]
BLOCK, BLOCK_SPARSITY = (16, 16), 0.9


def _layer(w):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype).requires_grad_(False)
    lin.weight.copy_(w)
    return lin


def _semi(w24):
    try:
        semi = torch.sparse.to_sparse_semi_structured(w24)
        x = torch.zeros(32, w24.shape[1], device=w24.device, dtype=w24.dtype)
        F.linear(x, semi)
        return semi
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        warnings.warn(f"to_sparse_semi_structured unavailable: {exc}")
        return None


class CudaWeights:
    """Per shape: copies (past 3x L2) of the dense bf16 weight, its 2:4-pruned
    forms (ours and torch's) and a 90 % block-sparse SparseLinear."""

    def __init__(self):
        self.shape, self.copies, self.dense = None, None, None

    def get(self, k, n):
        if self.shape == (k, n):
            return self.copies
        self.copies = None
        torch.cuda.empty_cache()
        g = torch.Generator(device="cuda").manual_seed(k + n)
        w = torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16)
        keep = torch.rand(n, k // 4, 4, device="cuda", generator=g).argsort(dim=2)[..., :2]
        mask24 = torch.zeros(n, k // 4, 4, dtype=torch.bool, device="cuda").scatter_(2, keep, True).view(n, k)
        kept = torch.rand(n // BLOCK[0], k // BLOCK[1], device="cuda", generator=g) >= BLOCK_SPARSITY
        maskb = kept.repeat_interleave(BLOCK[0], 0).repeat_interleave(BLOCK[1], 1)
        l2 = torch.cuda.get_device_properties(0).L2_cache_size
        count = max(2, math.ceil(3 * l2 / (n * k * 2)))
        count = min(count, 3) if QUICK else count
        self.copies = []
        for _ in range(count):
            wc = w.clone()
            self.copies.append({
                "bf16_linear": _layer(wc),
                "torch_semi_structured_24": _semi(wc * mask24),
                "peft_ext_24": SparseLinear.from_linear(_layer(wc * mask24), pattern="2:4"),
                "peft_ext_block90_16x16": SparseLinear.from_linear(_layer(wc), pattern="block", mask=maskb,
                                                                   block=BLOCK),
            })
        self.dense = {"bf16_linear": w, "torch_semi_structured_24": w * mask24, "peft_ext_24": w * mask24,
                      "peft_ext_block90_16x16": w * maskb}
        self.density = float(kept.float().mean())
        self.shape = (k, n)
        return self.copies


def cuda_bytes(impl, m, k, n, density):
    weight = {"bf16_linear": n * k * 2, "torch_semi_structured_24": n * k + n * k // 8,
              "peft_ext_24": n * k + n * k // 8, "peft_ext_block90_16x16": int(density * n * k * 2)}[impl]
    return weight + m * k * 2 + m * n * 2


def useful_flops(impl, m, k, n, density):
    frac = {"bf16_linear": 1.0, "torch_semi_structured_24": 0.5, "peft_ext_24": 0.5,
            "peft_ext_block90_16x16": density}[impl]
    return 2 * m * n * k * frac


@pytest.fixture(scope="module")
def cuda_weights():
    return CudaWeights()


@pytest.fixture(scope="module")
def roofline_cuda():
    return harness.roofline_cuda()


@pytest.mark.cuda
@harness.requires_cuda
@pytest.mark.parametrize("m", CUDA_MS)
@pytest.mark.parametrize("impl", CUDA_IMPLS)
@pytest.mark.parametrize("k,n", CUDA_SHAPES)
def test_linear_cuda(benchmark, cuda_weights, roofline_cuda, k, n, impl, m):
    copies = cuda_weights.get(k, n)
    if copies[0][impl] is None:
        pytest.skip("torch's semi-structured 2:4 refuses this shape or GPU")
    g = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
    c = len(copies)
    if impl == "torch_semi_structured_24":
        fn = lambda i: F.linear(x, copies[i % c][impl])  # noqa: E731
    else:
        fn = lambda i: copies[i % c][impl](x)  # noqa: E731
    with torch.inference_mode():
        try:
            y = fn(0)
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            pytest.skip(f"{impl} refuses M={m}: {exc}")
        exact = x.double() @ cuda_weights.dense[impl].double().t()
        accuracy = harness.sqnr_db(exact, y)
        del exact, y
        t1 = harness.cuda_seconds(lambda: fn(0), reps=3)
        calls = max(1, min(c * 4, math.ceil(2e-3 / max(t1, 1e-7))))
        calls = max(calls, c) if m <= 16 else calls
        run, mode = harness.cuda_graph(fn, calls)
        density = cuda_weights.density
        bound, bound_kind = harness.bound_seconds(cuda_bytes(impl, m, k, n, density),
                                                  useful_flops(impl, m, k, n, density),
                                                  roofline_cuda["cuda_copy_bytes_per_s"],
                                                  roofline_cuda["cuda_bf16_flops"])
        benchmark.group = GROUP
        benchmark.extra_info.update(
            op="linear", impl=impl, shape=f"{k}x{n}", dtype="bfloat16", M=m, device="cuda", regime="cold",
            baseline="torch_semi_structured_24" if impl == "peft_ext_24" and copies[0][
                "torch_semi_structured_24"] is not None else "bf16_linear",
            accuracy=accuracy, bound_s=bound, bound=bound_kind, calls=calls, timing=mode, copies=c,
            block_density=density)
        harness.cuda_pedantic(benchmark, run, rounds=5 if QUICK else 15)
