"""Prefetcher and weight streaming benchmarks (pytest-benchmark).

    pytest -q bench/bench_prefetch.py --benchmark-only

CPU: producing a batch costs L ms and a step C ms of real single-threaded
torch work (both release the GIL). Step time with the Prefetcher against the
plain loop and torch DataLoader (num_workers=0 and 1); overlap efficiency
max(L, C) / step (target >= 0.95) and per-batch overhead with L = C = 0
(target < 50 us). GPU (skipped without one): host-to-device GB/s against a
plain pinned copy_, overlap with synthetic compute, and weight streaming of a
model twice the resident budget against the PCIe-bound ideal.
A summary goes to bench/results/prefetch_<date>.json (machine, torch, commit).
"""
import datetime
import json
import os
import platform
import statistics
import subprocess
import time

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

import peft_ext
from peft_ext import Prefetcher

RESULTS = {}
BATCHES = int(os.environ.get("BENCH_PREFETCH_BATCHES", "30"))
ROUNDS = int(os.environ.get("BENCH_PREFETCH_ROUNDS", "3"))
HAS_CUDA = torch.cuda.is_available() and peft_ext.ops.build_info().get("cuda") == "1"


def _git_commit():
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True,
                                       cwd=os.path.dirname(__file__)).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@pytest.fixture(scope="module", autouse=True)
