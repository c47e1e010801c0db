"""torchrun worker for tests/test_distributed.py (not a test module).

    python -m torch.distributed.run --nproc-per-node 2 tests/dist_worker.py OUT_DIR SCENARIO...

Each scenario checks its invariants on every rank and raises on the first
violation (torchrun then fails the run); every rank also writes what it saw
to OUT_DIR/rank<r>.json for the test to read. Scenario "fail" makes rank 1
raise while rank 0 waits in a collective.
"""
import copy
import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import peft_ext
from peft_ext import distributed as pdist

IN, HID, OUT = 32, 48, 10


class Net(nn.Module):
    def __init__(self, norm=False):
        super().__init__()
        self.fc1 = nn.Linear(IN, HID)
        self.fc2 = nn.Linear(HID, HID)
        self.fc3 = nn.Linear(HID, HID)
        self.norm = nn.BatchNorm1d(HID) if norm else nn.Identity()
        self.head = nn.Linear(HID, OUT)

    def forward(self, x):
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        x = torch.relu(self.norm(self.fc3(x)))
        return self.head(x)


def patched_net(norm=False, seed=0):
    """fc1 int8 (Int8Linear), fc2 2:4 sparse (SparseLinear), fc3 and head
    float: the same on every rank."""
    torch.manual_seed(seed)
    model = Net(norm)
    peft_ext.patch(model, "int8", target_modules=["fc1"], exclude_modules=None, min_params=0)
    peft_ext.patch(model, None, target_modules=["fc2"], exclude_modules=None, min_params=0,
                   prune=dict(sparsity=0.5, pattern="2:4"))
    assert type(model.fc1).__name__ == "Int8Linear" and type(model.fc2).__name__ == "SparseLinear"
    return model


def build(norm=False, seed=0):
    """patched_net() with fc3 pruned dense, its mask held in training."""
    model = patched_net(norm, seed)
    report = peft_ext.prune(model, 0.5, "unstructured", target_modules=["fc3"], exclude_modules=None)
    return model, report.masks["fc3"]


def data(n=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, IN, generator=g), torch.randint(0, OUT, (n,), generator=g))


def flat_params(module):
    return torch.cat([p.detach().reshape(-1).float() for p in module.parameters()])


def same_on_all_ranks(t):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return all(torch.equal(parts[0], p) for p in parts[1:])


def frozen_copy(model):
    return {n: b.clone() for n, b in model.named_buffers() if "norm." not in n}


def buffers_intact(model, before):
    now = dict(model.named_buffers())
    return all(torch.equal(now[n], b) for n, b in before.items())


def mask_held(model, mask):
    return bool((model.fc3.weight.detach()[~mask] == 0).all())


def check(cond, what):
    if not cond:
        raise AssertionError(f"rank {dist.get_rank()}: {what}")


def loader(epoch, batch=8):
    ds = data()
    sampler = DistributedSampler(ds, shuffle=True, seed=0)
    sampler.set_epoch(epoch)
    return DataLoader(ds, batch_size=batch, sampler=sampler)


def scenario_ddp(res):
    model, mask = build()
    before = frozen_copy(model)
    ddp = pdist.prepare_ddp(model)
    res["plan"] = {"frozen": ddp.sync_plan.frozen, "frozen_bytes": ddp.sync_plan.frozen_bytes,
                   "mutable": ddp.sync_plan.mutable}
    counter = pdist.count_communication(ddp)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    check(same_on_all_ranks(flat_params(model)), "parameters differ after DDP construction")
    steps, epochs = 0, []
    for epoch in range(2):
        with peft_ext.Prefetcher(loader(epoch), device="cpu", depth=2, pin_memory=False) as batches:
            for x, y in batches:
                start = flat_params(model)
                opt.zero_grad()
                nn.functional.cross_entropy(ddp(x), y).backward()
                opt.step()
                steps += 1
                check(not torch.equal(start, flat_params(model)), f"step {steps} changed nothing")
                check(same_on_all_ranks(flat_params(model)), f"parameters differ after DDP step {steps}")
                check(buffers_intact(model, before), f"frozen buffers changed at step {steps}")
                check(mask_held(model, mask), f"fc3 mask broken at step {steps}")
            s = batches.stats()
        epochs.append({k: s[k] for k in ("batches", "bytes", "consumer_wait_s", "elapsed_s", "overlap")})
    res["ddp"] = {"steps": steps, "broadcast_bytes": counter.broadcast_bytes,
                  "allreduce_bytes": counter.allreduce_bytes, "prefetch_epochs": epochs}


