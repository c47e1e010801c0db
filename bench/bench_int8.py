"""int8 linear against its peers, CPU and CUDA, in one run per device.

    bench/run.sh int8                    # or:
    pytest bench/bench_int8.py --benchmark-only --benchmark-json=bench/results/raw/int8.json
    python bench/summarize.py bench/results/raw/int8.json

CPU, K = N = 4096, fp32 activations, M in {1, 16, 128, 512}, two cache regimes:
hot (one layer, called again and again) and cold (the calls rotate over enough
copies of the layer that their total is above twice the L3, as a real model's
layers are). Peers: fp32 nn.Linear, fbgemm dynamic (torch.ao quantize_dynamic),
ATen's weight-only torch._weight_int8pack_mm, torchao's int8 configs (if
installed); ours: Int8Linear dynamic (W8A8) and weight-only.

CUDA, K = 4096 and N in {4096, 14336}, bf16 activations, no bias, M from 1 to
8192, weights cold (rotated past the L2). Peers: bf16 F.linear (cuBLAS) and
torch._int_mm + rescale (torchao's dynamic path, where cuBLAS accepts the
shape); ours: int8_linear and int8_linear_weight_only. Every call of the timed
round is captured in one CUDA graph and timed with CUDA events.

Accuracy: SQNR (dB) of each output against float64 with the unquantized weight.
Roofline: each row's floor is max(bytes read / measured read bandwidth,
2*M*N*K / measured peak of its arithmetic), see harness.roofline_*.
"""
import contextlib
import copy
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import harness
from harness import QUICK

from peft_ext import ops
from peft_ext.nn import Int8Linear

GROUP = "int8"

# ---------------------------------------------------------------------------
# CPU

K = N = 256 if QUICK else 4096
MS = [1, 16] if QUICK else [1, 16, 128, 512]
REGIMES = ["hot", "cold"]
# PEFT_EXT_BENCH_ISAS=scalar,avx2,...: measure ours on each of these CPU tiers in the same run
# (impl names get the tier as a suffix); unset: the tier in use only, plain names.
ISAS = [t for t in os.environ.get("PEFT_EXT_BENCH_ISAS", "").split(",") if t]
OURS = [f"{impl}_{isa}" for impl in ("peft_ext_dynamic", "peft_ext_weight_only") for isa in ISAS] or [
    "peft_ext_dynamic", "peft_ext_weight_only"]
IMPLS = ["fp32_linear", "fbgemm_dynamic", "aten_weight_int8pack_mm", "torchao_int8_dynamic",
         "torchao_int8_weight_only", *OURS]
# What each row's `ratio` compares against (the plot shows every peer).
BASELINE = {"peft_ext_dynamic": "fbgemm_dynamic", "peft_ext_weight_only": "aten_weight_int8pack_mm"}
# Which measured peak bounds an implementation's arithmetic.
INT8_MATH = {"fbgemm_dynamic", "torchao_int8_dynamic", "peft_ext_dynamic"}


def _fbgemm(lin):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(nn.Sequential(copy.deepcopy(lin)), {nn.Linear}, dtype=torch.qint8)


def _torchao(config_name):
    try:
        import torchao.quantization as tq
    except ImportError:
        return None

    def make(lin):
        model = nn.Sequential(copy.deepcopy(lin))
        tq.quantize_(model, getattr(tq, config_name)())
        return model

    return make


def _aten_int8pack(lin):
    q, s = ops.quantize_weight(lin.weight)
    bias = lin.bias.detach().clone()
    return lambda x: torch._weight_int8pack_mm(x, q, s) + bias


MAKERS = {
    "fp32_linear": copy.deepcopy,
    "fbgemm_dynamic": _fbgemm,
    "aten_weight_int8pack_mm": _aten_int8pack,
    "torchao_int8_dynamic": _torchao("Int8DynamicActivationInt8WeightConfig"),
    "torchao_int8_weight_only": _torchao("Int8WeightOnlyConfig"),
    "peft_ext_dynamic": lambda lin: Int8Linear.from_linear(lin, mode="dynamic"),
    "peft_ext_weight_only": lambda lin: Int8Linear.from_linear(lin, mode="weight_only"),
}


def weight_bytes(impl, k, n):
    """Bytes of weight one call reads (int8 values + fp32 scales, or fp32)."""
    return 4 * n * k if impl == "fp32_linear" else n * k + 4 * n


