"""Prefetcher and weight streaming benchmarks (pytest-benchmark).

    bench/run.sh prefetch                # or:
    pytest bench/bench_prefetch.py --benchmark-only --benchmark-json=bench/results/raw/prefetch.json
    python bench/summarize.py bench/results/raw/prefetch.json

CPU: producing a batch costs L ms and a step C ms of real single-threaded
torch work (both release the GIL). Step time per batch with the Prefetcher
against the plain loop and torch DataLoader (num_workers=0 and 1); overlap
efficiency max(L, C) / step (target >= 0.95), also against a side-by-side
reference (both works run at once in two threads, nothing handed over: what
two busy threads get from this machine), against a hand-written producer
thread with a queue.Queue, and per-batch overhead with
L = C = 0 (target < 50 us). GPU (skipped without one): host-to-device GB/s
against a plain pinned copy_, overlap with synthetic compute against the plain
loop, and weight streaming of a model twice the resident budget against the
PCIe-bound ideal. Host-driven pipelines: wall-clock timing, synchronised at the end.
"""
import os
import queue
import statistics
import threading
import time

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

import harness
from harness import QUICK

import peft_ext
from peft_ext import Prefetcher

GROUP = "prefetch"
BATCHES = int(os.environ.get("BENCH_PREFETCH_BATCHES", "5" if QUICK else "30"))
ROUNDS = int(os.environ.get("BENCH_PREFETCH_ROUNDS", "1" if QUICK else "3"))
# Per-batch medians of the plain loop, for the overhead difference.
PLAIN = {}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # L and C are single-threaded work, side by side on 2 cores
    yield
    torch.set_num_threads(prev)


def describe(benchmark, op, impl, shape, baseline, calls, device="cpu", M=None, **extra):
    benchmark.group = GROUP
    benchmark.extra_info.update(op=op, impl=impl, shape=shape, dtype=None, M=M, device=device,
                                baseline=baseline, accuracy=None, calls=calls, **extra)


def per_call(benchmark, calls):
    return statistics.median(benchmark.stats.stats.data) / calls


# The seconds of one 128 x 128 matmul on one thread, measured once (under the
# lock: the first calls may come from two threads at once).
_OP_S = []
_OP_LOCK = threading.Lock()
# Buffers per thread: the producer and the consumer run at once, and one
# shared output buffer would bounce between the two cores' caches.
_BUFFERS = threading.local()


def work(ms):
    """Spends about `ms` milliseconds in single-threaded torch matmuls."""
    bufs = getattr(_BUFFERS, "ab", None)
    if bufs is None:
        bufs = _BUFFERS.ab = (torch.randn(128, 128), torch.empty(128, 128))
    a, out = bufs
    if not _OP_S:
        with _OP_LOCK:
            if not _OP_S:
                for _ in range(50):
                    torch.mm(a, a, out=out)
                t0 = time.perf_counter()
                for _ in range(400):
                    torch.mm(a, a, out=out)
                _OP_S.append((time.perf_counter() - t0) / 400)
    for _ in range(round(ms / 1e3 / _OP_S[0])):
        torch.mm(a, a, out=out)


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


def side_by_side(n, produce_ms, step_ms):
    """The producer's and the consumer's work at once in two threads, with no
    batch handed over: a reference for what overlap can reach here (two busy
    threads on this machine run slower than one alone: shared caches, memory,
    the VM). Not a strict bound: in a pipeline whose one side idles part of the
    time, the other side runs uncontended and can be a little faster."""
    def produce():
        torch.set_num_threads(1)
        for _ in source(n, produce_ms):
            pass

    t = threading.Thread(target=produce)
    t.start()
    for _ in range(n):
        work(step_ms)
    t.join()


def thread_queue(n, produce_ms, depth=2):
    """What people write by hand: a producer thread and a queue.Queue(depth)."""
    q = queue.Queue(maxsize=depth)

    def feed():
        torch.set_num_threads(1)
        for b in source(n, produce_ms):
            q.put(b)
        q.put(None)

    threading.Thread(target=feed, daemon=True).start()
    while (b := q.get()) is not None:
        yield b


def loop(kind, n, produce_ms, step_ms):
    if kind == "side_by_side":
        side_by_side(n, produce_ms, step_ms)
        return
    if kind == "thread_queue":
        it = thread_queue(n, produce_ms)
    elif kind == "plain_loop":
        it = source(n, produce_ms)
    elif kind == "peft_ext_prefetcher":
        it = Prefetcher(source(n, produce_ms), device="cpu", pin_memory=False)
    else:
        it = DataLoader(Source(n, produce_ms), batch_size=None, num_workers=int(kind[-1]))
    count = 0
    for batch in it:
        work(step_ms)
        count += int(batch["i"] >= 0)
    assert count == n


KINDS = ["plain_loop", "side_by_side", "peft_ext_prefetcher", "thread_queue",
         "dataloader_workers=0", "dataloader_workers=1"]


@pytest.mark.parametrize("produce_ms,step_ms", [(4, 4), (2, 6), (6, 2)])
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_overlap(benchmark, kind, produce_ms, step_ms):
    describe(benchmark, "loop", kind, f"L={produce_ms}ms C={step_ms}ms", "plain_loop", BATCHES)
    benchmark.pedantic(loop, args=(kind, BATCHES, produce_ms, step_ms), rounds=ROUNDS,
                       iterations=1, warmup_rounds=1)
    step = per_call(benchmark, BATCHES)
    benchmark.extra_info["overlap_efficiency"] = max(produce_ms, step_ms) / 1e3 / step
    if kind != "side_by_side" and kind != "plain_loop":
        # The side-by-side time over this loop's, from alternating calls: this
        # machine's speed drifts between separately timed tests.
        benchmark.extra_info["efficiency_vs_side_by_side"] = harness.paired_ratio(
            side_by_side, lambda *a: loop(kind, *a), BATCHES, produce_ms, step_ms,
            pairs=2 if QUICK else 7, warmup=1)


