"""offload(model): weight streaming for models larger than device memory.

    ctl = peft_ext.offload(model, max_resident_bytes=8 << 30)   # device: the accelerator
    print(ctl.plan)       # before the first forward: the units and "plan made at the first forward"
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

What is never streamed: trainable parameters (offload(freeze=True) freezes
every parameter first; otherwise a model whose weights are mostly trainable,
such as a stock Hugging Face model, gets a warning that little can stream);
the buffers of BatchNorm / InstanceNorm (running statistics, written by every
training forward); and any frozen tensor that a forward writes in place or
reassigns (seen through the tensor's version counter): its new value is kept
on the device from then on and the plan is re-made, so no write is lost.
Backward recomputation (activation checkpointing) loads weights synchronously
and is not part of the recorded order. Replacing a streamed module (unpatch(),
or any assignment of a submodule) removes the offloading (hooks, ring) with a
warning: the weights are back in host memory; call offload() again.
A model being offloaded cannot be deep-copied or pickled (TypeError): call
ctl.remove() first, copy, then offload() each copy.
"""
import itertools
import logging
import math
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.module import register_module_module_registration_hook

from ._report import human_bytes, table
from .prefetch import Prefetcher, resolve_device

log = logging.getLogger(__name__)


class _Unit:
    """One module that owns frozen tensors; `entries` are (dict name, attr, host tensor)."""

    def __init__(self, index, name, module, entries):
        self.index, self.name, self.module, self.entries = index, name, module, entries
        self.bytes = sum(t.numel() * t.element_size() for _, _, t in entries)
        self.copy_s = self.compute_s = 0.0
        self.resident = False
        self.device_tensors = None  # set while resident
        self.installed = []  # (tensor, its version) as installed, to see writes

    def install(self, tensors):
        self.installed = [(t, t._version) for t in tensors]
        for (where, attr, _), t in zip(self.entries, tensors):
            getattr(self.module, where)[attr] = t

    def written(self):
        """Indices of entries the module wrote since install(): changed in
        place (version counter) or reassigned."""
        out = []
        for k, ((where, attr, _), (t, version)) in enumerate(zip(self.entries, self.installed)):
            now = getattr(self.module, where).get(attr)
            if now is not t or t._version != version:
                out.append(k)
        return out

    def restore(self):
        self.installed = []
        for where, attr, host in self.entries:
            getattr(self.module, where)[attr] = host

    def keep_on_device(self, ks):
        """Stop streaming entries `ks`: the module keeps what it wrote."""
        for k in sorted(ks, reverse=True):
            where, attr, host = self.entries.pop(k)
            now = getattr(self.module, where).get(attr)
            if isinstance(now, torch.Tensor):
                now = now.detach().clone()  # may point into a ring slot
            if where == "_parameters" and now is not None:
                host.data = now  # the Parameter object stays
                now = host
            getattr(self.module, where)[attr] = now
            del self.installed[k]
            if self.device_tensors is not None:
                del self.device_tensors[k]
        self.bytes = sum(t.numel() * t.element_size() for _, _, t in self.entries)


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
    pending: bool = False  # True until the first forward has measured the order
    kept_on_device: List[str] = field(default_factory=list)  # tensors never streamed, and why

    def __str__(self):
        if self.pending:
            lines = table([("module", "bytes")] + [(r.name, human_bytes(r.bytes)) for r in self.rows])
            lines += ["", f"plan made at the first forward: {len(self.rows)} module(s) with "
                          f"{human_bytes(sum(r.bytes for r in self.rows))} of frozen weights in host memory; "
                          f"device {self.device}, budget {human_bytes(self.max_resident_bytes)}"]
            lines += [f"kept on the device: {k}" for k in self.kept_on_device]
            return "\n".join(lines)
        lines = table([("module", "bytes", "copy ms", "compute ms", "placement")] +
                      [(r.name, human_bytes(r.bytes), f"{r.copy_ms:.3f}", f"{r.compute_ms:.3f}", r.placement)
                       for r in self.rows])
        lines += ["", f"device {self.device}: resident {human_bytes(self.resident_bytes)} + ring "
                      f"{human_bytes(self.ring_bytes)} (depth {self.depth}) of "
                      f"{human_bytes(self.max_resident_bytes)}; "
                      f"streams {human_bytes(self.streamed_bytes_per_forward)} per forward at "
                      f"{self.bandwidth_gbps:.2f} GB/s: {self.expected_copy_s * 1e3:.2f} ms of copies, "
                      f"about {self.expected_exposed_s * 1e3:.2f} ms not hidden by compute"]
        lines += [f"kept on the device: {k}" for k in self.kept_on_device]
        return "\n".join(lines)