def scenario_default_ddp(res):
    """The baseline prepare_ddp fixes: plain DDP re-broadcasts every buffer per forward."""
    model, _ = build()
    ddp = nn.parallel.DistributedDataParallel(model)
    counter = pdist.count_communication(ddp)
    x, y = next(iter(loader(0)))
    for _ in range(2):
        nn.functional.cross_entropy(ddp(x), y).backward()
    res["default_ddp"] = {"steps": 2, "broadcast_bytes": counter.broadcast_bytes,
                          "allreduce_bytes": counter.allreduce_bytes,
                          "buffer_bytes": sum(b.numel() * b.element_size() for b in model.buffers())}


def scenario_norm(res):
    model, _ = build(norm=True)
    ddp = pdist.prepare_ddp(model)
    counter = pdist.count_communication(ddp)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    seen = []  # running_mean as the norm layer's forward sees it: after DDP's buffer sync
    model.norm.register_forward_pre_hook(lambda mod, args: seen.append(mod.running_mean.clone()))
    for step, (x, y) in enumerate(loader(0)):
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        check(same_on_all_ranks(seen[-1]), f"running_mean differs between ranks in forward {step}")
    # The ranks' local batches move their statistics apart after each forward: the
    # broadcast above is what brought them back together.
    check(not same_on_all_ranks(model.norm.running_mean.clone()), "running_mean never diverged")
    res["norm"] = {"mutable": ddp.sync_plan.mutable, "mutable_bytes": ddp.sync_plan.mutable_bytes,
                   "broadcasts": counter.broadcasts, "broadcast_bytes": counter.broadcast_bytes,
                   "steps": len(loader(0))}


def scenario_local_sgd(res, period=3, warmup=2, n_steps=9):
    model, mask = build(seed=2)
    before = frozen_copy(model)
    ddp = pdist.prepare_ddp(model)
    opt = pdist.local_sgd(ddp, torch.optim.SGD(ddp.parameters(), lr=0.05), period=period, warmup_steps=warmup)
    seen = []
    batches = iter(loader(0, batch=4))
    for step in range(n_steps):
        x, y = next(batches)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        same = same_on_all_ranks(flat_params(model))
        expect = step < warmup or pdist.averaged_after(step, period, warmup)
        # Between averaging points each rank follows its own data: the ranks must differ,
        # else the averaging check above would prove nothing.
        check(same == expect, f"local SGD step {step}: ranks {'agree' if same else 'differ'}, expected "
                              f"{'agreement' if expect else 'divergence'}")
        check(buffers_intact(model, before), f"frozen buffers changed at local SGD step {step}")
        check(mask_held(model, mask), f"fc3 mask broken at local SGD step {step}")
        seen.append({"step": step, "same": same, "averaged": pdist.averaged_after(step, period, warmup)})
    res["local_sgd"] = seen


def scenario_fsdp2(res):
    torch.manual_seed(3)
    model = Net()
    peft_ext.patch(model, "int8", target_modules=["fc1", "fc2", "fc3"], exclude_modules=None, min_params=0)
    before = frozen_copy(model)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for name in ("fc1", "fc2", "fc3", "head"):
        fully_shard(getattr(model, name), mesh=mesh)
    fully_shard(model, mesh=mesh)
    check(all(isinstance(p, DTensor) for p in model.parameters()), "FSDP2 left a parameter unsharded")
    check(not any(isinstance(b, DTensor) for b in model.buffers()), "FSDP2 sharded a buffer")
    bias0 = model.fc1.bias.full_tensor().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = next(iter(loader(0)))
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    check(torch.isfinite(loss).item(), "FSDP2 loss not finite")
    check(buffers_intact(model, before), "FSDP2 step changed the int8 buffers")
    bias1 = model.fc1.bias.full_tensor()
    check(not torch.equal(bias0, bias1), "FSDP2 step did not move fc1.bias")
    check(same_on_all_ranks(bias1.contiguous()), "FSDP2 full parameters differ between ranks")
    res["fsdp2"] = {"loss": loss.item(), "local_shard": list(model.fc1.bias.to_local().shape),
                    "buffer_shapes": {n: list(b.shape) for n, b in model.named_buffers()}}


def scenario_lora(res):
    try:
        from peft import LoraConfig, get_peft_model  # noqa: PLC0415  (optional: skipped without peft)
    except ImportError:
        res["lora"] = "skipped: peft not installed"
        return
    torch.manual_seed(4)
    model = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2", "fc3"]))
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ddp = pdist.prepare_ddp(model)
    opt = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-2)
    for step, (x, y) in enumerate(loader(0)):
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        trained = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
        check(same_on_all_ranks(trained), f"LoRA parameters differ after step {step}")
    now = dict(model.named_parameters())
    check(all(torch.equal(now[n], b) for n, b in base.items()), "LoRA training moved a frozen base weight")
    res["lora"] = {"frozen_checked": len(ddp.sync_plan.frozen), "trainable": sum(
        p.numel() for p in model.parameters() if p.requires_grad)}