def save_results():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # L and C are single-threaded work, side by side on 2 cores
    yield
    torch.set_num_threads(prev)
    out = {
        "machine": {"node": platform.node(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(),
                    "gpu": torch.cuda.get_device_name() if HAS_CUDA else None},
        "torch": torch.__version__, "commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "batches": BATCHES, "rounds": ROUNDS, "results": RESULTS,
    }
    folder = os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(folder, exist_ok=True)
    name = f"prefetch_{datetime.date.today().isoformat()}.json"
    with open(os.path.join(folder, name), "w") as f:
        json.dump(out, f, indent=2)


class Work:
    """Spends about `ms` milliseconds in single-threaded torch matmuls."""

    def __init__(self):
        self.a = torch.randn(128, 128)
        self.out = torch.empty(128, 128)
        for _ in range(50):
            torch.mm(self.a, self.a, out=self.out)
        t0 = time.perf_counter()
        for _ in range(400):
            torch.mm(self.a, self.a, out=self.out)
        self.op_s = (time.perf_counter() - t0) / 400

    def __call__(self, ms):
        for _ in range(round(ms / 1e3 / self.op_s)):
            torch.mm(self.a, self.a, out=self.out)


WORK = None


def work(ms):
    global WORK
    if WORK is None:
        WORK = Work()
    if ms > 0:
        WORK(ms)


def source(n, produce_ms, numel=16384):
    for i in range(n):
        work(produce_ms)
        yield {"x": torch.full((numel,), float(i)), "i": i}


class Source(IterableDataset):
    def __init__(self, n, produce_ms):
        self.n, self.produce_ms = n, produce_ms

    def __iter__(self):
        torch.set_num_threads(1)
        return source(self.n, self.produce_ms)


def loop(kind, n, produce_ms, step_ms):
    if kind == "plain":
        it = source(n, produce_ms)
    elif kind == "prefetch":
        it = Prefetcher(source(n, produce_ms), device="cpu", pin_memory=False)
    else:
        it = DataLoader(Source(n, produce_ms), batch_size=None, num_workers=int(kind[-1]))
    count = 0
    for batch in it:
        work(step_ms)
        count += int(batch["i"] >= 0)
    assert count == n


def record(benchmark, key, n, **extra):
    per_batch = statistics.median(benchmark.stats.stats.data) / n
    RESULTS[key] = {"step_s": per_batch, **extra}
    benchmark.extra_info.update(RESULTS[key])
    return per_batch


KINDS = ["plain", "prefetch", "dataloader_workers=0", "dataloader_workers=1"]


@pytest.mark.parametrize("produce_ms,step_ms", [(4, 4), (2, 6), (6, 2)])
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_overlap(benchmark, kind, produce_ms, step_ms):
    benchmark.group = f"cpu L={produce_ms}ms C={step_ms}ms"
    benchmark.pedantic(loop, args=(kind, BATCHES, produce_ms, step_ms), rounds=ROUNDS,
                       iterations=1, warmup_rounds=1)
    step = record(benchmark, f"cpu L={produce_ms} C={step_ms} {kind}", BATCHES)
    RESULTS[f"cpu L={produce_ms} C={step_ms} {kind}"]["overlap_efficiency"] = (
        max(produce_ms, step_ms) / 1e3 / step)


@pytest.mark.parametrize("kind", ["plain", "prefetch"])
def test_cpu_per_batch_overhead(benchmark, kind):
    benchmark.group = "cpu overhead L=C=0"
    n = 20 * BATCHES
    benchmark.pedantic(loop, args=(kind, n, 0, 0), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    record(benchmark, f"overhead {kind}", n)
    if "overhead plain" in RESULTS and "overhead prefetch" in RESULTS:
        RESULTS["overhead_per_batch_us"] = 1e6 * (RESULTS["overhead prefetch"]["step_s"] -
                                                  RESULTS["overhead plain"]["step_s"])


requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and the CUDA kernels")


def _cuda_time(fn, reps=5):
    """Median seconds of fn() timed with CUDA events after a warm-up."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _pinned_bandwidth(nbytes):
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    return nbytes / _cuda_time(lambda: dev.copy_(host, non_blocking=True))


@requires_cuda
@pytest.mark.parametrize("pinned_source", [False, True])
def test_gpu_h2d_bandwidth(benchmark, pinned_source):
    nbytes, n = 64 << 20, 16
    batches = [torch.randint(0, 255, (nbytes,), dtype=torch.uint8) for _ in range(n)]
    if pinned_source:
        batches = [torch.classes.peft_ext.PrefetchRing.pin(b) for b in batches]
    ideal = _pinned_bandwidth(nbytes)

    def run():
        for b in Prefetcher(batches, device="cuda"):
            pass
        torch.cuda.synchronize()

    benchmark.group = "gpu h2d"
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    gbps = nbytes * n / statistics.median(benchmark.stats.stats.data)
    RESULTS[f"gpu h2d pinned_source={pinned_source}"] = {
        "prefetch_gbps": gbps / 1e9, "plain_pinned_copy_gbps": ideal / 1e9, "ratio": gbps / ideal}


@requires_cuda
def test_gpu_overlap(benchmark):
    nbytes, n = 32 << 20, 20
    copy_s = nbytes / _pinned_bandwidth(nbytes)
    # Calibrate a spin kernel to take as long as one copy.
    cycles = 1_000_000
    per_cycle = _cuda_time(lambda: torch.cuda._sleep(cycles)) / cycles
    spin = int(copy_s / per_cycle)
    batches = [torch.classes.peft_ext.PrefetchRing.pin(torch.ones(nbytes, dtype=torch.uint8))
               for _ in range(n)]

    def run():
        for b in Prefetcher(batches, device="cuda"):
            torch.cuda._sleep(spin)
        torch.cuda.synchronize()

    benchmark.group = "gpu overlap"
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    step = statistics.median(benchmark.stats.stats.data) / n
    RESULTS["gpu overlap"] = {"copy_s": copy_s, "compute_s": spin * per_cycle, "step_s": step,
                              "overlap_efficiency": max(copy_s, spin * per_cycle) / step}


@requires_cuda
def test_gpu_weight_streaming(benchmark):
    torch.manual_seed(0)
    d, layers, tokens = 4096, 16, 512
    model = nn.Sequential(*[nn.Linear(d, d, bias=False) for _ in range(layers)]).to(torch.bfloat16)
    model.requires_grad_(False)
    total = sum(p.numel() * 2 for p in model.parameters())
    resident = nn.Sequential(*[nn.Linear(d, d, bias=False) for _ in range(layers)]).to(
        device="cuda", dtype=torch.bfloat16)
    x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16)
    compute_s = _cuda_time(lambda: resident(x))
    del resident
    ctl = peft_ext.offload(model, device="cuda", max_resident_bytes=total // 2)
    with torch.no_grad():
        model(x)

        def run():
            model(x)
            torch.cuda.synchronize()

        benchmark.group = "gpu weight streaming"
        benchmark.pedantic(run, rounds=ROUNDS * 3, iterations=1, warmup_rounds=2)
    forward_s = statistics.median(benchmark.stats.stats.data)
    bw = _pinned_bandwidth(d * d * 2)
    ideal_s = max(ctl.plan.streamed_bytes_per_forward / bw, compute_s)
    RESULTS["gpu weight streaming"] = {
        "tokens_per_s": tokens / forward_s, "ideal_tokens_per_s": tokens / ideal_s,
        "ratio": ideal_s / forward_s, "streamed_bytes": ctl.plan.streamed_bytes_per_forward,
        "resident_bytes": ctl.plan.resident_bytes, "depth": ctl.plan.depth, "plan": str(ctl.plan)}
    ctl.remove()
