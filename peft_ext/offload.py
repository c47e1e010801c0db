"""offload(model): weight streaming for models larger than device memory.

    ctl = peft_ext.offload(model, device="cuda", max_resident_bytes=8 << 30)
    model(x)              # first forward: runs synchronously, records the order
    print(ctl.plan)       # resident vs streamed, bytes, expected copy time
    model(x)              # later forwards stream weights a few layers ahead

The frozen weights (parameters with requires_grad=False, and buffers, such as
Int8Linear's int8 weight) of every module that owns tensors live in exact-size
pinned host memory. The first forward loads each module's weights when it
runs, recording the execution order and the copy and compute times. The plan
then keeps the layers that gain most resident within max_resident_bytes and
streams the rest through a Prefetcher ring fed in the recorded order, so each
layer's weights are copied on the side stream while earlier layers compute.
A module's device copy is dropped after its forward (frozen: never copied
back). If the order changes, that forward falls back to synchronous loads and
the plan is re-made from the new order. Trainable parameters stay resident.
On device="cpu" the same path copies between host buffers (tested in CI).
"""
import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn

from ._report import human_bytes, table
from .prefetch import Prefetcher, _resolve_device

log = logging.getLogger(__name__)


class _Unit:
    """One module that owns frozen tensors; `entries` are (dict name, attr, host tensor)."""

    def __init__(self, index, name, module, entries):
        self.index, self.name, self.module, self.entries = index, name, module, entries
        self.bytes = sum(t.numel() * t.element_size() for _, _, t in entries)
        self.copy_s = self.compute_s = 0.0
        self.resident = False
        self.device_tensors = None  # set while resident

    def install(self, tensors):
        for (where, attr, _), t in zip(self.entries, tensors):
            getattr(self.module, where)[attr] = t

    def restore(self):
        for where, attr, host in self.entries:
            getattr(self.module, where)[attr] = host


@dataclass
class PlanRow:
    name: str
    bytes: int
    copy_ms: float
    compute_ms: float
    placement: str


@dataclass
class OffloadPlan:
    """What offload() decided, from the measured times of the first forward."""

    device: str
    max_resident_bytes: int
    depth: int
    bandwidth_gbps: float
    resident_bytes: int
    ring_bytes: int
    streamed_bytes_per_forward: int
    expected_copy_s: float
    expected_exposed_s: float
    rows: List[PlanRow] = field(default_factory=list)

    def __str__(self):
        lines = table([("module", "bytes", "copy ms", "compute ms", "placement")] +
                      [(r.name, human_bytes(r.bytes), f"{r.copy_ms:.3f}", f"{r.compute_ms:.3f}", r.placement)
                       for r in self.rows])
        lines += ["", f"device {self.device}: resident {human_bytes(self.resident_bytes)} + ring "
                      f"{human_bytes(self.ring_bytes)} (depth {self.depth}) of "
                      f"{human_bytes(self.max_resident_bytes)}; "
                      f"streams {human_bytes(self.streamed_bytes_per_forward)} per forward at "
                      f"{self.bandwidth_gbps:.2f} GB/s: {self.expected_copy_s * 1e3:.2f} ms of copies, "
                      f"about {self.expected_exposed_s * 1e3:.2f} ms not hidden by compute"]
        return "\n".join(lines)


def _frozen_entries(module, pin, seen):
    """Moves the module's frozen tensors to (pinned) host memory; `seen` maps
    id(tensor) -> (tensor, host copy) so tied weights are copied once."""
    entries = []
    for where in ("_parameters", "_buffers"):
        tensors = getattr(module, where)
        for attr, t in tensors.items():
            if t is None or (where == "_parameters" and t.requires_grad):
                continue
            if id(t) not in seen:
                host = t.detach().cpu().contiguous()
                host = pin(host) if pin is not None else host
                if where == "_parameters":
                    t.data = host  # the Parameter object (and ties, optimizers) stays
                    host = t
                seen[id(t)] = (t, host)  # t kept alive so its id is not reused
            host = seen[id(t)][1]
            tensors[attr] = host
            entries.append((where, attr, host))
    return entries


