"""GPU benchmark of the CUDA int8 linear ops against their peers, in one run.

    python3 bench/bench_int8_cuda.py [--out DIR] [--quick]

Shapes: the LLM layers K=N=4096 and K=4096, N=14336, M in
{1, 2, 4, 8, 16, 128, 512, 2048, 4096, 8192}, bf16 activations, no bias.
Methods:
  bf16          F.linear(x, W) with W bf16 (cuBLAS)
  int_mm        torch._int_mm + rescale, the torchao dynamic-quant path: per-token
                quantization in torch ops, int8 GEMM with int32 output, rescale
                to bf16 (only where cuBLAS allows it: M > 16, K and N multiples of 8)
  ours_w8a8     peft_ext int8_linear (quantize kernel + mma.sync GEMM / dp4a GEMV)
  ours_wo       peft_ext int8_linear_weight_only (GEMV for M <= 16, else dequantize + cuBLAS)

Method: every call of a method is captured `inner` times into one CUDA graph
(no Python or launch overhead in the figure) and replayed between CUDA events
after warm-up; the median over the samples is reported. The calls rotate over
enough copies of the weight to exceed the L2 cache, so small-M figures are
memory figures, not L2 figures. Floors: bytes over the measured device copy
bandwidth and operations over the measured peak (a large bf16 matmul for the
float methods, a large torch._int_mm for the int8 ones), whichever is larger.

Writes DIR/bench_int8_cuda.json (default bench/results/) with the GPU, torch
version, git commit and date; its "table" field is the short table printed last.
"""
import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from peft_ext import ops  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336)]
MS = [1, 2, 4, 8, 16, 128, 512, 2048, 4096, 8192]
METHODS = ["bf16", "int_mm", "ours_w8a8", "ours_wo"]
# Which measured peak bounds each method's arithmetic (weight-only multiplies
# in bf16 through cuBLAS above M = 16, and is memory bound below).
PEAK_OF = {"bf16": "bf16", "int_mm": "int8", "ours_w8a8": "int8", "ours_wo": "bf16"}


def time_graph(fn, calls, samples, warmup=2):
    """Median seconds per call of fn(i) for i in range(calls), captured in one
    CUDA graph; falls back to eager launches if capture fails."""
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
        run, mode = graph.replay, "graph"
    except RuntimeError:
        graph, outs = None, None
        torch.cuda.synchronize()

        def run():
            for i in range(calls):
                fn(i)

        mode = "eager"
    for _ in range(warmup):
        run()
    times = []
    for _ in range(samples):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    del graph, outs
    return statistics.median(times), (max(times) - min(times)) / 2, mode