@pytest.mark.parametrize("kind", ["plain_loop", "peft_ext_prefetcher", "thread_queue"])
def test_cpu_per_batch_overhead(benchmark, kind):
    n = 20 * BATCHES
    describe(benchmark, "overhead", kind, "L=C=0", "plain_loop", n)
    benchmark.pedantic(loop, args=(kind, n, 0, 0), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    step = per_call(benchmark, n)
    if kind == "plain_loop":
        PLAIN["overhead"] = step
    elif "overhead" in PLAIN:
        benchmark.extra_info["overhead_per_batch_us"] = 1e6 * (step - PLAIN["overhead"])


requires_cuda = harness.requires_cuda


def _pinned_bandwidth(nbytes):
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    return nbytes / harness.cuda_seconds(lambda: dev.copy_(host, non_blocking=True))


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("impl", ["plain_pinned_copy", "peft_ext_prefetcher"])
@pytest.mark.parametrize("pinned_source", [False, True])
def test_gpu_h2d_bandwidth(benchmark, pinned_source, impl):
    nbytes, n = (8 << 20, 4) if QUICK else (64 << 20, 16)
    batches = [torch.randint(0, 255, (nbytes,), dtype=torch.uint8) for _ in range(n)]
    # The plain copy is the ideal: always from pinned memory, the baseline of both regimes.
    if pinned_source or impl == "plain_pinned_copy":
        batches = [torch.classes.peft_ext.PrefetchRing.pin(b) for b in batches]
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")

    def run():
        if impl == "plain_pinned_copy":
            for b in batches:
                dev.copy_(b, non_blocking=True)
        else:
            for b in Prefetcher(batches, device="cuda"):
                pass
        torch.cuda.synchronize()

    # Both cases are compared against the plain copy from pinned memory.
    shape = f"{nbytes >> 20}MiB x{n}"
    describe(benchmark, "h2d", impl, shape, "plain_pinned_copy", n, device="cuda",
             regime="pinned source" if pinned_source else "pageable source")
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    benchmark.extra_info["gbps"] = nbytes / per_call(benchmark, n) / 1e9
    benchmark.extra_info["plain_pinned_copy_gbps"] = _pinned_bandwidth(nbytes) / 1e9


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("impl", ["plain_loop", "peft_ext_prefetcher"])
def test_gpu_overlap(benchmark, impl):
    nbytes, n = (8 << 20, 5) if QUICK else (32 << 20, 20)
    copy_s = nbytes / _pinned_bandwidth(nbytes)
    # Calibrate a spin kernel to take as long as one copy.
    cycles = 1_000_000
    per_cycle = harness.cuda_seconds(lambda: torch.cuda._sleep(cycles)) / cycles
    spin = int(copy_s / per_cycle)
    batches = [torch.classes.peft_ext.PrefetchRing.pin(torch.ones(nbytes, dtype=torch.uint8))
               for _ in range(n)]

    def run():
        source = (b.to("cuda") for b in batches) if impl == "plain_loop" else Prefetcher(batches, device="cuda")
        for b in source:
            torch.cuda._sleep(spin)
        torch.cuda.synchronize()

    describe(benchmark, "overlap", impl, f"{nbytes >> 20}MiB x{n}", "plain_loop", n, device="cuda")
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    step = per_call(benchmark, n)
    benchmark.extra_info.update(copy_s=copy_s, compute_s=spin * per_cycle,
                                overlap_efficiency=max(copy_s, spin * per_cycle) / step)


def _resident_seconds(d, layers, x):
    """A forward of the same model held on the GPU: the compute floor of streaming."""
    resident = nn.Sequential(*[nn.Linear(d, d, bias=False) for _ in range(layers)]).to(
        device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        return harness.cuda_seconds(lambda: resident(x))


@pytest.mark.cuda
@requires_cuda
def test_gpu_weight_streaming(benchmark):
    torch.manual_seed(0)
    d, layers, tokens = (1024, 4, 128) if QUICK else (4096, 16, 512)
    model = nn.Sequential(*[nn.Linear(d, d, bias=False) for _ in range(layers)]).to(torch.bfloat16)
    model.requires_grad_(False)
    total = sum(p.numel() * 2 for p in model.parameters())
    x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16)
    compute_s = _resident_seconds(d, layers, x)
    ctl = peft_ext.offload(model, device="cuda", max_resident_bytes=total // 2)
    with torch.no_grad():
        model(x)

        def run():
            model(x)
            torch.cuda.synchronize()

        describe(benchmark, "weight_streaming", "peft_ext_offload", f"{layers}x{d}x{d}", None, 1,
                 device="cuda", M=tokens)
        benchmark.pedantic(run, rounds=ROUNDS * 3, iterations=1, warmup_rounds=2)
    forward_s = statistics.median(benchmark.stats.stats.data)
    bw = _pinned_bandwidth(d * d * 2)
    ideal_s = max(ctl.plan.streamed_bytes_per_forward / bw, compute_s)
    # The PCIe-bound ideal is the roofline floor of a forward.
    benchmark.extra_info.update(
        bound_s=ideal_s, bound="memory" if ideal_s > compute_s else "compute",
        tokens_per_s=tokens / forward_s, ideal_tokens_per_s=tokens / ideal_s,
        streamed_bytes=ctl.plan.streamed_bytes_per_forward, resident_bytes=ctl.plan.resident_bytes,
        depth=ctl.plan.depth, plan=str(ctl.plan))
    ctl.remove()
