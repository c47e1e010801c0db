"""Fixtures only; shared helpers live in helpers.py (tests import from there,
never from conftest or another test module)."""
import pytest
import torch

from helpers import ALL_ISAS, CUDA_MARKS, DETECTED_ISA, HAS_CUDA, ISAS
from peft_ext import ops


def _use_tier(name):
    if name not in ISAS:
        pytest.skip(f"CPU tier {name} not supported here (best: {DETECTED_ISA})")
    before = ops.build_info()["cpu_isa"]
    ops.set_cpu_isa(name)
    return before


@pytest.fixture(params=ALL_ISAS, ids=[f"cpu-{name}" for name in ALL_ISAS])
def isa(request):
    """Runs a CPU-only test once on every CPU kernel tier; tiers this CPU lacks
    are skipped, naming the tier (see them with pytest -rs)."""
    before = _use_tier(request.param)
    yield request.param
    ops.set_cpu_isa(before)


@pytest.fixture(params=[*ALL_ISAS, pytest.param("cuda", marks=CUDA_MARKS)],
                ids=[*(f"cpu-{name}" for name in ALL_ISAS), "cuda"])
def device(request):
    """Runs a test once on every CPU kernel tier (ids cpu-scalar, cpu-avx2, ...)
    and on the GPU (id cuda, marked `cuda`, skipped without one); yields the
    torch.device the inputs go to."""
    if request.param == "cuda":
        if not HAS_CUDA:  # the mark skips it too; this covers -p no:skipping style runs
            pytest.skip("needs a CUDA GPU and the CUDA kernels")
        yield torch.device("cuda")
        return
    before = _use_tier(request.param)
    yield torch.device("cpu")
    ops.set_cpu_isa(before)