def copy_bandwidth(samples):
    """Device-to-device copy: bytes read plus bytes written per second."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t, _, _ = time_graph(lambda i: dst.copy_(src), 2, samples)
    del src, dst
    return 2 * n / t


def peak(kind, samples):
    n = 8192
    if kind == "bf16":
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        t, _, _ = time_graph(lambda i: a @ b, 2, samples)
    else:
        a = torch.randint(-127, 128, (n, n), device="cuda", dtype=torch.int8)
        b = torch.randint(-127, 128, (n, n), device="cuda", dtype=torch.int8).t()
        t, _, _ = time_graph(lambda i: torch._int_mm(a, b), 2, samples)
    return 2 * n**3 / t


def quantize_rows_torch(x):
    """torchao-style per-token quantization written in torch ops (the peer's input path)."""
    s = x.abs().amax(dim=1, keepdim=True).float() / 127
    q = torch.round(x.float() / s.clamp_min(1e-12)).clamp_(-127, 127).to(torch.int8)
    return q, s


def int_mm_allowed(m, k, n):
    return m > 16 and k % 8 == 0 and n % 8 == 0


def make_method(name, x, weights):
    """fn(i) for one method; weights[i % len] rotates the weight copies."""
    c = len(weights)
    if name == "bf16":
        return lambda i: F.linear(x, weights[i % c]["bf16"])
    if name == "int_mm":
        def fn(i):
            w = weights[i % c]
            q, s = quantize_rows_torch(x)
            return (torch._int_mm(q, w["q_t"]).float() * s * w["s"]).to(torch.bfloat16)
        return fn
    if name == "ours_w8a8":
        return lambda i: ops.int8_linear(x, weights[i % c]["q"], weights[i % c]["s"])
    return lambda i: ops.int8_linear_weight_only(x, weights[i % c]["q"], weights[i % c]["s"])


def bytes_moved(name, m, k, n):
    w = n * k * (2 if name == "bf16" else 1)
    return w + m * k * 2 + m * n * 2


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def check_accuracy(k, n):
    """Relative error of both modes against a float64 product (fresh inputs, M=128)."""
    x = torch.randn(128, k, device="cuda", dtype=torch.float64)
    w = torch.randn(n, k, device="cuda", dtype=torch.float64)
    exact = x @ w.t()
    q, s = ops.quantize_weight(w.float())
    xb = x.bfloat16()
    err = {}
    for name, y in [("bf16", F.linear(xb, w.bfloat16())), ("ours_w8a8", ops.int8_linear(xb, q, s)),
                    ("ours_wo", ops.int8_linear_weight_only(xb, q, s))]:
        err[name] = float((y.double() - exact).norm() / exact.norm())
    return err


def run(quick=False):
    samples = 5 if quick else 15
    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth(samples)
    peaks = {"bf16": peak("bf16", samples), "int8": peak("int8", samples)}
    results = []
    for k, n in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(k + n)
        w_bf16 = torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16)
        q, s = ops.quantize_weight(w_bf16)
        # Enough copies that a pass over them cannot stay in L2.
        copies = max(2, math.ceil(3 * props.L2_cache_size / (n * k)))
        weights = [{"bf16": w_bf16.clone(), "q": q.clone(), "s": s.clone(), "q_t": q.clone().t()}
                   for _ in range(copies)]
        accuracy = check_accuracy(k, n)
        for m in (MS[:3] + MS[-3:-2] if quick else MS):
            x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
            row = {"M": m, "K": k, "N": n, "rel_err_vs_fp64_M128": accuracy}
            for name in METHODS:
                if name == "int_mm" and not int_mm_allowed(m, k, n):
                    row[name] = None
                    continue
                fn = make_method(name, x, weights)
                torch.cuda.synchronize()
                t1, _, _ = time_graph(fn, 1, 3, warmup=1)
                calls = max(1, min(copies * 4, math.ceil(2e-3 / max(t1, 1e-7))))
                calls = max(calls, copies) if m <= 16 else calls
                t, spread, mode = time_graph(fn, calls, samples)
                flops = 2 * m * n * k
                floor = max(bytes_moved(name, m, k, n) / bw, flops / peaks[PEAK_OF[name]])
                entry = {"us": t * 1e6, "spread_us": spread * 1e6, "timing": mode,
                         "tflops": flops / t / 1e12, "floor_us": floor * 1e6}
                if name == "ours_wo" and m <= 16:
                    entry["weight_GBps"] = n * k / t / 1e9
                    entry["weight_GBps_of_copy"] = n * k / t / bw
                row[name] = entry
            base = row["bf16"]["us"]
            for name in ("int_mm", "ours_w8a8", "ours_wo"):
                if row[name] is not None:
                    row[name]["speedup_vs_bf16"] = base / row[name]["us"]
            if row["int_mm"] is not None:
                row["ours_w8a8"]["speedup_vs_int_mm"] = row["int_mm"]["us"] / row["ours_w8a8"]["us"]
            results.append(row)
            print(format_row(row), flush=True)
        del weights
        torch.cuda.empty_cache()
    return {
        "benchmark": "int8_cuda",
        "gpu": torch.cuda.get_device_name(0),
        "sms": props.multi_processor_count,
        "l2_bytes": props.L2_cache_size,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "build_info": ops.build_info(),
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_bandwidth_GBps": bw / 1e9,
        "peak_bf16_tflops": peaks["bf16"] / 1e12,
        "peak_int8_tops_int_mm": peaks["int8"] / 1e12,
        "samples": samples,
        "results": results,
    }


HEADER = (f"{'K':>5} {'N':>6} {'M':>5} | {'bf16 us':>9} {'int_mm us':>9} {'w8a8 us':>9} {'wo us':>9} | "
          f"{'w8a8/bf16':>9} {'w8a8/imm':>8} {'wo/bf16':>7} | {'w8a8 floor':>10} {'wo GB/s':>8}")


def format_row(r):
    def us(name):
        return f"{r[name]['us']:9.1f}" if r[name] else f"{'-':>9}"

    def sp(name, key, width):
        return f"{r[name][key]:{width}.2f}x" if r[name] and key in r[name] else f"{'-':>{width + 1}}"

    gbps = f"{r['ours_wo']['weight_GBps']:8.0f}" if "weight_GBps" in r["ours_wo"] else f"{'-':>8}"
    return (f"{r['K']:>5} {r['N']:>6} {r['M']:>5} | {us('bf16')} {us('int_mm')} {us('ours_w8a8')} {us('ours_wo')} | "
            f"{sp('ours_w8a8', 'speedup_vs_bf16', 8)} {sp('ours_w8a8', 'speedup_vs_int_mm', 7)} "
            f"{sp('ours_wo', 'speedup_vs_bf16', 6)} | {r['ours_w8a8']['floor_us']:10.1f} {gbps}")


def table(report):
    lines = [f"int8 CUDA: {report['gpu']}, torch {report['torch']}, copy {report['copy_bandwidth_GBps']:.0f} GB/s, "
             f"bf16 {report['peak_bf16_tflops']:.0f} TFLOP/s, int8 (_int_mm) {report['peak_int8_tops_int_mm']:.0f} TOP/s",
             HEADER]
    lines += [format_row(r) for r in report["results"]]
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "bench", "results"))
    parser.add_argument("--quick", action="store_true", help="fewer shapes and samples (a smoke run)")
    args = parser.parse_args()
    if not torch.cuda.is_available() or ops.build_info().get("cuda") != "1":
        sys.exit("bench_int8_cuda needs a CUDA GPU and the extension built with CUDA")
    print(HEADER, flush=True)
    with torch.inference_mode():
        report = run(args.quick)
    report["table"] = table(report)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_int8_cuda.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {path}")
    print("\n".join(report["table"]))


if __name__ == "__main__":
    main()
