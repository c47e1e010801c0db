"""What every benchmark shares: quick mode, machine facts, CUDA-event timing,
cache regimes, roofline measurements and accuracy.

Benchmarks stay pytest-benchmark functions. Each sets
    benchmark.group = "<concept>"
    benchmark.extra_info.update(op=..., impl=..., shape=..., dtype=..., M=..., device=...,
                                baseline=<impl it is compared against>, accuracy=<dB or None>)
and bench/summarize.py turns the JSON into rows. Optional extra_info fields:
calls (the timed target runs this many calls; the median is divided by it) and
bound_s (the roofline floor of one call, for the fraction-of-bound column).
"""
import datetime
import math
import os
import platform
import statistics
import subprocess
import time
import warnings

import pytest
import torch

# Small shapes and few rounds: a smoke run that checks the harness, not the figures.
QUICK = os.environ.get("PEFT_EXT_BENCH_QUICK", "") not in ("", "0")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "amx_int8")


def has_cuda_kernels() -> bool:
    if not torch.cuda.is_available():
        return False
    from peft_ext import ops

    return ops.build_info().get("cuda") == "1"


HAS_CUDA = has_cuda_kernels()
# CUDA benchmarks carry this and pytest.mark.cuda (what gpu_check.sh selects with -m cuda).
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and the extension built with CUDA")


def _cpuinfo():
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, flags


def l3_bytes() -> int:
    """Size of the last-level (L3) cache from /sys, then lscpu; 32 MiB if neither says."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for index in sorted(os.listdir(base)):
            path = os.path.join(base, index)
            if not index.startswith("index"):
                continue
            with open(os.path.join(path, "level")) as f:
                if f.read().strip() != "3":
                    continue
            with open(os.path.join(path, "size")) as f:
                return _parse_size(f.read().strip())
    except (OSError, ValueError):
        pass
    try:
        out = subprocess.run(["lscpu", "-B"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("L3 cache:"):
                return int(line.split(":")[1].split()[0])
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        pass
    return 32 << 20


def _parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.upper().rstrip("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def machine_info() -> dict:
    """The facts every result file carries, collected in this one place."""
    from peft_ext import ops

    model, flags = _cpuinfo()
    build = ops.build_info()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    info = {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "isa_flags": {f: f in flags for f in ISA_FLAGS},
        "peft_ext_cpu_isa": build.get("cpu_isa"),
        "peft_ext_cpu_isa_detected": build.get("cpu_isa_detected"),
        "peft_ext_build": build,
        "l3_bytes": l3_bytes(),
        "gpu": gpu,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": QUICK,
    }
    if gpu is not None:
        props = torch.cuda.get_device_properties(0)
        info["gpu_sms"] = props.multi_processor_count
        info["gpu_l2_bytes"] = props.L2_cache_size
    info.update(ROOFLINE)
    return info


# Roofline figures measured during the session (see roofline_cpu/roofline_cuda);
# conftest.py copies them into the machine info of the JSON.
ROOFLINE = {}


# ---------------------------------------------------------------------------
# Timing


class CudaEventTimer:
    """A pytest-benchmark timer that reads the GPU clock: each call records an
    event on the current stream, waits for it and returns seconds since the
    first event, so the difference of two calls is the GPU time between them."""

    __name__ = "cuda_event_timer"  # how pytest-benchmark names the timer in its JSON

    def __init__(self):
        self.origin = torch.cuda.Event(enable_timing=True)
        self.origin.record()
        self.origin.synchronize()

    def __call__(self):
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        e.synchronize()
        return self.origin.elapsed_time(e) / 1e3


def cuda_pedantic(benchmark, target, rounds, warmup_rounds=2):
    """benchmark.pedantic timed with CUDA events instead of the host clock."""
    benchmark._timer = CudaEventTimer()  # pytest-benchmark binds its timer per runner
    torch.cuda.synchronize()
    return benchmark.pedantic(target, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)


def cuda_graph(fn, calls):
    """A callable replaying fn(0..calls-1), captured in one CUDA graph (no Python or
    launch overhead in the figure); eager launches if capture fails. Returns (run, mode)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(min(calls, 3)):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            outs = [fn(i) for i in range(calls)]

        def run():
            graph.replay()

        run.keep = (graph, outs)  # the graph's outputs must outlive the replays
        return run, "graph"
    except RuntimeError:
        torch.cuda.synchronize()

        def run():
            for i in range(calls):
                fn(i)

        return run, "eager"


def cuda_seconds(fn, reps=5):
    """Median GPU seconds of fn() between CUDA events after a warm-up (for calibrations)."""
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


def cpu_seconds(fn, reps=5, min_time=0.05):
    """Median host seconds of fn() after a warm-up, repeating each sample to min_time."""
    fn()
    t0 = time.perf_counter()
    fn()
    inner = max(1, math.ceil(min_time / max(time.perf_counter() - t0, 1e-9)))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


class Rotation:
    """Calls the next of several copies each time: with copies whose total is above
    twice the last-level cache, every call reads its weights from memory."""

    def __init__(self, copies):
        self.copies, self.i = list(copies), 0

    def __call__(self, *args):
        fn = self.copies[self.i]
        self.i = (self.i + 1) % len(self.copies)
        return fn(*args)


