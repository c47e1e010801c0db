"""Prefetcher: overlaps producing and copying batches with the consumer's step.

    for batch in peft_ext.Prefetcher(loader):   # device: the accelerator, else CPU
        loss = model(batch)                      # batch already on the device

A Python feeder thread pulls batches from the iterable (that needs the GIL),
flattens them and copies their tensors into a fixed ring of `depth` slots
(csrc/cpu/prefetch_ring.cpp, `put_sync`: the copy runs on the feeder with the
GIL released and, on CUDA, starts the upload on a side stream). The source is
asked for its next batch only after the copy, so a loader that refills one
buffer is safe. The consumer receives tensors that point into a slot; the slot
is reused only once they are all gone, so keeping a batch is safe (the ring
then allocates a fresh slot instead of overwriting it). On the CPU the feeder
also takes the batch it copied out of the ring and queues it, finished, for
the consumer, which then gets it without calling into the ring (no GIL
release, no thread wake-up); a consumer that finds nothing queued waits in the
ring as before.
"""
import logging
import threading
import time
import weakref
from collections import deque

import torch
from torch.utils import _pytree as pytree

from . import _C  # noqa: F401  (registers torch.classes.peft_ext.PrefetchRing)
from . import ops

log = logging.getLogger(__name__)

# The consumer waits in slices this long so that Ctrl-C reaches Python.
_POLL_MS = 100
# Bounded shutdown: how long close() waits for the ring's worker thread.
_STOP_MS = 5000
# How long close() (also at interpreter exit and on Ctrl-C) waits for the
# feeder. A feeder inside a source that blocks is abandoned: it is a daemon
# thread, holds no lock, and ends on its own once the source returns (the
# stopped ring refuses its batch), closing the source then.
_JOIN_S = 0.2


class _Shared:
    """What the feeder thread shares with the consumer. The feeder never holds
    the Prefetcher itself, so dropping the Prefetcher lets GC stop it."""

    __slots__ = ("rebuild", "error", "source_s", "lock", "ready", "taken")

    def __init__(self):
        self.rebuild = deque()
        self.error = None
        self.source_s = 0.0
        # Taking a batch out of the ring (ring.next plus its rebuild info) is
        # done under `lock`, by a consumer or, on the CPU, by the feeder right
        # after its copy: it then queues the finished batch in `ready`, where
        # the consumer picks it up without a call into the ring (no GIL
        # release, no wake-up). `taken` counts batches taken out of the ring.
        self.lock = threading.Lock()
        self.ready = deque()
        self.taken = 0


def default_device() -> torch.device:
    """The available accelerator (torch.accelerator) when peft_ext can use it,
    else the CPU. peft_ext's ring supports CUDA only; another accelerator, or
    a GPU with a CPU-only build, falls back to the CPU with a warning."""
    acc = getattr(torch, "accelerator", None)
    if acc is not None:
        kind = acc.current_accelerator().type if acc.is_available() else "cpu"
    else:
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda" and ops.build_info().get("cuda") == "1":
        return torch.device("cuda", torch.cuda.current_device())
    if kind != "cpu":
        log.warning("a %s accelerator is available but peft_ext%s cannot use it; using the CPU",
                    kind, " (built without CUDA)" if kind == "cuda" else "")
    return torch.device("cpu")


def resolve_device(device) -> torch.device:
    if device is None:
        return default_device()
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but no CUDA device is available")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    return dev


def _unfaithful(t):
    """Why copying `t` into a slot would change what it means (None if not)."""
    if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
        return (f"a tensor subclass ({type(t).__name__}) would arrive as a plain tensor; "
                "pass its plain data")
    if t.is_quantized:
        return (f"a quantized tensor ({t.dtype}) would lose its quantizer; pass "
                "t.dequantize() or t.int_repr() with its scale and zero point")
    if t.is_nested:
        return "a nested tensor has no single dense layout; pass its components (t.unbind())"
    if t.layout != torch.strided:
        return f"a sparse tensor ({t.layout}) would lose its structure; pass its index and value tensors"
    return None


def _refuse(batch, seq, leaf_index, why):
    if leaf_index is None:
        where = "<the batch itself>"
    else:
        where = pytree.keystr(pytree.tree_flatten_with_path(batch)[0][leaf_index][0]) or "<root>"
    raise TypeError(f"Prefetcher cannot copy batch {seq}, leaf {where}: {why}")


def _prepare(t):
    # The ring copies raw memory; a lazily conjugated or negated view would
    # arrive without its conj / neg bit applied.
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    return t


# Leaves of a flat dict / list / tuple batch that pytree would not descend
# into: such a batch (the common {"x": ..., "y": ..., "i": 3}) is flattened
# without pytree, which costs several microseconds a batch.
_PLAIN_LEAVES = frozenset({torch.Tensor, int, float, bool, str, bytes, complex, type(None)})


