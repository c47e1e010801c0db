"""GPU benchmark of the CUDA sparse linear ops against their peers, in one run.

    python3 bench/bench_sparse_cuda.py [--out DIR] [--quick]

Shapes: K=N=4096 and K=4096, N=14336, M in {1, 16, 128, 2048, 4096, 8192},
bf16 activations, no bias. Methods:
  bf16        F.linear(x, W), W dense bf16 (cuBLAS)
  semi        F.linear(x, to_sparse_semi_structured(W)) with W pruned 2:4
              (torch's cuSPARSELt / CUTLASS path; "-" where it refuses the shape)
  ours_24     peft_ext sparse24_linear (mma.sp kernel), same 2:4 weight
  ours_bsr90  peft_ext bsr_linear, 16x16 blocks, 90% of the blocks pruned

Timing as in bench_int8_cuda.py: calls captured into one CUDA graph, replayed
between CUDA events after warm-up, median of the samples; the calls rotate
over enough weight copies to exceed L2. Floors: bytes over the measured copy
bandwidth and useful operations (the products with kept weights) over the
measured dense bf16 peak. Accuracy: relative error against a float64 product
at M = 128.

Writes DIR/bench_sparse_cuda.json (default bench/results/) with the GPU, torch
version, git commit and date; its "table" field is the short table printed last.
"""
import argparse
import datetime
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench_int8_cuda import copy_bandwidth, git_commit, peak, time_graph  # noqa: E402
from peft_ext import formats, ops, reference as ref  # noqa: E402
from peft_ext.ops import sparse as sparse_ops  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336)]
MS = [1, 16, 128, 2048, 4096, 8192]
METHODS = ["bf16", "semi", "ours_24", "ours_bsr90"]
BLOCK = (16, 16)
BLOCK_SPARSITY = 0.9


def weights_for(k, n, g):
    """Dense bf16 W, its 2:4-pruned forms and a 90% block-sparse BSR form."""
    w = torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16)
    keep = torch.rand(n, k // 4, 4, device="cuda", generator=g).argsort(dim=2)[..., :2]
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool, device="cuda").scatter_(2, keep, True).view(n, k)
    values, indices = formats.compress_24(w, mask)
    w24 = w * mask
    try:
        semi = torch.sparse.to_sparse_semi_structured(w24)
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        print(f"to_sparse_semi_structured unavailable: {exc}", flush=True)
        semi = None
    rows, cols = n // BLOCK[0], k // BLOCK[1]
    kept = torch.rand(rows, cols, device="cuda", generator=g) >= BLOCK_SPARSITY
    bmask = kept.repeat_interleave(BLOCK[0], 0).repeat_interleave(BLOCK[1], 1)
    crow, col, bvals = formats.compress_bsr(w, bmask, BLOCK)
    return {"bf16": w, "w24": w24, "values": values, "indices": indices, "semi": semi,
            "bsr": (crow, col, bvals), "bsr_density": float(kept.float().mean())}


def copy_of(w):
    """An independent copy of every format (rotated through so that L2 cannot hold them)."""
    semi = torch.sparse.to_sparse_semi_structured(w["w24"].clone()) if w["semi"] is not None else None
    return {"bf16": w["bf16"].clone(), "w24": w["w24"], "values": w["values"].clone(),
            "indices": w["indices"].clone(), "semi": semi, "bsr": tuple(t.clone() for t in w["bsr"]),
            "bsr_density": w["bsr_density"]}


def make_method(name, x, weights, k):
    c = len(weights)
    if name == "bf16":
        return lambda i: F.linear(x, weights[i % c]["bf16"])
    if name == "semi":
        if weights[0]["semi"] is None:
            return None
        fn = lambda i: F.linear(x, weights[i % c]["semi"])  # noqa: E731
        try:
            fn(0)
        except (RuntimeError, ValueError, NotImplementedError):
            return None
        return fn
    if name == "ours_24":
        return lambda i: sparse_ops.sparse24_linear(x, weights[i % c]["values"], weights[i % c]["indices"])
    return lambda i: sparse_ops.bsr_linear(x, *weights[i % c]["bsr"], k)


def bytes_moved(name, m, k, n, density):
    weight = {"bf16": n * k * 2, "semi": n * k * 2 // 2 + n * k // 8, "ours_24": n * k + n * k // 8,
              "ours_bsr90": int(density * n * k * 2)}[name]
    return weight + m * k * 2 + m * n * 2


def useful_flops(name, m, k, n, density):
    frac = {"bf16": 1.0, "semi": 0.5, "ours_24": 0.5, "ours_bsr90": density}[name]
    return 2 * m * n * k * frac


