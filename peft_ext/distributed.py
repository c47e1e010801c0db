"""Data-parallel training of patched, pruned and LoRA models on torch.distributed.

    dist.init_process_group("gloo")            # or "nccl", under torchrun
    peft_ext.patch(model)                       # deterministic: same buffers on every rank
    ddp = prepare_ddp(model)                    # checks frozen buffers once, never re-broadcasts them
    opt = local_sgd(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1), period=4)   # optional

Why: DistributedDataParallel by default broadcasts every buffer from rank 0
before each forward (`forward_sync_buffers`, formerly `broadcast_buffers`).
A patched model's buffers are its frozen weights (Int8Linear's int8 `weight`
and `weight_scale`, SparseLinear's `values`/`indices`/`crow`/`col`), so the
default re-sends the whole frozen base on every step although nothing writes
it. prepare_ddp() fingerprints those tensors once (two tiny all-reduces: a
structure hash, then a byte checksum per tensor), raises if any rank differs,
and tells DDP to ignore them (DDP's `_set_params_and_buffers_to_ignore_for_model`,
the hook torch's own FSDP/TorchRec use): they are neither broadcast at
construction nor before any forward. Buffers a forward writes (BatchNorm /
InstanceNorm running statistics, or names given in `mutable_buffers`) stay
under DDP: only those are broadcast from rank 0 before each forward, DDP's
usual semantics for them. Trainable parameters are broadcast once at
construction as usual. What this saves per step is `plan.frozen_bytes`; count
it with count_communication().

FSDP2 (`torch.distributed.fsdp.fully_shard`) shards parameters only: a patched
layer's float parameters (bias, norms, a float head, LoRA adapters) are
sharded, its int8/sparse buffers are left whole on every rank (replicated,
moved to the mesh's device) and never communicated. fully_shard works with
gloo on CPU in this torch (tested in tests/test_distributed.py).

Local SGD: local_sgd() wires torch's post-local-SGD comm hook and
PostLocalSGDOptimizer(PeriodicModelAverager): gradients are all-reduced for
`warmup_steps`, then each rank steps alone and parameters are averaged every
`period` steps. Averaging keeps pruned zeros zero (the mean of zeros) and
never touches buffers.
"""
import logging
import zlib
from dataclasses import dataclass, field
from typing import Iterable, List

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, post_localSGD_hook
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
from torch.distributed.optim import PostLocalSGDOptimizer
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parallel import DistributedDataParallel as DDP

log = logging.getLogger(__name__)

_CHUNK = 1 << 24  # elements fingerprinted at a time: bounds the int64 temporary


@dataclass
class SyncPlan:
    """What prepare_ddp() decided: `frozen` tensors were checked once and are
    never broadcast; `mutable` buffers are broadcast before each forward."""

    frozen: List[str] = field(default_factory=list)
    frozen_bytes: int = 0
    mutable: List[str] = field(default_factory=list)
    mutable_bytes: int = 0

    def __str__(self):
        return (f"{len(self.frozen)} frozen tensors ({self.frozen_bytes} bytes) checked once, never broadcast; "
                f"{len(self.mutable)} mutable buffers ({self.mutable_bytes} bytes) broadcast per forward")


def mutable_buffer_names(model: nn.Module, extra: Iterable[str] = ()) -> List[str]:
    """Buffers a forward writes: norm layers' running statistics, plus `extra` names."""
    names = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, _NormBase) and mod.track_running_stats:
            names += [f"{mod_name}.{b}" if mod_name else b for b, t in mod.named_buffers(recurse=False)
                      if t is not None]
    known = dict(model.named_buffers())
    for name in extra:
        if name not in known:
            raise ValueError(f"mutable_buffers: {name!r} is not a buffer of the model")
        if name not in names:
            names.append(name)
    return names