def scenario_fsdp2_lora(res):
    """peft LoRA on an int8 + 2:4 base, sharded with FSDP2: the adapters train
    exactly as one process training on the concatenated batches would, and
    the frozen base (int8 / sparse buffers, frozen parameters) never moves."""
    try:
        from peft import LoraConfig, get_peft_model  # noqa: PLC0415  (optional: skipped without peft)
    except ImportError:
        res["fsdp2_lora"] = "skipped: peft not installed"
        return
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2", "fc3"], init_lora_weights=False)
    model = get_peft_model(patched_net(seed=6), config)
    reference = copy.deepcopy(model)  # trained alone on each step's global batch
    before = {n: b.clone() for n, b in model.named_buffers()}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    layers = model.base_model.model
    for name in ("fc1", "fc2", "fc3"):
        fully_shard(getattr(layers, name), mesh=mesh)
    fully_shard(model, mesh=mesh)
    check(not any(isinstance(b, DTensor) for b in model.buffers()), "FSDP2 sharded a base buffer")
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ref_opt = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2)
    for step, (x, y) in enumerate(loader(0)):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        # The same step on one process: equal local batches, so the mean over
        # the concatenation is the mean of the ranks' means FSDP2 reduces.
        xs, ys = [torch.empty_like(x) for _ in range(2)], [torch.empty_like(y) for _ in range(2)]
        dist.all_gather(xs, x)
        dist.all_gather(ys, y)
        ref_opt.zero_grad()
        nn.functional.cross_entropy(reference(torch.cat(xs)), torch.cat(ys)).backward()
        ref_opt.step()
        check(torch.isfinite(loss).item(), f"FSDP2 + LoRA loss not finite at step {step}")
    full = {n: p.full_tensor() if isinstance(p, DTensor) else p.detach()
            for n, p in model.named_parameters()}
    ref = dict(reference.named_parameters())
    worst = max((full[n] - ref[n].detach()).abs().max().item() for n in full if "lora_" in n)
    check(worst < 1e-4, f"FSDP2 + LoRA adapters differ from single-process training by {worst}")
    check(buffers_intact(model, before), "FSDP2 + LoRA changed a base buffer")
    check(all(torch.equal(full[n], p) for n, p in frozen.items()), "FSDP2 + LoRA moved a frozen parameter")
    lora_b = torch.cat([full[n].reshape(-1) for n in sorted(full) if "lora_B" in n])
    check(same_on_all_ranks(lora_b.contiguous()), "FSDP2 + LoRA adapters differ between ranks")
    res["fsdp2_lora"] = {"max_diff_vs_single_process": worst, "frozen_checked": len(frozen) + len(before),
                         "base_types": [type(getattr(layers, n).base_layer).__name__ for n in ("fc1", "fc2", "fc3")]}


def scenario_offload(res):
    model, mask = build(seed=5)
    before = {n: b.clone() for n, b in model.named_buffers()}
    # Below the frozen total (6624 bytes): room for a ring slot only, every layer streams.
    ctl = peft_ext.offload(model, device="cpu", max_resident_bytes=5000)
    ddp = pdist.prepare_ddp(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    for step, (x, y) in enumerate(loader(0)):
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        check(same_on_all_ranks(flat_params(model)), f"offloaded: parameters differ after step {step}")
    check(ctl.plan is not None and ctl.plan.streamed_bytes_per_forward > 0, "offload streamed nothing")
    check(buffers_intact(model, before), "offloaded frozen buffers changed")
    check(mask_held(model, mask), "offloaded: fc3 mask broken")
    res["offload"] = {"streamed_bytes_per_forward": ctl.plan.streamed_bytes_per_forward}
    ctl.remove()


def scenario_mismatch(res):
    """prepare_ddp must refuse ranks whose frozen buffers differ."""
    model, _ = build()
    if dist.get_rank() == 1:
        with torch.no_grad():
            model.fc1.weight[0, 0] += 1
    try:
        pdist.prepare_ddp(model)
    except RuntimeError as e:
        res["mismatch"] = str(e)
    else:
        raise AssertionError("prepare_ddp accepted different int8 weights on the ranks")


def scenario_fail(res):
    if dist.get_rank() == 1:
        raise RuntimeError("rank 1 fails on purpose")
    t = torch.ones(1)
    dist.all_reduce(t)  # rank 1 never joins: torchrun must end this rank
    dist.all_reduce(t)


SCENARIOS = {f.__name__[len("scenario_"):]: f for f in
             (scenario_ddp, scenario_default_ddp, scenario_norm, scenario_local_sgd, scenario_fsdp2,
              scenario_lora, scenario_fsdp2_lora, scenario_offload, scenario_mismatch, scenario_fail)}


def main():
    out_dir, names = sys.argv[1], sys.argv[2:]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    res = {"world_size": dist.get_world_size()}
    try:
        for name in names:
            SCENARIOS[name](res)
        with open(os.path.join(out_dir, f"rank{dist.get_rank()}.json"), "w") as f:
            json.dump(res, f, default=str)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