class Offloader:
    """The controller offload() installs. `plan` is None until the first forward."""

    def __init__(self, model, device, max_resident_bytes, prefetch):
        self.model, self.device, self.prefetch = model, device, prefetch
        self.max_resident_bytes = max_resident_bytes
        pin = torch.classes.peft_ext.PrefetchRing.pin if device.type == "cuda" else None
        self.units, seen = [], {}
        for name, module in model.named_modules():
            entries = _frozen_entries(module, pin, seen)
            if entries:
                self.units.append(_Unit(len(self.units), name or "(root)", module, entries))
        streamed = {id(h) for _, h in seen.values()}
        for module in model.modules():  # everything not streamed lives on the device
            for where in ("_parameters", "_buffers"):
                for attr, t in getattr(module, where).items():
                    if t is not None and id(t) not in streamed:
                        if where == "_parameters":
                            t.data = t.data.to(device)
                        else:
                            module._buffers[attr] = t.to(device)
        self.order: Optional[List[int]] = None
        self.plan: Optional[OffloadPlan] = None
        self._trace, self._recording, self._ring, self._held = [], True, None, {}
        self._handles = [model.register_forward_pre_hook(self._start),
                         model.register_forward_hook(self._end)]
        for u in self.units:
            self._handles.append(u.module.register_forward_pre_hook(self._loader(u)))
            self._handles.append(u.module.register_forward_hook(self._unloader(u)))

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _start(self, module, args):
        self._trace = []
        self._recording = self.plan is None
        if self._ring is None and self.plan is not None and self._streamed_order():
            items = [(i, [h for _, _, h in self.units[i].entries]) for i in self._streamed_order()]
            self._ring = Prefetcher(itertools.cycle(items), device=self.device, depth=self.plan.depth)

    def _streamed_order(self):
        return [i for i in self.order if not self.units[i].resident]

    def _loader(self, unit):
        def load(module, args):
            self._trace.append(unit.index)
            if unit.resident:
                return
            tensors = self._next_from_ring(unit)
            if tensors is None:  # recording, or the order changed: load now
                self._sync()
                t0 = time.perf_counter()
                tensors = [h.detach().to(self.device, copy=True) for _, _, h in unit.entries]
                self._sync()
                if self._recording:
                    unit.copy_s = time.perf_counter() - t0
            unit.install(tensors)
            self._held[unit.index] = time.perf_counter()
        return load

    def _next_from_ring(self, unit):
        if self._ring is None or self._recording:
            return None
        index, tensors = next(self._ring)
        if index == unit.index:
            return tensors
        log.info("offload: execution order changed at %s; loading synchronously and re-planning",
                 unit.name)
        self._drop_ring()
        return None

    def _unloader(self, unit):
        def unload(module, args, output):
            if unit.resident:
                return
            t0 = self._held.pop(unit.index, None)
            if self._recording and t0 is not None:
                self._sync()
                unit.compute_s = time.perf_counter() - t0
            unit.restore()  # frozen: the device copy is dropped, never copied back
        return unload

    def _end(self, module, args, output):
        if self._recording:
            self.order = self._trace
            self._make_plan()
        elif self._trace != self.order:
            log.info("offload: execution order changed; re-recording on the next forward")
            self._drop_ring()
            self.plan = None

    def _drop_ring(self):
        if self._ring is not None:
            self._ring.close()
            self._ring = None

    def _make_plan(self):
        used = [self.units[i] for i in dict.fromkeys(self.order)]
        copied = [u for u in used if u.copy_s > 0]
        bandwidth = (sum(u.bytes for u in copied) / sum(u.copy_s for u in copied)) if copied else math.inf
        copy_s = {u.index: u.bytes / bandwidth for u in used}
        budget = self.max_resident_bytes
        for u in used:
            u.resident = False
        total = sum(u.bytes for u in used)
        depth = 0
        if total <= budget:
            resident = set(u.index for u in used)
        else:
            ratios = sorted(copy_s[u.index] / max(u.compute_s, 1e-9) for u in used)
            depth = min(self.prefetch, max(1, math.ceil(ratios[len(ratios) // 2])))
            largest = max(u.bytes for u in used)
            depth = min(depth, budget // largest) if largest else depth
            if depth < 1:
                raise ValueError(f"max_resident_bytes={budget} cannot hold even one copy of the largest "
                                 f"layer ({largest} bytes)")
            exposed = self._exposure(copy_s, depth, resident=set())
            resident, room = set(), budget - depth * largest
            pos = {i: p for p, i in reversed(list(enumerate(self.order)))}
            for u in sorted(used, key=lambda u: (-exposed[u.index] / max(u.bytes, 1), pos[u.index])):
                if u.bytes <= room:
                    resident.add(u.index)
                    room -= u.bytes
        for u in used:
            self._place(u, u.index in resident)
        streamed = [i for i in self.order if i not in resident]
        ring_bytes = depth * max((self.units[i].bytes for i in streamed), default=0)
        exposed = self._exposure(copy_s, max(depth, 1), resident)
        self.plan = OffloadPlan(
            device=str(self.device), max_resident_bytes=budget, depth=depth,
            bandwidth_gbps=bandwidth / 1e9,
            resident_bytes=sum(self.units[i].bytes for i in resident), ring_bytes=ring_bytes,
            streamed_bytes_per_forward=sum(self.units[i].bytes for i in streamed),
            expected_copy_s=sum(copy_s[i] for i in streamed),
            expected_exposed_s=sum(exposed[i] for i in streamed),
            rows=[PlanRow(u.name, u.bytes, copy_s[u.index] * 1e3, u.compute_s * 1e3,
                          "resident" if u.resident else "streamed") for u in used])
        log.info("offload plan:\n%s", self.plan)

    def _exposure(self, copy_s, depth, resident):
        """Copy time of each streamed unit not hidden behind the compute of the
        `depth` units before it in the (cyclic) order."""
        order, out = self.order, {}
        for p, i in enumerate(order):
            if i in resident:
                continue
            hidden = sum(self.units[order[(p - k) % len(order)]].compute_s for k in range(1, depth + 1))
            out[i] = out.get(i, 0.0) + max(0.0, copy_s[i] - hidden)
        return out

    def _place(self, unit, resident):
        if resident and unit.device_tensors is None:
            unit.device_tensors = [h.detach().to(self.device, copy=True) for _, _, h in unit.entries]
            unit.install(unit.device_tensors)
        elif not resident and unit.device_tensors is not None:
            unit.device_tensors = None
            unit.restore()
        unit.resident = resident

    def remove(self):
        """Stop streaming and remove the hooks; the weights stay in host memory."""
        self._drop_ring()
        for h in self._handles:
            h.remove()
        for u in self.units:
            u.resident, u.device_tensors = False, None
            u.restore()


def offload(model: nn.Module, device="cuda", max_resident_bytes: Optional[int] = None,
            prefetch: int = 2) -> Offloader:
    """Stream `model`'s frozen weights from host memory to `device`, keeping at
    most max_resident_bytes of them there (default: 80% of the free device
    memory on CUDA, 0 on the CPU), prefetching up to `prefetch` layers ahead.
    Returns the Offloader; its `plan` is made after the first forward."""
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1:
        raise ValueError(f"prefetch must be an int >= 1, got {prefetch!r}")
    dev = _resolve_device(device)
    if max_resident_bytes is None:
        max_resident_bytes = int(torch.cuda.mem_get_info(dev)[0] * 0.8) if dev.type == "cuda" else 0
    if max_resident_bytes < 0:
        raise ValueError(f"max_resident_bytes must be >= 0, got {max_resident_bytes}")
    return Offloader(model, dev, int(max_resident_bytes), prefetch)