def frozen_tensors(model: nn.Module, mutable: Iterable[str] = ()):
    """(name, tensor) of every buffer not in `mutable` and every parameter with requires_grad=False."""
    mutable = set(mutable)
    out = [(n, b) for n, b in model.named_buffers() if n not in mutable]
    out += [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    return out


def _fingerprint(t):
    """Two int64 sums over the tensor's bytes (plain and position-weighted):
    any single changed byte, and nearly any swap, changes them."""
    b = t.detach().contiguous().reshape(-1).view(torch.uint8)
    s0 = torch.zeros((), dtype=torch.int64, device=t.device)
    s1 = torch.zeros((), dtype=torch.int64, device=t.device)
    for start in range(0, b.numel(), _CHUNK):
        part = b[start:start + _CHUNK].to(torch.int64)
        w = (torch.arange(start, start + part.numel(), device=t.device, dtype=torch.int64) % 251) + 1
        s0 += part.sum()
        s1 += (part * w).sum()
    return torch.stack([s0, s1])


def _comm_device(group):
    backend = dist.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def _disagree(values, group):
    """Indices (flattened) where the int64 `values` differ between ranks."""
    lo, hi = values.clone(), values.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    return (lo != hi).reshape(-1).nonzero().flatten().tolist()


def verify_replicated(model: nn.Module, mutable_buffers: Iterable[str] = (), group=None) -> List[str]:
    """Raise RuntimeError unless every frozen tensor (buffers not in
    mutable_buffers, parameters with requires_grad=False) is byte-identical on
    every rank of `group`. Returns the names checked. A collective: call it on
    every rank."""
    tensors = frozen_tensors(model, mutable_buffers)
    dev = _comm_device(group)
    layout = "|".join(f"{n}:{tuple(t.shape)}:{t.dtype}" for n, t in tensors)
    head = torch.tensor([len(tensors), zlib.crc32(layout.encode())], dtype=torch.int64, device=dev)
    if _disagree(head, group):
        raise RuntimeError("prepare_ddp: the ranks' models differ in their frozen tensors' names, shapes or "
                           f"dtypes (this rank: {len(tensors)} tensors); patch every rank the same way")
    if not tensors:
        return []
    prints = torch.stack([_fingerprint(t).to(dev) for _, t in tensors])
    bad = sorted({i // 2 for i in _disagree(prints, group)})
    if bad:
        names = ", ".join(tensors[i][0] for i in bad[:5])
        raise RuntimeError(f"prepare_ddp: frozen tensors differ between ranks: {names}"
                           f"{' ...' if len(bad) > 5 else ''} ({len(bad)} of {len(tensors)}); "
                           "seed the model and patch/prune deterministically on every rank")
    return [n for n, _ in tensors]


def prepare_ddp(model: nn.Module, *, mutable_buffers: Iterable[str] = (), check: bool = True,
                **ddp_kwargs) -> DDP:
    """Wrap `model` in DistributedDataParallel so its frozen buffers are
    checked once and never broadcast (see the module docstring).

    mutable_buffers: names of buffers a forward writes besides norm layers'
        running statistics (found automatically); they stay synced from rank 0.
    check: run verify_replicated() first (two small all-reduces, once).
    ddp_kwargs: passed to DistributedDataParallel (device_ids, bucket_cap_mb,
        find_unused_parameters, ...); prepare_ddp sets the buffer sync itself.
    The plan is `ddp.sync_plan` (a SyncPlan). The ignore list stays on `model`
    (DDP's `_ddp_params_and_buffers_to_ignore`): a later plain DDP of the same
    model skips those tensors too.
    """
    clash = sorted({"broadcast_buffers", "forward_sync_buffers"} & set(ddp_kwargs))
    if clash:
        raise TypeError(f"prepare_ddp() sets {', '.join(clash)} itself (frozen buffers are never broadcast)")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("prepare_ddp: call torch.distributed.init_process_group() first")
    mutable = mutable_buffer_names(model, mutable_buffers)
    frozen = frozen_tensors(model, mutable)
    if check:
        verify_replicated(model, mutable, ddp_kwargs.get("process_group"))
    buffers = dict(model.named_buffers())
    plan = SyncPlan([n for n, _ in frozen], sum(t.numel() * t.element_size() for _, t in frozen),
                    mutable, sum(buffers[n].numel() * buffers[n].element_size() for n in mutable))
    # The ignore list is an attribute of the module (DDP reads it at construction);
    # a failed construction must not leave it behind.
    previous = getattr(model, "_ddp_params_and_buffers_to_ignore", None)
    DDP._set_params_and_buffers_to_ignore_for_model(model, [n for n, _ in frozen])
    try:
        ddp = DDP(model, forward_sync_buffers=bool(mutable), **ddp_kwargs)
    except BaseException:
        if previous is None:
            del model._ddp_params_and_buffers_to_ignore
        else:
            model._ddp_params_and_buffers_to_ignore = previous
        raise
    ddp.sync_plan = plan
    log.info("prepare_ddp: %s", plan)
    return ddp


class CommCounter:
    """Bytes a DDP model sends per step, counted where DDP hands tensors to the
    process group: buffer broadcasts (DDP._distributed_broadcast_coalesced,
    wrapped on this instance) and gradient all-reduces (a comm hook that
    counts each bucket, then runs torch's allreduce_hook). Payload bytes, as
    the collectives receive them; the wire traffic of a ring/tree algorithm is
    a constant multiple of it."""

    def __init__(self, ddp: DDP):
        self.broadcast_bytes = 0
        self.allreduce_bytes = 0
        self.broadcasts = 0
        inner = ddp._distributed_broadcast_coalesced

        def counted(tensors, buffer_size, authoritative_rank=0):
            self.broadcasts += 1
            self.broadcast_bytes += sum(t.numel() * t.element_size() for t in tensors)
            return inner(tensors, buffer_size, authoritative_rank)

        ddp._distributed_broadcast_coalesced = counted
        group = ddp.process_group

        def hook(state, bucket):
            buf = bucket.buffer()
            self.allreduce_bytes += buf.numel() * buf.element_size()
            return default_hooks.allreduce_hook(group, bucket)

        ddp.register_comm_hook(None, hook)

    def reset(self):
        self.broadcast_bytes = self.allreduce_bytes = self.broadcasts = 0


def count_communication(ddp: DDP) -> CommCounter:
    """Install a CommCounter on `ddp` (before its first backward; it uses the
    comm hook slot, so not together with local_sgd())."""
    return CommCounter(ddp)


def local_sgd(ddp: DDP, optimizer: torch.optim.Optimizer, period: int, warmup_steps: int = 0,
              process_group=None) -> PostLocalSGDOptimizer:
    """Local SGD with torch's own pieces: all-reduce gradients for
    `warmup_steps` steps (post_localSGD_hook), then no gradient sync and a
    parameter average every `period` steps (PeriodicModelAverager inside
    PostLocalSGDOptimizer). Call the returned optimizer's step() as usual.
    The averager averages after step s (0-based) when s >= warmup_steps and
    (s - warmup_steps) % period == 0."""
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise ValueError(f"period must be an int >= 1, got {period!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
    state = post_localSGD_hook.PostLocalSGDState(process_group=process_group, subgroup=None,
                                                 start_localSGD_iter=warmup_steps,
                                                 post_local_gradient_allreduce=False)
    ddp.register_comm_hook(state, post_localSGD_hook.post_localSGD_hook)
    averager = PeriodicModelAverager(period=period, warmup_steps=warmup_steps, process_group=process_group)
    return PostLocalSGDOptimizer(optim=optimizer, averager=averager)


def averaged_after(step: int, period: int, warmup_steps: int = 0) -> bool:
    """Whether local_sgd()'s averager averages after 0-based step `step`."""
    return step >= warmup_steps and (step - warmup_steps) % period == 0