def check_accuracy(w, k):
    x = torch.randn(128, w["bf16"].shape[1], device="cuda", dtype=torch.bfloat16)
    exact24 = x.double() @ w["w24"].double().t()
    y24 = sparse_ops.sparse24_linear(x, w["values"], w["indices"])
    exactb = x.double() @ ref.decompress_bsr(*w["bsr"], k).double().t()
    yb = sparse_ops.bsr_linear(x, *w["bsr"], k)
    err = {"ours_24": float((y24.double() - exact24).norm() / exact24.norm()),
           "ours_bsr90": float((yb.double() - exactb).norm() / exactb.norm())}
    if w["semi"] is not None:
        try:
            ys = F.linear(x, w["semi"])
            err["semi"] = float((ys.double() - exact24).norm() / exact24.norm())
        except (RuntimeError, ValueError, NotImplementedError):
            pass
    return err


def run(quick=False):
    samples = 5 if quick else 15
    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth(samples)
    peak_bf16 = peak("bf16", samples)
    results = []
    for k, n in SHAPES[:1] if quick else SHAPES:
        g = torch.Generator(device="cuda").manual_seed(k + n)
        first = weights_for(k, n, g)
        copies = max(2, math.ceil(3 * props.L2_cache_size / (n * k * 2)))
        weights = [first] + [copy_of(first) for _ in range(copies - 1)]
        density = first["bsr_density"]
        accuracy = check_accuracy(first, k)
        for m in ([1, 128, 2048] if quick else MS):
            x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
            row = {"M": m, "K": k, "N": n, "bsr_density": density, "rel_err_vs_fp64_M128": accuracy}
            for name in METHODS:
                fn = make_method(name, x, weights, k)
                if fn is None:
                    row[name] = None
                    continue
                torch.cuda.synchronize()
                t1, _, _ = time_graph(fn, 1, 3, warmup=1)
                calls = max(1, min(copies * 4, math.ceil(2e-3 / max(t1, 1e-7))))
                calls = max(calls, copies) if m <= 16 else calls
                t, spread, mode = time_graph(fn, calls, samples)
                flops = useful_flops(name, m, k, n, density)
                floor = max(bytes_moved(name, m, k, n, density) / bw, flops / peak_bf16)
                row[name] = {"us": t * 1e6, "spread_us": spread * 1e6, "timing": mode,
                             "dense_equiv_tflops": 2 * m * n * k / t / 1e12, "floor_us": floor * 1e6}
            base = row["bf16"]["us"]
            for name in METHODS[1:]:
                if row[name] is not None:
                    row[name]["speedup_vs_bf16"] = base / row[name]["us"]
            if row["semi"] is not None:
                row["ours_24"]["speedup_vs_semi"] = row["semi"]["us"] / row["ours_24"]["us"]
            results.append(row)
            print(format_row(row), flush=True)
        del weights, first
        torch.cuda.empty_cache()
    return {
        "benchmark": "sparse_cuda",
        "gpu": torch.cuda.get_device_name(0),
        "sms": props.multi_processor_count,
        "l2_bytes": props.L2_cache_size,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "build_info": ops.build_info(),
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_bandwidth_GBps": bw / 1e9,
        "peak_bf16_tflops": peak_bf16 / 1e12,
        "block": BLOCK,
        "samples": samples,
        "results": results,
    }


HEADER = (f"{'K':>5} {'N':>6} {'M':>5} | {'bf16 us':>9} {'semi us':>9} {'2:4 us':>9} {'bsr90 us':>9} | "
          f"{'2:4/bf16':>8} {'2:4/semi':>8} {'bsr/bf16':>8} | {'2:4 floor':>9}")


def format_row(r):
    def us(name):
        return f"{r[name]['us']:9.1f}" if r[name] else f"{'-':>9}"

    def sp(name, key):
        return f"{r[name][key]:7.2f}x" if r[name] and key in r[name] else f"{'-':>8}"

    return (f"{r['K']:>5} {r['N']:>6} {r['M']:>5} | {us('bf16')} {us('semi')} {us('ours_24')} {us('ours_bsr90')} | "
            f"{sp('ours_24', 'speedup_vs_bf16')} {sp('ours_24', 'speedup_vs_semi')} "
            f"{sp('ours_bsr90', 'speedup_vs_bf16')} | {r['ours_24']['floor_us']:9.1f}")


def table(report):
    lines = [f"sparse CUDA: {report['gpu']}, torch {report['torch']}, copy {report['copy_bandwidth_GBps']:.0f} GB/s, "
             f"bf16 {report['peak_bf16_tflops']:.0f} TFLOP/s, BSR {report['block'][0]}x{report['block'][1]} at 90%",
             HEADER]
    lines += [format_row(r) for r in report["results"]]
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "bench", "results"))
    parser.add_argument("--quick", action="store_true", help="one shape, three M, fewer samples (a smoke run)")
    args = parser.parse_args()
    if not torch.cuda.is_available() or ops.build_info().get("cuda") != "1":
        sys.exit("bench_sparse_cuda needs a CUDA GPU and the extension built with CUDA")
    print(HEADER, flush=True)
    with torch.inference_mode():
        report = run(args.quick)
    report["table"] = table(report)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_sparse_cuda.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {path}")
    print("\n".join(report["table"]))


if __name__ == "__main__":
    main()
