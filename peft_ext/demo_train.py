"""`python -m peft_ext demo train`: the whole training story on real data.

On scikit-learn's handwritten digits (shipped with scikit-learn, offline):
train a teacher MLP, distill a smaller student (DistillationLoss), prune it
(2:4 and 50 % unstructured, Wanda), fine-tune with the masks held, store the
2:4 weights compressed (SparseLinear), quantize to int8 (patch), then train
the int8 model's float parts (biases, head) data-parallel on 2 processes
(DDP via prepare_ddp, then local SGD) with the Prefetcher feeding the loop
from a DistributedSampler. Every number in the table is measured in this run;
the run is seeded (one thread per process), so it repeats.
Results: bench/results/demo_train_cpu.json and .png (accuracy vs weight bytes).
"""
import copy
import json
import logging
import os
import platform
import socket
import statistics
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.model_averaging.utils import average_parameters
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from tqdm import tqdm

from . import distributed as pdist
from ._report import human_bytes, table
from .distill import DistillationLoss
from .nn import Int8Linear, SparseLinear
from .patch import patch
from .prefetch import Prefetcher
from .prune import prune

log = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
SEED = 0
TEMPERATURE, ALPHA = 4.0, 0.7
BATCH = 64
EPOCHS = dict(teacher=30, student=30, finetune=8, ddp=4, local_sgd=4)
LOCAL_SGD_PERIOD = 4


def mlp(hidden):
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def load_digits_split():
    # scikit-learn is a demo-only dependency: imported where the demo needs it.
    try:
        from sklearn.datasets import load_digits  # noqa: PLC0415
        from sklearn.model_selection import train_test_split  # noqa: PLC0415
    except ImportError as e:
        raise RuntimeError("`python -m peft_ext demo train` needs scikit-learn (its digits data ship with it): "
                           "pip install 'peft_ext[demo]' or pip install scikit-learn") from e

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=SEED, stratify=y)
    f = lambda a: torch.tensor(a / 16.0, dtype=torch.float32)  # noqa: E731  pixels are 0..16
    return (f(xtr), torch.tensor(ytr)), (f(xte), torch.tensor(yte))


def weight_bytes(model):
    """Bytes of the stored layer weights as they sit in the model (zeros of a
    masked dense layer count: they are stored)."""
    total = 0
    for m in model.modules():
        if isinstance(m, (nn.Linear, Int8Linear, SparseLinear)):
            total += sum(t.numel() * t.element_size() for t in m.parameters(recurse=False))
            total += sum(t.numel() * t.element_size() for t in m.buffers(recurse=False))
    return total


@torch.inference_mode()
def accuracy(model, test):
    model.eval()
    return (model(test[0]).argmax(1) == test[1]).float().mean().item()


@torch.inference_mode()
def inference_ms(model, test, reps=30):
    model.eval()
    x = test[0][:BATCH]
    for _ in range(5):
        model(x)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def batches(train, seed):
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(*train), batch_size=BATCH, shuffle=True, generator=g)


