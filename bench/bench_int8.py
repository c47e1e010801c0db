"""Int8Linear (CPU) against fp32 nn.Linear, torch.ao dynamic quantization
(fbgemm) and torchao's int8 configs when installed. K = N = 4096.

    make bench        # or: pytest bench/bench_int8.py --benchmark-json=bench/results/int8_cpu.json
"""
import copy
import warnings

import pytest
import torch
from torch import nn

from peft_ext.nn import Int8Linear

K = N = 4096
MS = [1, 16, 128, 512]


def _torchao(lin, config_name):
    try:
        import torchao.quantization as tq
    except ImportError:
        return None
    model = nn.Sequential(copy.deepcopy(lin))
    tq.quantize_(model, getattr(tq, config_name)())
    return model


def _fbgemm(lin):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(nn.Sequential(copy.deepcopy(lin)), {nn.Linear}, dtype=torch.qint8)


@pytest.fixture(scope="module")
def impls():
    torch.manual_seed(0)
    lin = nn.Linear(K, N)
    found = {
        "fp32_linear": lin,
        "fbgemm_dynamic": _fbgemm(lin),
        "peft_ext_dynamic": Int8Linear.from_linear(lin, mode="dynamic"),
        "peft_ext_weight_only": Int8Linear.from_linear(lin, mode="weight_only"),
        "torchao_int8_dynamic": _torchao(lin, "Int8DynamicActivationInt8WeightConfig"),
        "torchao_int8_weight_only": _torchao(lin, "Int8WeightOnlyConfig"),
    }
    return {k: v for k, v in found.items() if v is not None}


IMPLS = ["fp32_linear", "fbgemm_dynamic", "peft_ext_dynamic", "peft_ext_weight_only",
         "torchao_int8_dynamic", "torchao_int8_weight_only"]


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("impl", IMPLS)
def test_linear(benchmark, impls, impl, m):
    if impl not in impls:
        pytest.skip(f"{impl} is not installed")
    module = impls[impl]
    x = torch.randn(m, K)
    slow = impl.startswith("torchao") and m >= 128
    benchmark.group = f"int8 cpu M={m}"
    with torch.inference_mode():
        # Accuracy next to speed: SQNR of this output against float64.
        lin = impls["fp32_linear"]
        exact = x.double() @ lin.weight.double().t() + lin.bias.double()
        noise = (module(x).double() - exact).pow(2).sum()
        benchmark.extra_info["sqnr_db"] = round(float(10 * torch.log10(exact.pow(2).sum() / noise)), 2)
        benchmark.pedantic(module, args=(x,), warmup_rounds=1 if slow else 3,
                           rounds=3 if slow else (10 if m >= 128 else 50))