def split_isa(impl):
    """("peft_ext_dynamic", "avx2") for "peft_ext_dynamic_avx2" when tiers are listed."""
    for isa in ISAS:
        if impl.endswith("_" + isa) and impl.startswith("peft_ext"):
            return impl[: -len(isa) - 1], isa
    return impl, None


@contextlib.contextmanager
def cpu_isa(isa):
    if isa is None:
        yield
        return
    before = ops.build_info()["cpu_isa"]
    try:
        ops.set_cpu_isa(isa)
    except (RuntimeError, ValueError) as exc:
        pytest.skip(f"tier {isa} is not available here: {exc}")
    try:
        yield
    finally:
        ops.set_cpu_isa(before)


class Layers:
    """Built on first use: one hot layer per implementation, and cold copies."""

    def __init__(self):
        torch.manual_seed(0)
        self.lin = nn.Linear(K, N).requires_grad_(False)
        self.cache = {}

    def get(self, impl, regime):
        impl = split_isa(impl)[0]  # one set of layers for every tier
        key = (impl, regime)
        if key not in self.cache:
            make = MAKERS[impl]
            if make is None:
                return None
            if regime == "hot":
                self.cache[key] = make(self.lin)
            else:
                n = harness.cold_copies(weight_bytes(impl, K, N), harness.l3_bytes())
                # Copies of the layer, not of one object: each owns its weight memory.
                self.cache[key] = harness.Rotation([make(self.lin) for _ in range(n)])
                self.cache[key].n = n
        return self.cache[key]


@pytest.fixture(scope="module")
def layers():
    return Layers()


@pytest.fixture(scope="module")
def roofline():
    return harness.roofline_cpu()


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("impl", IMPLS)
def test_linear_cpu(benchmark, layers, roofline, impl, regime, m):
    fn = layers.get(impl, regime)
    if fn is None:
        pytest.skip(f"{impl} is not installed")
    torch.manual_seed(m)
    x = torch.randn(m, K)
    slow = impl.startswith("torchao") and m >= 128
    kind, isa = split_isa(impl)
    with torch.inference_mode(), cpu_isa(isa):
        lin = layers.lin
        exact = x.double() @ lin.weight.double().t() + lin.bias.double()
        accuracy = harness.sqnr_db(exact, layers.get(impl, "hot")(x))
        ops_per_s = roofline["cpu_int8_ops" if kind in INT8_MATH else "cpu_fp32_flops"]
        bytes_read = weight_bytes(kind, K, N) + 4 * m * K + 4 * m * N
        bound, bound_kind = harness.bound_seconds(bytes_read, 2 * m * N * K,
                                                  roofline["cpu_read_bytes_per_s"], ops_per_s)
        benchmark.group = GROUP
        benchmark.extra_info.update(
            op="linear", impl=impl, shape=f"{K}x{N}", dtype="float32", M=m, device="cpu", regime=regime,
            baseline=BASELINE.get(kind, "fp32_linear"), accuracy=accuracy, bound_s=bound, bound=bound_kind,
            copies=getattr(fn, "n", 1),
            isa=(isa or ops.build_info()["cpu_isa"]) if kind.startswith("peft_ext") else None)
        rounds = 2 if QUICK else 3 if slow else (10 if m >= 128 else 50)
        benchmark.pedantic(fn, args=(x,), warmup_rounds=1 if (slow or QUICK) else 3, rounds=rounds)
        # Ours against its baseline in alternating calls as well (see harness.paired_ratio);
        # ATen's weight-only kernel takes seconds at M >= 16, so that pair stays at M = 1.
        # Hot at M = 1 the two layers evict each other from the L3 (16 MiB of int8 each,
        # ours 32 with the prepacked copy), so there the separate hot timing is the hot one.
        base = BASELINE.get(kind)
        if base is not None and (base != "aten_weight_int8pack_mm" or m == 1):
            base_fn = layers.get(base, regime)
            benchmark.extra_info["paired_ratio"] = harness.paired_ratio(
                base_fn, fn, x, pairs=2 if QUICK else (10 if m >= 128 else 40))


# ---------------------------------------------------------------------------
# CUDA