def _streamable(module, freeze):
    """(dict name, attr, tensor) of the module's own tensors that may stream:
    frozen parameters (all of them with freeze), and buffers but those of
    normalization layers with running statistics."""
    out = []
    stateful = isinstance(module, _NormBase)
    for where in ("_parameters", "_buffers"):
        for attr, t in getattr(module, where).items():
            if t is None or (where == "_parameters" and t.requires_grad and not freeze):
                continue
            if where == "_buffers" and stateful:
                continue
            out.append((where, attr, t))
    return out


def _nbytes(t):
    return t.numel() * t.element_size()


def _frozen_entries(module, candidates, pin, seen):
    """Moves the module's streamable tensors to (pinned) host memory; `seen` maps
    id(tensor) -> (tensor, host copy) so tied weights are copied once."""
    entries = []
    for where, attr, t in candidates:
        if id(t) not in seen:
            host = t.detach().cpu().contiguous()
            host = pin(host) if pin is not None else host
            if where == "_parameters":
                t.data = host  # the Parameter object (and ties, optimizers) stays
                host = t
            seen[id(t)] = (t, host)  # t kept alive so its id is not reused
        host = seen[id(t)][1]
        getattr(module, where)[attr] = host
        entries.append((where, attr, host))
    return entries


class Offloader:
    """The controller offload() installs. `plan` says "plan made at the first
    forward" (plan.pending) until the first forward has run."""

    def __init__(self, model, device, max_resident_bytes, prefetch, freeze=False, candidates=None):
        self.model, self.device, self.prefetch = model, device, prefetch
        self.max_resident_bytes = max_resident_bytes
        if candidates is None:
            candidates = {name: _streamable(m, freeze) for name, m in model.named_modules()}
        if freeze:
            model.requires_grad_(False)
        pin = torch.classes.peft_ext.PrefetchRing.pin if device.type == "cuda" else None
        self.units, seen = [], {}
        self.kept_on_device = [f"{name or '(root)'}.{attr} (running statistics)"
                               for name, m in model.named_modules() if isinstance(m, _NormBase)
                               for attr, b in m._buffers.items() if b is not None]
        for name, module in model.named_modules():
            entries = _frozen_entries(module, candidates[name], pin, seen)
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
        self._plan: Optional[OffloadPlan] = None
        self._trace, self._recording, self._ring, self._held = [], True, None, {}
        self._in_forward = self._replan = False
        self._handles = [model.register_forward_pre_hook(self._start),
                         model.register_forward_hook(self._end)]
        for u in self.units:
            self._handles.append(u.module.register_forward_pre_hook(self._loader(u)))
            self._handles.append(u.module.register_forward_hook(self._unloader(u)))
        self._unit_ids = {id(u.module) for u in self.units}
        self._swap_hook = register_module_module_registration_hook(_swap_watcher(weakref.ref(self)))
        weakref.finalize(self, self._swap_hook.remove)

    @property
    def plan(self) -> OffloadPlan:
        """The plan; before the first forward, a pending one listing the units."""
        if self._plan is not None:
            return self._plan
        return OffloadPlan(device=str(self.device), max_resident_bytes=self.max_resident_bytes, depth=0,
                           bandwidth_gbps=math.nan, resident_bytes=0, ring_bytes=0,
                           streamed_bytes_per_forward=0, expected_copy_s=0.0, expected_exposed_s=0.0,
                           rows=[PlanRow(u.name, u.bytes, math.nan, math.nan, "not yet planned")
                                 for u in self.units if u.entries],
                           pending=True, kept_on_device=list(self.kept_on_device))

    def __deepcopy__(self, memo):
        raise TypeError("a model being offloaded cannot be deep-copied: call remove() on its Offloader "
                        "(peft_ext.offload()'s return value, or patch()'s report.offload) first, "
                        "copy, then offload() each copy")

    def __reduce_ex__(self, protocol):
        raise TypeError("a model being offloaded cannot be pickled: call remove() on its Offloader first "
                        "(the weights stay in host memory), or save its state_dict()")

    def _owns(self, module):
        return id(module) in self._unit_ids or any(id(m) in self._unit_ids for m in module.modules())

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _start(self, module, args):
        self._trace = []
        self._in_forward = True
        self._recording = self._plan is None
        if self._ring is None and self._plan is not None and self._streamed_order():
            items = [(i, [h for _, _, h in self.units[i].entries]) for i in self._streamed_order()]
            self._ring = Prefetcher(itertools.cycle(items), device=self.device, depth=self._plan.depth)

    def _streamed_order(self):
        return [i for i in self.order if not self.units[i].resident]

    def _loader(self, unit):
        def load(module, args):
            if not self._in_forward:  # backward recomputation (checkpointing): load now, not traced
                if not unit.resident and unit.entries:
                    unit.install([h.detach().to(self.device, copy=True) for _, _, h in unit.entries])
                return
            self._trace.append(unit.index)
            if unit.resident or not unit.entries:
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
            if unit.resident or not unit.entries:
                return
            t0 = self._held.pop(unit.index, None)
            if self._recording and t0 is not None and self._in_forward:
                self._sync()
                unit.compute_s = time.perf_counter() - t0
            self._keep_writes(unit)
            unit.restore()  # frozen: the device copy is dropped, never copied back
        return unload

    def _keep_writes(self, unit):
        """A forward wrote a tensor we stream: keep its new value on the
        device for good and re-plan (the ring still holds the old entries)."""
        written = unit.written() if unit.installed else []
        if not written:
            return
        names = [f"{unit.name}.{unit.entries[k][1]}" for k in written]
        log.warning("offload: the forward of %s writes %s; kept on the device from now on",
                    unit.name, ", ".join(names))
        self.kept_on_device += [f"{n} (written by its forward)" for n in names]
        unit.keep_on_device(written)
        self._drop_ring()
        self._replan = True

    def _end(self, module, args, output):
        self._in_forward = False
        if self._replan:
            self._replan = False
            self._drop_ring()
            self._plan, self.order = None, None
        elif self._recording:
            self.order = list(self._trace)  # a copy: later appends must not grow it
            self._make_plan()
        elif self._trace != self.order:
            log.info("offload: execution order changed; re-recording on the next forward")
            self._drop_ring()
            self._plan = None

    def _drop_ring(self):
        if self._ring is not None:
            self._ring.close()
            self._ring = None

    def _make_plan(self):
        used = [self.units[i] for i in dict.fromkeys(self.order) if self.units[i].entries]
        # Modules left with nothing to stream (what they own is kept on the device).
        empty = {i for i in self.order if not self.units[i].entries}
        for i in empty:
            self.units[i].resident = True
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
            exposed = self._exposure(copy_s, depth, resident=empty)
            resident, room = set(), budget - depth * largest
            pos = {i: p for p, i in reversed(list(enumerate(self.order)))}
            for u in sorted(used, key=lambda u: (-exposed[u.index] / max(u.bytes, 1), pos[u.index])):
                if u.bytes <= room:
                    resident.add(u.index)
                    room -= u.bytes
        for u in used:
            self._place(u, u.index in resident)
        resident |= empty
        streamed = [i for i in self.order if i not in resident]
        ring_bytes = depth * max((self.units[i].bytes for i in streamed), default=0)
        exposed = self._exposure(copy_s, max(depth, 1), resident)
        self._plan = OffloadPlan(
            kept_on_device=list(self.kept_on_device),
            device=str(self.device), max_resident_bytes=budget, depth=depth,
            bandwidth_gbps=bandwidth / 1e9,
            resident_bytes=sum(self.units[i].bytes for i in resident), ring_bytes=ring_bytes,
            streamed_bytes_per_forward=sum(self.units[i].bytes for i in streamed),
            expected_copy_s=sum(copy_s[i] for i in streamed),
            expected_exposed_s=sum(exposed[i] for i in streamed),
            rows=[PlanRow(u.name, u.bytes, copy_s[u.index] * 1e3, u.compute_s * 1e3,
                          "resident" if u.resident else "streamed") for u in used])
        log.info("offload plan:\n%s", self._plan)

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
            self._keep_writes(unit)  # a resident copy may have been written: keep that value
            unit.device_tensors = None
            unit.restore()
        unit.resident = resident

    def remove(self):
        """Stop streaming and remove the hooks; the frozen weights stay in host
        memory (tensors a forward wrote stay on the device). Idempotent."""
        self._drop_ring()
        self._swap_hook.remove()
        for h in self._handles:
            h.remove()
        self._handles = []
        for u in self.units:
            if u.installed:
                self._keep_writes(u)
            u.resident, u.device_tensors = False, None
            u.restore()
        self._replan, self._in_forward = False, False


