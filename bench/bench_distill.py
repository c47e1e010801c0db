"""Distillation loss, forward + backward: naive vs chunked vs fused-linear (CPU).

    pytest bench/bench_distill.py --benchmark-json=bench/results/distill_cpu.json
    PEFT_EXT_BENCH_QUICK=1 pytest bench/bench_distill.py     # small sizes, seconds

Full size: 4096 tokens, hidden 1024 (student and teacher), vocab 32768, float32,
30% of the labels ignored. One step is: student and teacher heads, the loss,
and backward to the student's hidden states and head weight.

- naive:   logits = F.linear(h, W) for all tokens (the teacher's under no_grad),
           then DistillationLoss; autograd keeps every (tokens x vocab) tensor.
- chunked: the same per chunk of tokens under torch.utils.checkpoint, the usual
           pure-PyTorch way to bound memory: the backward recomputes each chunk.
- fused:   fused_linear_distillation_loss (gradients computed chunk by chunk
           during the forward, no recomputation, no full logits).

Peak memory (extra_info["peak_bytes"]) is measured in a fresh subprocess per
variant: with glibc told to mmap every block over 64 KiB (MALLOC_MMAP_THRESHOLD_),
a freed tensor goes back to the OS at once, so the resident set follows the live
bytes. The subprocess builds the inputs, warms the libraries up on a tiny step,
resets the kernel's RSS high-water mark (/proc/self/clear_refs), runs one step
and reports VmHWM minus the RSS before the step: the memory the step added,
gradients included. Time is measured in this process by pytest-benchmark.
Targets (issue 13): fused peak <= 1/4 of naive, fused time <= 1.2x naive.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from peft_ext.distill import distillation_loss, fused_linear_distillation_loss

QUICK = os.environ.get("PEFT_EXT_BENCH_QUICK") == "1"
TOKENS, HIDDEN, VOCAB = (256, 64, 2048) if QUICK else (4096, 1024, 32768)
# fused's default at full size (4 * tokens * hidden / vocab); the same for the checkpointed
# loop. Larger chunks run faster on the CPU (fewer passes over the head weight), at more memory.
CHUNK = int(os.environ.get("PEFT_EXT_BENCH_DISTILL_CHUNK", "32" if QUICK else "512"))
ROUNDS = 5 if QUICK else 2
KINDS = os.environ.get("PEFT_EXT_BENCH_DISTILL_KINDS", "forward_kl,jsd" if QUICK else "forward_kl").split(",")
IMPLS = ["naive", "chunked", "fused"]
CFG = dict(temperature=2.0, alpha=0.5)


def make_inputs(tokens, hidden, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=g) / hidden ** 0.5).requires_grad_(True)
    th = torch.randn(tokens, hidden, generator=g)
    tw = torch.randn(vocab, hidden, generator=g) / hidden ** 0.5
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[torch.rand(tokens, generator=g) < 0.3] = -100
    return h, w, th, tw, labels


def step(impl, kind, h, w, th, tw, labels):
    """Loss and backward; returns the loss value."""
    if impl == "naive":
        s = F.linear(h, w)
        with torch.no_grad():
            t = F.linear(th, tw)
        loss = distillation_loss(s, t, labels, kind=kind, **CFG)
    elif impl == "chunked":
        def chunk_loss(hc, wc, thc, lc):
            with torch.no_grad():
                tc = F.linear(thc, tw)
            return distillation_loss(F.linear(hc, wc), tc, lc, kind=kind, reduction="sum", **CFG)
        count = max(int((labels != -100).sum()), 1)
        loss = sum(checkpoint(chunk_loss, h[lo:lo + CHUNK], w, th[lo:lo + CHUNK], labels[lo:lo + CHUNK],
                              use_reentrant=False)
                   for lo in range(0, h.shape[0], CHUNK)) / count
    else:
        loss = fused_linear_distillation_loss(h, w, th, tw, labels, kind=kind, chunk_size=CHUNK, **CFG)
    loss.backward()
    return loss.item()


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _peak_child(impl, kind):
    torch.set_num_threads(2)
    step(impl, kind, *make_inputs(64, 32, 256, seed=1))  # loads the BLAS and thread pools
    inputs = make_inputs(TOKENS, HIDDEN, VOCAB)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _status("VmRSS:")
    loss = step(impl, kind, *inputs)
    print(json.dumps({"peak_bytes": _status("VmHWM:") - before, "loss": loss}))


_PEAKS = {}


def peak(impl, kind):
    if (impl, kind) not in _PEAKS:
        # the child imports the very peft_ext this process imported
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--peak", impl, kind],
                             env=env, capture_output=True, text=True, check=True)
        _PEAKS[impl, kind] = json.loads(out.stdout.strip().splitlines()[-1])
    return _PEAKS[impl, kind]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", IMPLS)
def test_distill(benchmark, impl, kind):
    inputs = make_inputs(TOKENS, HIDDEN, VOCAB)

    def setup():
        inputs[0].grad = None
        inputs[1].grad = None

    # the group names the result files (summarize.py): set before the timing
    benchmark.group = "distill"
    benchmark.pedantic(step, args=(impl, kind, *inputs), setup=setup, rounds=ROUNDS, iterations=1)
    mem = peak(impl, kind)
    ref = peak("naive", kind)
    benchmark.extra_info.update(
        op=f"distill_{kind}", impl=impl, chunk=None if impl == "naive" else CHUNK, shape=f"tokens={TOKENS} hidden={HIDDEN} vocab={VOCAB}",
        dtype="float32", M=TOKENS, baseline="naive",
        # `accuracy` is SQNR in the schema; a loss value has none: its relative difference instead
        accuracy=None, loss_rel_diff=abs(mem["loss"] - ref["loss"]) / abs(ref["loss"]),
        peak_bytes=mem["peak_bytes"], peak_vs_naive=mem["peak_bytes"] / ref["peak_bytes"],
        peak_method="subprocess RSS high-water mark (VmHWM after clear_refs), MALLOC_MMAP_THRESHOLD_=65536")


if __name__ == "__main__" and sys.argv[1:2] == ["--peak"]:
    _peak_child(sys.argv[2], sys.argv[3])
