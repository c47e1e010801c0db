"""DDP step time and bytes communicated per step, 2 CPU processes (gloo).

    python bench/bench_ddp.py [--steps 20] [--out bench/results/raw/ddp.json]
    python bench/summarize.py bench/results/raw/ddp.json     # -> bench/results/ddp_cpu.{json,md}

A torchrun-driven script, not a pytest-benchmark module: pytest-benchmark
times a callable inside one process and cannot time a step that spans two.
The script launches itself under `python -m torch.distributed.run
--nproc-per-node 2` and writes the same document shape pytest-benchmark
writes (benchmarks[].group/name/stats/extra_info, machine_info), so
bench/summarize.py turns it into rows like every other concept.

Cases (same model shape, same batch on every case): an MLP 1024-2048-2048-1024
plus a float 1024->16 head, per-rank batch 64, SGD.
  fp32 + DDP default             every weight trains: gradients all-reduced
  int8 + DDP default             patch(): int8 base frozen, biases + head train;
                                 DDP re-broadcasts every buffer before each forward
  int8 + peft_ext.prepare_ddp    the same, frozen buffers checked once, never broadcast
Step time: each step starts after a barrier; a step's time is the slowest
rank's (all-reduce MAX of the wall time of forward + backward + optimizer
step); median over the measured steps after warm-up. Bytes: counted on the DDP
instance (peft_ext.distributed.CommCounter): buffer payload handed to
DDP's broadcast, and gradient bucket payload handed to the all-reduce.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

GROUP = "ddp"
SHAPE = [1024, 2048, 2048, 1024]
BATCH = 64
WARMUP = 3


def build(seed=0):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(SHAPE, SHAPE[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(SHAPE[-1], 16))


def _case(name):
    import peft_ext  # noqa: PLC0415  (bench script: only the worker needs the package)
    from peft_ext import distributed as pdist  # noqa: PLC0415

    model = build()
    if name == "fp32":
        return nn.parallel.DistributedDataParallel(model), pdist
    head = str(len(model) - 1)
    peft_ext.patch(model, "int8", exclude_modules=(head,))
    if name == "int8_default":
        return nn.parallel.DistributedDataParallel(model), pdist
    return pdist.prepare_ddp(model), pdist


def _measure(name, steps):
    ddp, pdist = _case(name)
    counter = pdist.count_communication(ddp)
    opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(dist.get_rank())
    x, y = torch.randn(BATCH, SHAPE[0], generator=g), torch.randint(0, 16, (BATCH,), generator=g)
    times = []
    for i in range(WARMUP + steps):
        if i == WARMUP:
            counter.reset()
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if i >= WARMUP:
            times.append(t.item())
    module = ddp.module
    return dict(times=times, broadcast_bytes_per_step=counter.broadcast_bytes / steps,
                allreduce_bytes_per_step=counter.allreduce_bytes / steps,
                trainable_params=sum(p.numel() for p in module.parameters() if p.requires_grad),
                buffer_bytes=sum(b.numel() * b.element_size() for b in module.buffers()))


def worker(out, steps):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    try:
        results = {name: _measure(name, steps) for name in ("fp32", "int8_default", "int8_prepare_ddp")}
        if dist.get_rank() == 0:
            Path(out).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


IMPL = {"fp32": ("torch DDP", "fp32 model", None),
        "int8_default": ("torch DDP (buffers broadcast per forward)", "int8 model", "torch DDP"),
        "int8_prepare_ddp": ("peft_ext.prepare_ddp", "int8 model", "torch DDP (buffers broadcast per forward)")}


def _stats(data):
    q = statistics.quantiles(data, n=4) if len(data) > 1 else [data[0]] * 3
    return dict(median=statistics.median(data), iqr=q[2] - q[0], mean=statistics.fmean(data), min=min(data),
                max=max(data), rounds=len(data), data=data)


def document(results, machine):
    benchmarks = []
    for name, r in results.items():
        impl, model, baseline = IMPL[name]
        benchmarks.append(dict(
            group=GROUP, name=f"ddp_step[{name}]", fullname=f"bench/bench_ddp.py::ddp_step[{name}]",
            stats=_stats(r["times"]),
            extra_info=dict(op=f"DDP train step, {model}", impl=impl, shape=f"{SHAPE}+head16", dtype="float32",
                            M=BATCH, device="cpu", regime="2 processes gloo, 1 thread each", baseline=baseline,
                            accuracy=None, broadcast_bytes_per_step=r["broadcast_bytes_per_step"],
                            allreduce_bytes_per_step=r["allreduce_bytes_per_step"],
                            bytes_per_step=r["broadcast_bytes_per_step"] + r["allreduce_bytes_per_step"],
                            trainable_params=r["trainable_params"], buffer_bytes=r["buffer_bytes"])))
    return dict(machine_info=dict(peft_ext=machine), benchmarks=benchmarks)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "raw" / "ddp.json"))
    parser.add_argument("--worker", metavar="RESULTS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps)
        return
    import harness  # noqa: PLC0415

    torch.set_num_threads(1)  # the machine facts then name the workers' thread count
    tmp = Path(args.out).with_suffix(".ranks.json")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts",
                    "0", "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), __file__,
                    "--steps", str(args.steps), "--worker", str(tmp)], env=env, check=True, timeout=900)
    results = json.loads(tmp.read_text())
    tmp.unlink()
    Path(args.out).write_text(json.dumps(document(results, harness.machine_info()), indent=1))
    for name, r in results.items():
        print(f"{name:18s} step median {1e3 * statistics.median(r['times']):8.2f} ms  "
              f"broadcast {r['broadcast_bytes_per_step']:>10.0f} B/step  "
              f"all-reduce {r['allreduce_bytes_per_step']:>10.0f} B/step  trainable {r['trainable_params']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
