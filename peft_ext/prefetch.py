"""Prefetcher: overlaps producing and copying batches with the consumer's step.

    for batch in peft_ext.Prefetcher(loader, device="cuda"):
        loss = model(batch)          # batch already on the GPU

A Python feeder thread pulls batches from the iterable (that needs the GIL)
and flattens them; the C++ ring (csrc/cpu/prefetch_ring.cpp) copies their
tensors into a fixed ring of `depth` slots on its own thread and, on CUDA,
uploads them on a side stream. The consumer receives tensors that point into a
slot; the slot is reused only once they are all gone, so keeping a batch is
safe (the ring then allocates a fresh slot instead of overwriting it).
"""
import logging
import threading
import time
import weakref
from collections import deque

import torch
from torch.utils import _pytree as pytree

from . import _C  # noqa: F401  (registers torch.classes.peft_ext.PrefetchRing)

log = logging.getLogger(__name__)

# The consumer waits in slices this long so that Ctrl-C reaches Python.
_POLL_MS = 100
# Bounded shutdown: how long close() waits for the worker and the feeder.
_STOP_MS = 5000


class _Shared:
    """What the feeder thread shares with the consumer. The feeder never holds
    the Prefetcher itself, so dropping the Prefetcher lets GC stop it."""

    __slots__ = ("rebuild", "error", "source_s")

    def __init__(self):
        self.rebuild = deque()
        self.error = None
        self.source_s = 0.0


def _resolve_device(device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but no CUDA device is available")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    return dev


def _flatten(batch, device):
    """(tensors the ring copies, how to rebuild the batch). Tensors already on
    the target device and non-tensor leaves stay in the rebuild info."""
    if isinstance(batch, torch.Tensor) and (device.type == "cpu" or batch.is_cpu):
        return [batch], None
    leaves, spec = pytree.tree_flatten(batch)
    idx = [i for i, leaf in enumerate(leaves)
           if isinstance(leaf, torch.Tensor) and (device.type == "cpu" or leaf.device != device)]
    tensors = [leaves[i] for i in idx]
    for i in idx:
        leaves[i] = None  # the ring's copy replaces it; do not keep the source alive
    return tensors, (leaves, spec, idx)


def _feed(ring, it, shared, device, threads):
    # A new thread starts with OpenMP's default team size, not the caller's
    # torch.set_num_threads(): the source's torch ops would then oversubscribe
    # the cores and spin (seconds per batch on 2 cores). Use the caller's.
    torch.set_num_threads(threads)
    put = ring.put
    try:
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            shared.source_s += time.perf_counter() - t0
            tensors, rebuild = _flatten(batch, device)
            del batch
            shared.rebuild.append(rebuild)
            if not put(tensors):
                break
            tensors = None  # the ring holds them now; do not pin one more batch here
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


def _shutdown(ring, thread):
    if not ring.stop(_STOP_MS):
        log.warning("prefetch worker did not stop within %d ms; left to finish on its own", _STOP_MS)
    if thread is not threading.current_thread():
        thread.join(_STOP_MS / 1000)
        if thread.is_alive():
            log.warning("prefetch feeder is still inside the source's __next__; left as a daemon")


class Prefetcher:
    """Iterate `iterable` with its batches produced, copied (and moved to
    `device`) ahead of the consumer, at most `depth` batches in flight.

    device: "cuda" (batches arrive on the current GPU, on the current stream)
        or "cpu" (batches arrive in host slots; with pin_memory they are
        pinned, ready for a non_blocking copy).
    Batches may be tensors or nested tuples/lists/dicts of tensors; other
    leaves pass through untouched. Order is kept; each batch arrives once.
    An exception from the source (or the worker) is raised here, after the
    batches before it, with its original type and traceback. Early break,
    close(), leaving a `with` block, garbage collection and Ctrl-C stop the
    worker. Note that a for loop keeps the previous batch while asking for the
    next one, so depth=1 allocates a fresh slot for every batch.
    The source runs on a feeder thread with the caller's torch.get_num_threads();
    for CPU overlap split the cores, e.g. torch.set_num_threads(cores // 2).
    """

    def __init__(self, iterable, device="cuda", depth=2, pin_memory=True, progress=False):
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an int >= 1, got {depth!r}")
        self.device = _resolve_device(device)
        try:
            self._len = len(iterable)
        except TypeError:
            self._len = None
        self._ring = torch.classes.peft_ext.PrefetchRing(str(self.device), depth, bool(pin_memory))
        self._next = self._ring.next
        self._shared = _Shared()
        thread = threading.Thread(target=_feed, name="peft_ext-prefetch-feeder", daemon=True,
                                  args=(self._ring, iter(iterable), self._shared, self.device,
                                        torch.get_num_threads()))
        thread.start()
        self._finalizer = weakref.finalize(self, _shutdown, self._ring, thread)
        self._closed = False
        self._count = 0
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
        if self._closed:
            raise StopIteration
        if self._t_first is None:
            self._t_first = time.perf_counter()
        try:
            status, tensors = self._next(_POLL_MS)
            while status == 1:
                status, tensors = self._next(_POLL_MS)
        except BaseException:
            self.close()
            raise
        if status == 2:
            error, self._shared.error = self._shared.error, None
            self.close()
            if error is not None:
                raise error
            raise StopIteration
        rebuild = self._shared.rebuild.popleft()
        if rebuild is None:
            batch = tensors[0]
        else:
            leaves, spec, idx = rebuild
            for i, t in zip(idx, tensors):
                leaves[i] = t
            batch = pytree.tree_unflatten(leaves, spec)
        self._count += 1
        self._t_last = time.perf_counter()
        if self._bar is not None:
            self._tick()
        return batch

    def _tick(self):
        self._bar.update(1)
        if self._t_last - self._bar_t > 0.5:
            self._bar_t = self._t_last
            s = self.stats()
            self._bar.set_postfix(GBps=f"{s['bytes'] / max(s['elapsed_s'], 1e-9) / 1e9:.2f}",
                                  overlap=f"{s['overlap']:.2f}", refresh=False)

    def stats(self) -> dict:
        """bytes moved, copy GB/s (host staging, and host-to-device on CUDA),
        seconds the consumer and the worker waited, seconds spent in the
        source, overlap = 1 - consumer wait / consumer wall time (1.0: data
        was always ready), memory the slots hold (slot_bytes) and how many
        times a slot gave its memory to a batch the consumer kept (detached)."""
        r = dict(self._ring.stats())
        elapsed = (self._t_last - self._t_first) if self._t_last is not None else 0.0
        return {
            "batches": self._count,
            "bytes": int(r["bytes"]),
            "copy_gbps": r["bytes"] / r["copy_s"] / 1e9 if r["copy_s"] > 0 else float("nan"),
            "h2d_gbps": r["bytes"] / r["h2d_s"] / 1e9 if r["h2d_s"] > 0 else float("nan"),
            "consumer_wait_s": r["consumer_wait_s"],
            "worker_wait_s": r["worker_wait_s"],
            "source_s": self._shared.source_s,
            "elapsed_s": elapsed,
            "overlap": 1.0 - r["consumer_wait_s"] / elapsed if elapsed > 0 else float("nan"),
            "detached": int(r["detached"]),
            "slot_bytes": int(r["slot_bytes"]),
        }

    def close(self):
        """Stop the worker and the feeder (bounded waits). Idempotent."""
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