def _flatten_flat(batch):
    """(leaves, spec) in pytree's order for a flat dict / list / tuple of
    plain leaves, else None. spec is (container type, keys or None)."""
    kind = type(batch)
    if kind is dict:
        leaves = list(batch.values())
        spec = (dict, list(batch))
    elif kind is list or kind is tuple:
        leaves = list(batch)
        spec = (kind, None)
    else:
        return None
    plain = _PLAIN_LEAVES
    for leaf in leaves:
        if type(leaf) not in plain:
            return None
    return leaves, spec


def _flatten(batch, device, seq):
    """(tensors the ring copies, how to rebuild the batch). Tensors already on
    the target device and non-tensor leaves stay in the rebuild info."""
    if type(batch) is torch.Tensor and (device.type == "cpu" or batch.is_cpu):
        why = _unfaithful(batch)
        if why is not None:
            _refuse(batch, seq, None, why)
        return [_prepare(batch)], None
    if isinstance(batch, torch.Tensor):
        why = _unfaithful(batch)
        if why is not None:
            _refuse(batch, seq, None, why)
    flat = _flatten_flat(batch)
    leaves, spec = flat if flat is not None else pytree.tree_flatten(batch)
    idx, tensors = [], []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor) and (device.type == "cpu" or leaf.device != device):
            why = _unfaithful(leaf)
            if why is not None:
                _refuse(batch, seq, i, why)
            idx.append(i)
            tensors.append(_prepare(leaf))
            leaves[i] = None  # the ring's copy replaces it; do not keep the source alive
    return tensors, (leaves, spec, idx)


def _rebuild(rebuild, tensors):
    if rebuild is None:
        return tensors[0]
    leaves, spec, idx = rebuild
    for i, t in zip(idx, tensors):
        leaves[i] = t
    if type(spec) is tuple:  # from _flatten_flat
        kind, keys = spec
        if kind is dict:
            return dict(zip(keys, leaves))
        return leaves if kind is list else tuple(leaves)
    return pytree.tree_unflatten(leaves, spec)


def _feed(ring, it, shared, device, threads):
    # A new thread starts with OpenMP's default team size, not the caller's
    # torch.set_num_threads(): the source's torch ops would then oversubscribe
    # the cores and spin (seconds per batch on 2 cores). Use the caller's.
    torch.set_num_threads(threads)
    # put_sync copies the batch into its slot on this thread before returning:
    # the source may then reuse its buffers, and no worker wake-up sits
    # between the source and the consumer.
    put, take, lock, ready = ring.put_sync, ring.next, shared.lock, shared.ready
    # On CUDA the consumer takes every batch itself: taking one makes the
    # taker's current stream wait for the upload, and that must be the
    # consumer's stream.
    feeder_takes = device.type == "cpu"
    seq = 0
    try:
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            shared.source_s += time.perf_counter() - t0
            tensors, rebuild = _flatten(batch, device, seq)
            del batch
            shared.rebuild.append(rebuild)
            if not put(tensors):
                break
            tensors = None  # copied; do not pin the source's batch here
            seq += 1
            # A consumer blocked in the ring holds the lock and takes this
            # batch itself; otherwise take it now, unless one already did.
            if feeder_takes and lock.acquire(False):
                try:
                    if shared.taken == seq - 1:
                        status, out = take(0)
                        if status == 0:
                            shared.taken += 1
                            ready.append(_rebuild(shared.rebuild.popleft(), out))
                            out = None  # the slot is free once the consumer drops the batch
                finally:
                    lock.release()
    except BaseException as e:  # noqa: B036  delivered to the consumer, in order
        shared.error = e
    finally:
        ring.finish()
        close = getattr(it, "close", None)
        if callable(close):
            try:
                close()
            except Exception:
                log.exception("closing the source iterator failed")


def _shutdown(ring, thread, shared):
    shared.ready.clear()  # batches taken but never asked for: free their slots
    if not ring.stop(_STOP_MS):
        log.warning("prefetch worker did not stop within %d ms; left to finish on its own", _STOP_MS)
    if thread is not threading.current_thread():
        thread.join(_JOIN_S)
        if thread.is_alive():
            log.info("prefetch feeder is still inside the source's __next__; it ends when that "
                     "call returns")