CUDA_SHAPES = [(256, 512)] if QUICK else [(4096, 4096), (4096, 14336)]
CUDA_MS = [1, 2, 16, 128] if QUICK else [1, 2, 4, 8, 16, 128, 512, 2048, 4096, 8192]
CUDA_IMPLS = ["bf16_linear", "torch_int_mm", "peft_ext_dynamic", "peft_ext_weight_only"]
# Weight-only multiplies in bf16 through cuBLAS above M = 16 and is memory bound below.
CUDA_INT8_MATH = {"torch_int_mm", "peft_ext_dynamic"}


def _quantize_rows_torch(x):
    """torchao-style per-token quantization written in torch ops (the peer's input path)."""
    s = x.abs().amax(dim=1, keepdim=True).float() / 127
    q = torch.round(x.float() / s.clamp_min(1e-12)).clamp_(-127, 127).to(torch.int8)
    return q, s


def int_mm_allowed(m, k, n):
    return m > 16 and k % 8 == 0 and n % 8 == 0


def cuda_call(impl, x, weights):
    """fn(i) for one implementation; weights[i % len] rotates the copies."""
    c = len(weights)
    if impl == "bf16_linear":
        return lambda i: F.linear(x, weights[i % c]["bf16"])
    if impl == "torch_int_mm":
        def fn(i):
            w = weights[i % c]
            q, s = _quantize_rows_torch(x)
            return (torch._int_mm(q, w["q_t"]).float() * s * w["s"]).to(torch.bfloat16)
        return fn
    if impl == "peft_ext_dynamic":
        return lambda i: ops.int8_linear(x, weights[i % c]["q"], weights[i % c]["s"])
    return lambda i: ops.int8_linear_weight_only(x, weights[i % c]["q"], weights[i % c]["s"])


def cuda_bytes(impl, m, k, n):
    return n * k * (2 if impl == "bf16_linear" else 1) + m * k * 2 + m * n * 2


class CudaWeights:
    """Per shape: enough copies of the weight (bf16, int8, int8 transposed) to exceed 3x L2."""

    def __init__(self):
        self.shape, self.weights = None, None

    def get(self, k, n):
        if self.shape != (k, n):
            self.weights = None
            torch.cuda.empty_cache()
            g = torch.Generator(device="cuda").manual_seed(k + n)
            w = torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16)
            q, s = ops.quantize_weight(w)
            l2 = torch.cuda.get_device_properties(0).L2_cache_size
            copies = max(2, math.ceil(3 * l2 / (n * k)))
            copies = min(copies, 4) if QUICK else copies
            self.weights = [{"bf16": w.clone(), "q": q.clone(), "s": s.clone(), "q_t": q.clone().t()}
                            for _ in range(copies)]
            self.shape = (k, n)
        return self.weights


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
    if impl == "torch_int_mm" and not int_mm_allowed(m, k, n):
        pytest.skip("cuBLAS int8 needs M > 16 and K, N multiples of 8")
    weights = cuda_weights.get(k, n)
    g = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
    with torch.inference_mode():
        fn = cuda_call(impl, x, weights)
        exact = x.double() @ weights[0]["bf16"].double().t()
        accuracy = harness.sqnr_db(exact, fn(0))
        del exact
        t1 = harness.cuda_seconds(lambda: fn(0), reps=3)
        calls = max(1, min(len(weights) * 4, math.ceil(2e-3 / max(t1, 1e-7))))
        calls = max(calls, len(weights)) if m <= 16 else calls
        run, mode = harness.cuda_graph(fn, calls)
        peak = roofline_cuda["cuda_int8_ops" if impl in CUDA_INT8_MATH else "cuda_bf16_flops"]
        bound, bound_kind = harness.bound_seconds(cuda_bytes(impl, m, k, n), 2 * m * n * k,
                                                  roofline_cuda["cuda_copy_bytes_per_s"], peak)
        benchmark.group = GROUP
        benchmark.extra_info.update(
            op="linear", impl=impl, shape=f"{k}x{n}", dtype="bfloat16", M=m, device="cuda", regime="cold",
            baseline="torch_int_mm" if impl == "peft_ext_dynamic" and int_mm_allowed(m, k, n) else "bf16_linear",
            accuracy=accuracy, bound_s=bound, bound=bound_kind, calls=calls, timing=mode, copies=len(weights))
        harness.cuda_pedantic(benchmark, run, rounds=5 if QUICK else 15)