def fit(model, train, epochs, loss_fn, lr=3e-3, seed=SEED):
    """Adam over the trainable parameters; returns seconds per epoch (median)."""
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    times = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        for x, y in batches(train, seed + epoch):
            opt.zero_grad()
            loss_fn(model, x, y).backward()
            opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ce(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_epochs(model, step_model, opt, train, epochs, rank, world, after_epoch=None):
    """Epoch loop fed by the Prefetcher over a DistributedSampler; returns
    (seconds per epoch, Prefetcher stats per epoch)."""
    ds = TensorDataset(*train)
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=SEED)
    times, stats = [], []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        with Prefetcher(DataLoader(ds, batch_size=BATCH // world, sampler=sampler), device="cpu",
                        pin_memory=False) as feed:
            for x, y in feed:
                opt.zero_grad()
                nn.functional.cross_entropy(step_model(x), y).backward()
                opt.step()
            s = feed.stats()
        if after_epoch is not None:
            after_epoch()
        times.append(time.perf_counter() - t0)
        stats.append({k: s[k] for k in ("batches", "bytes", "consumer_wait_s", "elapsed_s", "overlap")})
    return times, stats


def _worker(rank, world, port, model_path, train, out_dir):
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out = {}
        model = torch.load(model_path, weights_only=False)
        ddp = pdist.prepare_ddp(model)
        counter = pdist.count_communication(ddp)
        opt = torch.optim.Adam([p for p in ddp.parameters() if p.requires_grad], lr=1e-3)
        times, stats = _train_epochs(model, ddp, opt, train, EPOCHS["ddp"], rank, world)
        steps = sum(s["batches"] for s in stats)
        out["ddp"] = dict(epoch_s=times, prefetch=stats, allreduce_bytes_per_step=counter.allreduce_bytes / steps,
                          broadcast_bytes_per_step=counter.broadcast_bytes / steps,
                          frozen_bytes_not_broadcast_per_step=ddp.sync_plan.frozen_bytes)
        if rank == 0:
            torch.save(model.state_dict(), os.path.join(out_dir, "ddp.pt"))

        local = torch.load(model_path, weights_only=False)
        local.load_state_dict(model.state_dict())
        ddp2 = pdist.prepare_ddp(local)
        params = [p for p in ddp2.parameters() if p.requires_grad]
        opt2 = pdist.local_sgd(ddp2, torch.optim.Adam(params, lr=1e-3), period=LOCAL_SGD_PERIOD)
        # The last step of an epoch need not be an averaging point: average at
        # each epoch end (torch's own average_parameters) so every rank holds the same model.
        times, stats = _train_epochs(local, ddp2, opt2, train, EPOCHS["local_sgd"], rank, world,
                                     after_epoch=lambda: average_parameters(iter(params), dist.group.WORLD))
        out["local_sgd"] = dict(epoch_s=times, prefetch=stats, period=LOCAL_SGD_PERIOD)
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        parts = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(parts, flat)
        out["local_sgd"]["ranks_identical"] = all(torch.equal(parts[0], p) for p in parts)
        if rank == 0:
            torch.save(local.state_dict(), os.path.join(out_dir, "local_sgd.pt"))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


def data_parallel(model, train, world=2):
    """Train `model`'s float parts on `world` processes: (DDP model, local-SGD model, per-rank facts)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.pt")
        torch.save(model, path)
        mp.start_processes(_worker, args=(world, _free_port(), path, train, tmp), nprocs=world,
                           start_method="spawn")
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
        out = []
        for name in ("ddp", "local_sgd"):
            m = copy.deepcopy(model)
            m.load_state_dict(torch.load(os.path.join(tmp, f"{name}.pt")))
            out.append(m)
    return out[0], out[1], ranks


def _row(stage, model, test, train_s=None, extra=None):
    return dict(stage=stage, accuracy=accuracy(model, test), weight_bytes=weight_bytes(model),
                inference_ms=inference_ms(model, test), train_s_per_epoch=train_s, **(extra or {}))


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _plot(rows, path):
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        log.warning("matplotlib is not installed: no plot (the JSON has the numbers)")
        return None
    fig, ax = plt.subplots(figsize=(11, 5))
    # Stages share weight sizes: number the points, name them in the legend.
    for i, r in enumerate(rows, 1):
        xy = (r["weight_bytes"] / 1024, 100 * r["accuracy"])
        ax.scatter(*xy, label=f"{i}. {r['stage']}")
        ax.annotate(str(i), xy, fontsize=8, xytext=(4, 2 + 7 * (i % 2)), textcoords="offset points")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_xscale("log")
    ax.set_xlabel("weight bytes (KiB, log)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("digits: accuracy vs weight bytes per stage (python -m peft_ext demo train)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run():
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    train, test = load_digits_split()
    rows = []
    bar = tqdm(total=11, desc="demo train", unit="stage")

    def done(row):
        rows.append(row)
        bar.set_postfix(stage=row["stage"], acc=f"{row['accuracy']:.3f}")
        bar.update(1)

    torch.manual_seed(SEED)
    teacher = mlp(256)
    s = fit(teacher, train, EPOCHS["teacher"], ce)
    done(_row("teacher MLP 64-256-256-10 fp32", teacher, test, s))
    teacher.eval()

    torch.manual_seed(SEED)
    student = mlp(64)
    s = fit(student, train, EPOCHS["student"], ce)
    done(_row("student 64-64-64-10 fp32, labels only", student, test, s))

    torch.manual_seed(SEED)
    student = mlp(64)
    kd = DistillationLoss(temperature=TEMPERATURE, alpha=ALPHA)
    log.warning("distillation: alpha=%s, T=%s (%s)", ALPHA, TEMPERATURE, kd.kind)

    def kd_loss(model, x, y):
        with torch.no_grad():
            t = teacher(x)
        return kd(model(x), t, y)

    s = fit(student, train, EPOCHS["student"], kd_loss)
    done(_row(f"student distilled (alpha={ALPHA}, T={TEMPERATURE:g})", student, test, s))

    calib = [x for x, _ in batches(train, SEED + 100)][:4]
    pruned = {}
    for pattern, label in (("2:4", "2:4"), ("unstructured", "50% unstructured")):
        m = copy.deepcopy(student)
        rep = prune(m, 0.5, pattern, score="wanda", calib_data=calib, exclude_modules=("4",))
        done(_row(f"pruned {label} Wanda", m, test))
        s = fit(m, train, EPOCHS["finetune"], ce, lr=1e-3)
        held = all(bool((dict(m.named_parameters())[f"{n}.weight"][~k] == 0).all()) for n, k in rep.masks.items())
        done(_row(f"pruned {label} + fine-tune, masks held={held}", m, test, s))
        pruned[pattern] = (m, rep)

    m24, rep24 = pruned["2:4"]
    sparse = copy.deepcopy(m24)
    for name, mask in rep24.masks.items():
        sparse[int(name)] = SparseLinear.from_linear(sparse[int(name)], pattern="2:4", mask=mask)
    done(_row("2:4 stored compressed (SparseLinear)", sparse, test))

    q = copy.deepcopy(m24)
    rep24.remove_masks()  # the int8 copy stores the zeros; the masks' hooks are not needed there
    patch(q, "int8", exclude_modules=("4",), min_params=0)
    done(_row("2:4 + int8 W8A8 (Int8Linear)", q, test))

    ddp_model, lsgd_model, ranks = data_parallel(q, train)
    epoch_s = lambda k: statistics.median(max(r[k]["epoch_s"][e] for r in ranks)  # noqa: E731
                                          for e in range(len(ranks[0][k]["epoch_s"])))
    facts = {k: {"prefetch_per_epoch_rank0": ranks[0][k]["prefetch"]} for k in ("ddp", "local_sgd")}
    facts["ddp"].update({k: ranks[0]["ddp"][k] for k in ("allreduce_bytes_per_step", "broadcast_bytes_per_step",
                                                         "frozen_bytes_not_broadcast_per_step")})
    facts["local_sgd"].update(period=LOCAL_SGD_PERIOD, ranks_identical=ranks[0]["local_sgd"]["ranks_identical"])
    done(_row("int8 float parts trained, DDP x2 (prepare_ddp)", ddp_model, test, epoch_s("ddp"), facts["ddp"]))
    done(_row(f"int8 float parts trained, local SGD x2 (avg every {LOCAL_SGD_PERIOD})", lsgd_model, test,
              epoch_s("local_sgd"), facts["local_sgd"]))
    bar.close()
    return rows


def main():
    t0 = time.perf_counter()
    rows = run()
    lines = table([("stage", "test accuracy", "weight bytes", "inference time / batch", "train time / epoch")] +
                  [(r["stage"], f"{100 * r['accuracy']:.2f} %", human_bytes(r["weight_bytes"]),
                    f"{1e3 * r['inference_ms']:.1f} us",
                    "-" if r["train_s_per_epoch"] is None else f"{1e3 * r['train_s_per_epoch']:.1f} ms")
                   for r in rows])
    print("\n".join(lines))
    for r in rows[-2:]:
        per_epoch = ", ".join(f"{e['batches']} batches overlap {e['overlap']:.3f} wait {1e3 * e['consumer_wait_s']:.2f} ms"
                              for e in r["prefetch_per_epoch_rank0"])
        print(f"Prefetcher per epoch, rank 0, {r['stage']}: {per_epoch}")
    ddp = rows[-2]
    print(f"DDP bytes per step (rank 0): gradients all-reduced {ddp['allreduce_bytes_per_step']:.0f}, buffers "
          f"broadcast {ddp['broadcast_bytes_per_step']:.0f}; frozen bytes not re-broadcast thanks to prepare_ddp "
          f"{ddp['frozen_bytes_not_broadcast_per_step']}")
    print(f"batch {BATCH} (inference: median of 30), 1 thread per process; distillation alpha={ALPHA}, "
          f"T={TEMPERATURE:g}; data-parallel rows: 2 gloo processes, epoch time = slowest rank, median epoch")
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = dict(machine=dict(cpu=_cpu_model(), torch=torch.__version__, threads_per_process=1),
               git_commit=_git_commit(), date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
               seed=SEED, batch=BATCH, epochs=EPOCHS, distillation=dict(alpha=ALPHA, temperature=TEMPERATURE),
               wall_s=time.perf_counter() - t0, rows=rows)
    (RESULTS / "demo_train_cpu.json").write_text(json.dumps(doc, indent=1))
    png = _plot(rows, RESULTS / "demo_train_cpu.png")
    print(f"saved {RESULTS / 'demo_train_cpu.json'}" + (f" and {png}" if png else "") +
          f" ({doc['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