def _swap_watcher(ref):
    """A global module-registration hook: replacing a module this Offloader
    streams (unpatch(), a user's setattr) would leave hooks on a module that
    is gone and the new one unmanaged, so the offloading is removed first."""
    def hook(parent, name, new):
        ctl = ref()
        old = parent._modules.get(name) if ctl is not None else None
        if old is not None and old is not new and ctl._owns(old):
            log.warning("offload: %s.%s (%s) was replaced; weight streaming removed, the weights are "
                        "in host memory (call offload() again)", type(parent).__name__, name,
                        type(old).__name__)
            ctl.remove()
        return None
    return hook


def offload(model: nn.Module, device=None, max_resident_bytes: Optional[int] = None,
            prefetch: int = 2, *, freeze: bool = False) -> Offloader:
    """Stream `model`'s frozen weights from host memory to `device` (default:
    the available accelerator, else the CPU), keeping at most
    max_resident_bytes of them there (default: 80% of the free device memory
    on CUDA; on the CPU everything, since host memory is the device's),
    prefetching up to `prefetch` layers ahead.

    Only frozen tensors stream (requires_grad=False, and buffers); freeze=True
    sets requires_grad=False on every parameter first. When most of the
    weights are trainable and so stay on the device, a UserWarning says so.
    A budget below the largest module's frozen bytes (one copy of it must fit
    to stream it) raises ValueError here, before anything moves.
    Returns the Offloader; its `plan` is made at the first forward (printing
    it before says so and lists the modules)."""
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1:
        raise ValueError(f"prefetch must be an int >= 1, got {prefetch!r}")
    if not isinstance(freeze, bool):
        raise ValueError(f"freeze must be True or False, got {freeze!r}")
    dev = resolve_device(device)  # None: prefetch.default_device()
    if max_resident_bytes is not None and (isinstance(max_resident_bytes, bool) or
                                           not isinstance(max_resident_bytes, int) or max_resident_bytes < 0):
        raise ValueError(f"max_resident_bytes must be an int >= 0, got {max_resident_bytes!r}")
    candidates = {name: _streamable(m, freeze) for name, m in model.named_modules()}
    seen, unit_bytes = set(), {}
    for name, entries in candidates.items():
        if entries:
            unit_bytes[name or "(root)"] = sum(_nbytes(t) for _, _, t in entries)
            seen.update((id(t), _nbytes(t)) for _, _, t in entries)
    streamable = sum(b for _, b in seen)
    if max_resident_bytes is None:
        max_resident_bytes = int(torch.cuda.mem_get_info(dev)[0] * 0.8) if dev.type == "cuda" else streamable
    if unit_bytes:
        largest = max(unit_bytes, key=unit_bytes.get)
        if max_resident_bytes < unit_bytes[largest] and max_resident_bytes < streamable:
            raise ValueError(f"max_resident_bytes={max_resident_bytes} cannot hold the largest module, {largest} "
                             f"({unit_bytes[largest]} bytes of frozen weights): streaming needs room for one "
                             f"copy of it; pass max_resident_bytes >= {unit_bytes[largest]}")
    trainable = {id(p): _nbytes(p) for p in model.parameters() if p.requires_grad} if not freeze else {}
    if sum(trainable.values()) > streamable:
        warnings.warn(f"offload(): only {human_bytes(streamable)} of the model's tensors are frozen and can "
                      f"stream; {human_bytes(sum(trainable.values()))} of parameters are trainable "
                      f"(requires_grad=True) and stay on {dev}. Freeze what should stream "
                      f"(model.requires_grad_(False), or offload(..., freeze=True)).", UserWarning, stacklevel=2)
    return Offloader(model, dev, int(max_resident_bytes), prefetch, freeze, candidates)