class Prefetcher:
    """Iterate `iterable` with its batches produced, copied (and moved to
    `device`) ahead of the consumer, at most `depth` batches in flight.

    device: None (default: the available accelerator, see default_device(),
        else the CPU), "cuda" (batches arrive on the current GPU, on the
        current stream) or "cpu" (batches arrive in host slots; with
        pin_memory and a GPU they are pinned, ready for a non_blocking copy).
    Batches may be tensors or nested tuples/lists/dicts of tensors; other
    leaves pass through untouched. Order is kept; each batch arrives once,
    also when several threads consume one Prefetcher (each next() hands one
    whole batch to one thread). A batch is copied before the source is asked
    for the next one, so a source may refill one buffer. Conjugate and
    negative views arrive resolved; quantized, sparse and nested tensors and
    tensor subclasses are refused (TypeError naming the batch and leaf), as
    their copy would not mean the same.
    An exception from the source (or the copy) is raised here, after the
    batches before it, with its original type and traceback. Early break,
    close(), leaving a `with` block, garbage collection, interpreter exit and
    Ctrl-C stop it within a bounded time, also while the source blocks
    (the feeder is then left to end when the source returns). Note that a
    for loop keeps the previous batch while asking for the next one, so
    depth=1 allocates a fresh slot for every batch.
    The source runs on a feeder thread with the caller's torch.get_num_threads();
    for CPU overlap split the cores, e.g. torch.set_num_threads(cores // 2).
    """

    def __init__(self, iterable, device=None, depth=2, pin_memory=True, progress=False):
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an int >= 1, got {depth!r}")
        self.device = resolve_device(device)
        try:
            self._len = len(iterable)
        except TypeError:
            self._len = None
        self._ring = torch.classes.peft_ext.PrefetchRing(str(self.device), depth, bool(pin_memory))
        self._next = self._ring.next
        self._shared = _Shared()
        # One consumer at a time takes a batch and its rebuild info together.
        self._lock = self._shared.lock
        thread = threading.Thread(target=_feed, name="peft_ext-prefetch-feeder", daemon=True,
                                  args=(self._ring, iter(iterable), self._shared, self.device,
                                        torch.get_num_threads()))
        thread.start()
        self._finalizer = weakref.finalize(self, _shutdown, self._ring, thread, self._shared)
        self._closed = False
        self._count = 0
        self._wait_s = 0.0
        self._t_first = self._t_last = None
        self._bar = None
        if progress:
            # Lazy: tqdm.auto probes for IPython/Jupyter, too slow for `import peft_ext`.
            from tqdm.auto import tqdm  # noqa: PLC0415

            self._bar = tqdm(total=self._len, unit="batch", desc="prefetch")
            self._bar_t = time.perf_counter()

    def __iter__(self):
        return self

    def __len__(self):
        if self._len is None:
            raise TypeError("the source iterable has no len()")
        return self._len

    def __next__(self):
        with self._lock:
            if self._closed:
                raise StopIteration
            t0 = time.perf_counter()
            if self._t_first is None:
                self._t_first = t0
            shared = self._shared
            if shared.ready:
                batch = shared.ready.popleft()
            else:
                try:
                    status, tensors = self._next(_POLL_MS)
                    while status == 1:
                        status, tensors = self._next(_POLL_MS)
                except BaseException:
                    self.close()
                    raise
                if status == 2:
                    error, shared.error = shared.error, None
                    self.close()
                    if error is not None:
                        raise error
                    raise StopIteration
                rebuild = shared.rebuild.popleft()
                shared.taken += 1
                batch = None
            t1 = time.perf_counter()
            self._wait_s += t1 - t0
            self._count += 1
            self._t_last = t1
            if self._bar is not None:
                self._tick()
        return _rebuild(rebuild, tensors) if batch is None else batch

    def _tick(self):
        self._bar.update(1)
        if self._t_last - self._bar_t > 0.5:
            self._bar_t = self._t_last
            s = self.stats()
            self._bar.set_postfix(GBps=f"{s['bytes'] / max(s['elapsed_s'], 1e-9) / 1e9:.2f}",
                                  overlap=f"{s['overlap']:.2f}", refresh=False)

    def stats(self) -> dict:
        """Counters so far:
        batches delivered; bytes copied; copy_gbps (host staging) and h2d_gbps
        (host to device, CUDA); consumer_wait_s, the seconds next() spent
        waiting for batches it delivered (the wait that ends in
        StopIteration, e.g. a DataLoader shutting down, is not counted);
        elapsed_s, from the first next() call to the last batch delivered;
        overlap = 1 - consumer_wait_s / elapsed_s, in [0, 1]: 1.0 when every
        batch was ready when asked for, near 0 when the consumer did nothing
        but wait (NaN before the first batch); worker_wait_s, the seconds the
        copy waited for a free slot; source_s, the seconds spent in the
        source's __next__; slot_bytes, memory the slots hold; detached, how
        many times a slot gave its memory to a batch the consumer kept."""
        r = dict(self._ring.stats())
        elapsed = (self._t_last - self._t_first) if self._t_last is not None else 0.0
        wait = min(self._wait_s, elapsed)
        return {
            "batches": self._count,
            "bytes": int(r["bytes"]),
            "copy_gbps": r["bytes"] / r["copy_s"] / 1e9 if r["copy_s"] > 0 else float("nan"),
            "h2d_gbps": r["bytes"] / r["h2d_s"] / 1e9 if r["h2d_s"] > 0 else float("nan"),
            "consumer_wait_s": wait,
            "worker_wait_s": r["worker_wait_s"],
            "source_s": self._shared.source_s,
            "elapsed_s": elapsed,
            "overlap": min(1.0, max(0.0, 1.0 - wait / elapsed)) if elapsed > 0 else float("nan"),
            "detached": int(r["detached"]),
            "slot_bytes": int(r["slot_bytes"]),
        }

    def close(self):
        """Stop the feeder and the copy (bounded waits). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._finalizer()
        if self._bar is not None:
            self._bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
