"""SparseLinear (CPU) against dense fp32 nn.Linear and torch's CSR matmul,
K = N = 4096, M in {1, 128}, in one run on the same inputs.

    pytest bench/bench_sparse.py --benchmark-only --benchmark-json=bench/results/sparse_cpu.json
"""
import warnings

import pytest
import torch
from torch import nn

import peft_ext
from peft_ext.nn import SparseLinear

K = N = 4096
MS = [1, 128]
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


def _pruned(lin, pattern, sparsity, block):
    layer = nn.Linear(K, N)
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
    torch.manual_seed(0)
    lin = nn.Linear(K, N)
    found = {}
    for name, case in CASES.items():
        if case is None:
            found[name] = lin
            continue
        layer = _pruned(lin, *case)
        if name.startswith("torch_csr"):
            found[name] = _torch_csr(layer)
        else:
            found[name] = SparseLinear.from_linear(layer, pattern=case[0], block=case[2] or (16, 16))
    return found


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("impl", list(CASES))
def test_linear(benchmark, impls, impl, m):
    x = torch.randn(m, K)
    benchmark.group = f"sparse cpu M={m}"
    with torch.inference_mode():
        benchmark.pedantic(impls[impl], args=(x,), warmup_rounds=2, rounds=10 if m >= 128 else 30)