def paired_ratio(baseline_fn, fn, *args, pairs: int = 20, warmup: int = 2) -> float:
    """median(baseline time) / median(fn time) over calls that alternate between the two
    (CPU, wall clock), which one goes first swapping every pair (baseline, fn, fn,
    baseline, ...) so that neither always follows the other. On a machine whose speed
    drifts (other tenants, clocks), two separately timed tests can land in different
    phases; alternating puts both in the same one, so this ratio is the one to trust when
    the two disagree."""
    for _ in range(warmup):
        baseline_fn(*args)
        fn(*args)
    fns, times = (baseline_fn, fn), ([], [])
    for i in range(pairs):
        for j in (0, 1) if i % 2 == 0 else (1, 0):
            t0 = time.perf_counter()
            fns[j](*args)
            times[j].append(time.perf_counter() - t0)
    return statistics.median(times[0]) / statistics.median(times[1])


def cold_copies(weight_bytes: int, cache_bytes: int) -> int:
    """How many copies of a weight of weight_bytes exceed twice cache_bytes in total."""
    n = max(2, 2 * cache_bytes // max(weight_bytes, 1) + 1)
    return min(n, 4) if QUICK else n


# ---------------------------------------------------------------------------
# Roofline: measured, not quoted from a data sheet


def roofline_cpu() -> dict:
    """Read bandwidth (sum or amax over a buffer 4x the L3) and the best int8 and fp32
    multiply-add rates on cache-resident operands, at the benchmark's thread count.

    The int8 figure is the best of torch's int8 GEMMs (fbgemm's quantized linear,
    torch._int_mm where the CPU build has it) and ours: a measured, achievable peak,
    not the ISA's theoretical one.
    """
    if "cpu_read_bytes_per_s" in ROOFLINE:
        return ROOFLINE
    n = (4 * l3_bytes()) // 4
    if QUICK:
        n = min(n, 16 << 20)
    bw = _read_bandwidth_cpu(n)
    m, k, nn_ = (64, 256, 256) if QUICK else (256, 1024, 1024)
    flops = 2 * m * k * nn_
    a, b = torch.randn(m, k), torch.randn(nn_, k)
    fp32 = flops / cpu_seconds(lambda: torch.nn.functional.linear(a, b))
    int8 = {}
    from peft_ext import ops

    q, s = ops.quantize_weight(b)
    int8["peft_ext_dynamic"] = flops / cpu_seconds(lambda: ops.int8_linear(a, q, s))
    try:
        from torch.ao.nn.quantized.dynamic import Linear as QLinear

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's quantized tensors are deprecated; still the peer
            ql = QLinear(k, nn_)
        int8["fbgemm_dynamic"] = flops / cpu_seconds(lambda: ql(a))
    except (ImportError, RuntimeError):
        pass
    try:
        qa = torch.randint(-127, 128, (m, k), dtype=torch.int8)
        qb = torch.randint(-127, 128, (k, nn_), dtype=torch.int8)
        torch._int_mm(qa, qb)
        int8["torch_int_mm"] = flops / cpu_seconds(lambda: torch._int_mm(qa, qb))
    except (RuntimeError, AttributeError):
        pass
    best = max(int8, key=int8.get)
    ROOFLINE.update(cpu_read_bytes_per_s=bw, cpu_fp32_flops=fp32, cpu_int8_ops=int8[best],
                    cpu_int8_ops_from=best, cpu_int8_ops_all=int8,
                    cpu_roofline_gemm=[m, k, nn_])
    return ROOFLINE


def roofline_cuda() -> dict:
    """Device copy bandwidth (read + write) and the bf16 and int8 matmul peaks."""
    if "cuda_copy_bytes_per_s" in ROOFLINE:
        return ROOFLINE
    s = 2048 if QUICK else 8192
    bw = _copy_bandwidth_cuda((256 << 20) if QUICK else (1 << 30))
    bf16 = 2 * s**3 / _matmul_seconds_cuda(s, torch.bfloat16)
    int8 = 2 * s**3 / _matmul_seconds_cuda(s, torch.int8)
    torch.cuda.empty_cache()
    ROOFLINE.update(cuda_copy_bytes_per_s=bw, cuda_bf16_flops=bf16, cuda_int8_ops=int8)
    return ROOFLINE


def _read_bandwidth_cpu(n):
    """The faster of two pure reads (sum, amax) over n floats: on a Zen 4 sum alone
    measured 27-32 GB/s where amax and fbgemm's M = 1 int8 kernel read at 32-38, which
    put rows above 100 % of their bound."""
    buf = torch.ones(n, dtype=torch.float32)
    return n * 4 / min(cpu_seconds(lambda: buf.sum(), reps=5), cpu_seconds(lambda: buf.amax(), reps=5))


def _copy_bandwidth_cuda(n):
    """Read plus write bytes per second of a device-to-device copy."""
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * n / cuda_seconds(lambda: dst.copy_(src))


def _matmul_seconds_cuda(s, dtype):
    if dtype == torch.int8:
        a = torch.randint(-127, 128, (s, s), device="cuda", dtype=torch.int8)
        b = torch.randint(-127, 128, (s, s), device="cuda", dtype=torch.int8).t()
        return cuda_seconds(lambda: torch._int_mm(a, b))
    a = torch.randn(s, s, device="cuda", dtype=dtype)
    return cuda_seconds(lambda: a @ a)


def bound_seconds(bytes_read: float, ops: float, bytes_per_s: float, ops_per_s: float):
    """Roofline floor of one call and which side binds it."""
    mem, comp = bytes_read / bytes_per_s, ops / ops_per_s
    return (mem, "memory") if mem >= comp else (comp, "compute")


# ---------------------------------------------------------------------------
# Accuracy


def sqnr_db(exact: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-noise ratio of out against exact (float64), in dB; inf if equal."""
    exact = exact.double()
    noise = (out.double() - exact).pow(2).sum()
    if noise == 0:
        return math.inf
    return round(float(10 * torch.log10(exact.pow(2).sum() / noise)), 2)
