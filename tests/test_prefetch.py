"""Prefetcher and the C++ prefetch ring: order, exactly-once delivery, nested
batches, faults, shutdown (break, close, with, GC, Ctrl-C), bounded memory."""
import _thread
import gc
import os
import random
import subprocess
import sys
import threading
import time
import traceback
from collections import namedtuple

import pytest
import torch

import peft_ext
from peft_ext import Prefetcher

from helpers import requires_cuda

Pair = namedtuple("Pair", "x meta")


def os_threads():
    return len(os.listdir("/proc/self/task"))


def settled_os_threads(expected, timeout=2.0):
    """The OS thread count, polled until it reaches `expected`: a joined thread
    may take a moment to leave /proc after Python's join() returns."""
    deadline = time.monotonic() + timeout
    while os_threads() != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return os_threads()


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def tagged(i, n, dtype=torch.float32):
    """A batch whose every value says which batch it is."""
    return torch.full((n,), float(i), dtype=dtype) + torch.arange(n, dtype=dtype) * 1e-3


def check(i, t, n):
    assert t.shape == (n,) and torch.equal(t, tagged(i, n, t.dtype)), f"batch {i} is wrong"


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_order_exactly_once_random_sizes(depth):
    rng = random.Random(depth)
    sizes = [rng.choice([0, 1, 3, 17, 257, rng.randrange(1, 40_000)]) for _ in range(2000)]
    seen = []
    for i, b in enumerate(Prefetcher((tagged(i, n) for i, n in enumerate(sizes)), device="cpu",
                                     depth=depth)):
        check(i, b, sizes[i])
        seen.append(i)
    assert seen == list(range(len(sizes)))


def test_kept_batches_stay_intact():
    # The consumer keeps every batch: slots must be detached, never overwritten.
    rng = random.Random(1)
    sizes = [rng.randrange(1, 5000) for _ in range(300)]
    p = Prefetcher((tagged(i, n) for i, n in enumerate(sizes)), device="cpu", depth=2)
    kept = list(p)
    for i, b in enumerate(kept):
        check(i, b, sizes[i])
    assert p.stats()["detached"] >= len(sizes) - 2


def test_slots_sized_exactly_and_grow_only():
    # 1000 floats take 4000 bytes, padded to 4032 (64-byte alignment); the one
    # 3000-float batch grows only its own slot, to 12032 bytes, not 16 KiB.
    sizes = [1000] * 6 + [3000] + [1000] * 6
    p = Prefetcher((torch.ones(n) for n in sizes), device="cpu", depth=2)
    assert [b.numel() for b in p] == sizes
    assert p.stats()["slot_bytes"] == 4032 + 12032 and p.stats()["detached"] == 0


def test_nested_structures_and_passthrough():
    def source():
        gen = torch.Generator().manual_seed(0)
        for i in range(50):
            x = torch.randn(3, 1 + i % 7, dtype=torch.float64, generator=gen)
            nc = torch.arange(40, dtype=torch.int16).reshape(5, 8).t()  # non-contiguous
            yield {"x": x, "pair": Pair(x[:, ::2], meta=f"id{i}"),
                   "list": [nc, i, None, (torch.tensor(i % 2 == 0), 2.5)],
                   "i": i, "empty": torch.empty(0, 4)}

    ref = list(source())
    got_all = list(Prefetcher(source(), device="cpu"))
    assert len(got_all) == len(ref)
    for got, want in zip(got_all, ref):
        assert got["i"] == want["i"] and got["pair"].meta == want["pair"].meta
        assert isinstance(got["pair"], Pair)
        assert got["list"][1:3] == want["list"][1:3] and got["list"][3][1] == 2.5
        for a, b in [(got["x"], want["x"]), (got["pair"].x, want["pair"].x),
                     (got["list"][0], want["list"][0]), (got["list"][3][0], want["list"][3][0]),
                     (got["empty"], want["empty"])]:
            assert a.dtype == b.dtype and a.shape == b.shape and a.is_contiguous()
            assert torch.equal(a, b)
            assert a.data_ptr() != b.data_ptr() or a.numel() == 0  # a copy in the ring


def test_flat_batches_keep_their_container_and_order():
    # Flat dicts, lists and tuples take a fast path around pytree; containers
    # pytree handles differently (OrderedDict, namedtuple, nested) do not.
    from collections import OrderedDict
    x, y = torch.arange(3.0), torch.arange(4)
    batches = [{"b": x, "a": 1, "c": None, "d": "s"}, [x, 2.5, y], (y, True, x), (x,), [], {},
               OrderedDict(z=x, a=y), Pair(x, "m"), {"x": [x, y]}, {"t": (x, 1)}]
    got = list(Prefetcher(batches, device="cpu"))
    for g, w in zip(got, batches):
        assert type(g) is type(w)
        flat_g, spec_g = torch.utils._pytree.tree_flatten(g)
        flat_w, spec_w = torch.utils._pytree.tree_flatten(w)
        assert spec_g == spec_w and len(flat_g) == len(flat_w)
        for a, b in zip(flat_g, flat_w):
            assert torch.equal(a, b) if isinstance(b, torch.Tensor) else a == b
    assert list(got[0]) == ["b", "a", "c", "d"] and list(got[6]) == ["z", "a"]


def test_len_and_stats():
    data = [torch.randn(1000) for _ in range(20)]
    p = Prefetcher(data, device="cpu")
    assert len(p) == 20
    out = list(p)
    assert all(torch.equal(a, b) for a, b in zip(out, data))
    s = p.stats()
    assert s["batches"] == 20 and s["bytes"] == 20 * 4000
    assert s["copy_gbps"] > 0 and 0 <= s["consumer_wait_s"] and s["overlap"] <= 1
    with pytest.raises(TypeError):
        len(Prefetcher(iter(data), device="cpu"))


def test_progress_bar(capsys):
    out = list(Prefetcher([torch.ones(2)] * 5, device="cpu", progress=True))
    assert len(out) == 5
    assert "5/5" in capsys.readouterr().err


class Boom(Exception):
    pass


def failing_source(k):
    for i in range(100):
        if i == k:
            raise Boom(f"source failed at {i}")
        yield tagged(i, 10)


@pytest.mark.parametrize("k", [0, 1, 7])
def test_source_exception_after_earlier_batches(k):
    got = []
    with pytest.raises(Boom, match=f"source failed at {k}") as info:
        for b in Prefetcher(failing_source(k), device="cpu"):
            got.append(int(b[0]))
    assert got == list(range(k))
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert "failing_source" in frames  # the source's own frame survives the thread hop


def test_worker_exceptions_keep_type():
    # The worker cannot read a meta tensor (ValueError) nor allocate 2**62
    # bytes of staging for an expanded view (torch.OutOfMemoryError).
    def source(bad):
        yield torch.ones(3)
        yield bad

    it = Prefetcher(source(torch.empty(3, device="meta")), device="cpu")
    assert torch.equal(next(it), torch.ones(3))
    with pytest.raises(ValueError, match="prefetch worker, copying batch 1"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)
    huge = torch.zeros(1).expand(2**60)
    with pytest.raises(torch.OutOfMemoryError, match="staging"):
        list(Prefetcher(source(huge), device="cpu"))


def test_bad_arguments():
    with pytest.raises(ValueError, match="depth"):
        Prefetcher([], device="cpu", depth=0)
    with pytest.raises(ValueError, match="device"):
        Prefetcher([], device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            Prefetcher([], device="cuda")


def endless(n=4096):
    i = 0
    while True:
        yield torch.full((n,), float(i))
        i += 1


def test_early_break_close_with_gc_no_leak():
    for _ in range(20):  # warm up allocator, thread stacks, lazy imports
        for _ in Prefetcher(endless(), device="cpu"):
            break
    gc.collect()
    threads, py_threads, rss = os_threads(), threading.active_count(), rss_bytes()
    t0 = time.perf_counter()
    for i in range(1000):
        kind = i % 4
        if kind == 0:
            for b in Prefetcher(endless(), device="cpu"):
                break
        elif kind == 1:
            p = Prefetcher(endless(), device="cpu")
            next(p)
            p.close()
        elif kind == 2:
            with Prefetcher(endless(), device="cpu") as p:
                next(p), next(p)
        else:
            Prefetcher(endless(), device="cpu")  # dropped unused: GC ends it
    gc.collect()
    assert time.perf_counter() - t0 < 60
    assert settled_os_threads(threads) == threads and threading.active_count() == py_threads
    assert rss_bytes() - rss < 64 * 2**20


def test_ctrl_c_while_waiting_stops_worker():
    def slow():
        while True:
            time.sleep(0.05)
            yield torch.ones(4)

    threads = os_threads()
    p = Prefetcher(slow(), device="cpu")
    next(p)
    timer = threading.Timer(0.2, _thread.interrupt_main)
    t0 = time.perf_counter()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        while True:
            next(p)
    timer.join()
    assert time.perf_counter() - t0 < 2
    assert p._closed
    del p
    gc.collect()
    assert settled_os_threads(threads) == threads


def test_overlap_hides_producer_behind_step():
    # Producing a batch and a step each release the GIL for 20 ms: prefetched,
    # they overlap, so 10 batches take well under the 400 ms of a plain loop.
    def source():
        for i in range(10):
            time.sleep(0.02)
            yield torch.full((8,), float(i))

    t0 = time.perf_counter()
    for b in Prefetcher(source(), device="cpu"):
        time.sleep(0.02)
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.34, elapsed


def test_pin_copies_exactly():
    t = torch.randn(5, 3)[:, 1]
    p = torch.classes.peft_ext.PrefetchRing.pin(t)
    assert torch.equal(p, t) and p.is_contiguous() and p.data_ptr() != t.data_ptr()
    assert p.is_pinned() == torch.cuda.is_available()


# --- Sources and consumers as users bring them (issue 9 #6, #7, #20; issue 12) ---


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_source_refilling_one_buffer(depth):
    # A loader that reuses its output buffer (buf.fill_(i); yield buf) must get
    # every batch as it was when yielded: the copy happens before the source is
    # asked for the next batch. A large buffer makes a late copy race the refill.
    n = 200_000

    def refill():
        buf, small = torch.empty(n), torch.empty(3, dtype=torch.int64)
        for i in range(60):
            buf.fill_(i)
            small.fill_(i)
            yield {"x": buf, "view": buf[::1000], "small": small, "i": i}

    got = [(b["i"], b["x"].min().item(), b["x"].max().item(), b["view"][0].item(), b["small"].tolist())
           for b in Prefetcher(refill(), device="cpu", depth=depth)]
    assert got == [(i, i, i, i, [i] * 3) for i in range(60)]


@pytest.mark.cuda
@requires_cuda
def test_cuda_pinned_source_refilling_one_buffer():
    # A pinned source is uploaded straight from its memory: the upload must be
    # finished before the source refills it.
    buf = torch.empty(1 << 22).pin_memory()

    def refill():
        for i in range(40):
            buf.fill_(i)
            yield buf

    for i, b in enumerate(Prefetcher(refill(), device="cuda")):
        torch.cuda._sleep(200_000)  # a busy consumer stream lets a late upload show
        assert b.is_cuda and bool((b == i).all()), i


def test_concurrent_consumers_never_mix_batches():
    # Several threads draining one Prefetcher: every batch arrives exactly once,
    # its tensors and its non-tensor leaves still belonging together.
    n, nthreads = 3000, 4

    def source():
        for i in range(n):
            yield {"x": torch.full((1 + i % 5,), float(i)), "id": i, "pair": (torch.tensor(i), str(i))}

    p = Prefetcher(source(), device="cpu", depth=2)
    seen, bad, errors = [[] for _ in range(nthreads)], [], []

    def consume(k):
        try:
            for b in p:
                i = b["id"]
                if not (bool((b["x"] == i).all()) and int(b["pair"][0]) == i and b["pair"][1] == str(i)):
                    bad.append(i)
                seen[k].append(i)
        except BaseException as e:  # noqa: B036  reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=consume, args=(k,)) for k in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not bad
    assert sorted(i for s in seen for i in s) == list(range(n))
    assert all(s == sorted(s) for s in seen)  # each thread sees batches in order
    assert p.stats()["batches"] == n


def test_conjugate_and_negative_views_arrive_resolved():
    z = torch.randn(4, 3, dtype=torch.complex64)
    r = torch.randn(6)
    batches = [z.conj(), {"c": z.conj()[:, 1], "n": torch._neg_view(r), "zc": torch._neg_view(z.conj())}]
    got = list(Prefetcher(batches, device="cpu"))
    assert not got[0].is_conj() and torch.equal(got[0], z.conj().resolve_conj())
    assert torch.equal(got[1]["c"], z.conj()[:, 1].resolve_conj())
    assert not got[1]["n"].is_neg() and torch.equal(got[1]["n"], -r)
    assert torch.equal(got[1]["zc"].resolve_neg().resolve_conj(), -z.conj().resolve_conj())
    assert not got[1]["zc"].is_conj() and not got[1]["zc"].is_neg()


class TaggedTensor(torch.Tensor):
    pass


@pytest.mark.parametrize("kind", ["quantized", "sparse_coo", "sparse_csr", "nested", "subclass"])
def test_refuses_what_it_cannot_copy_faithfully(kind):
    make = {
        "quantized": lambda: torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8),
        "sparse_coo": lambda: torch.eye(3).to_sparse(),
        "sparse_csr": lambda: torch.eye(3).to_sparse_csr(),
        "nested": lambda: torch.nested.nested_tensor([torch.randn(2), torch.randn(3)]),
        "subclass": lambda: torch.randn(3).as_subclass(TaggedTensor),
    }[kind]
    batches = [{"x": torch.ones(2)}, {"x": torch.ones(2), "extra": [1, make()]}]
    it = Prefetcher(batches, device="cpu")
    assert torch.equal(next(it)["x"], torch.ones(2))  # the batch before still arrives
    with pytest.raises(TypeError, match=r"batch 1, leaf \['extra'\]\[1\]") as info:
        next(it)
    assert kind.split("_")[0] in str(info.value)
    with pytest.raises(TypeError, match="batch 0, leaf <the batch itself>"):
        list(Prefetcher([make()], device="cpu"))


def blocked_source(release, first=True):
    if first:
        yield torch.ones(2)
    release.wait(60)  # a loader stuck on I/O
    yield torch.ones(2)


def test_close_with_blocked_source_is_bounded():
    release = threading.Event()
    p = Prefetcher(blocked_source(release), device="cpu")
    next(p)
    time.sleep(0.05)  # the feeder is now inside the source
    t0 = time.perf_counter()
    p.close()
    closed_in = time.perf_counter() - t0
    release.set()
    assert closed_in < 1.0, closed_in


def test_ctrl_c_with_blocked_source_is_bounded():
    release = threading.Event()
    p = Prefetcher(blocked_source(release, first=False), device="cpu")
    timer = threading.Timer(0.2, _thread.interrupt_main)
    t0 = time.perf_counter()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            next(p)
        stopped_in = time.perf_counter() - t0
    finally:
        timer.join()
        release.set()
    assert p._closed and stopped_in < 1.2, stopped_in


def test_blocked_source_does_not_delay_exit(tmp_path):
    # Time from the script's last line to the process being gone, with a
    # Prefetcher whose source blocks for a minute against none at all (torch's
    # own teardown takes seconds on a loaded machine). It used to add 5 s.
    script = tmp_path / "blocked.py"
    script.write_text(
        "import sys, time, torch, peft_ext\n"
        "def src():\n"
        "    yield torch.ones(2)\n"
        "    time.sleep(60)\n"
        "    yield torch.ones(2)\n"
        "if sys.argv[1] == 'blocked':\n"
        "    p = peft_ext.Prefetcher(src(), device='cpu')\n"
        "    next(p)\n"
        "    time.sleep(0.05)\n"
        "print(time.time(), flush=True)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(peft_ext.__file__)), os.environ.get("PYTHONPATH", "")]))

    def exit_delay(mode):
        out = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True,
                             env=env, timeout=120)
        exited = time.time()
        assert out.returncode == 0, out.stderr
        return exited - float(out.stdout.split()[-1])

    plain, blocked = exit_delay("plain"), exit_delay("blocked")
    assert blocked - plain < 2.0, (plain, blocked)


def test_default_device_is_the_available_accelerator():
    acc = getattr(torch, "accelerator", None)
    on_gpu = (acc is not None and acc.is_available() and acc.current_accelerator().type == "cuda"
              and peft_ext.ops.build_info().get("cuda") == "1")
    p = Prefetcher([torch.arange(3)] * 2)
    assert p.device.type == ("cuda" if on_gpu else "cpu")
    assert [b.cpu().tolist() for b in p] == [[0, 1, 2]] * 2


class SlowEnd(torch.utils.data.IterableDataset):
    """Batches at `produce_s` each, then a slow end (a DataLoader joining its
    workers, a file closing): the end must not count as waiting for a batch."""

    def __init__(self, n, produce_s, end_s):
        self.n, self.produce_s, self.end_s = n, produce_s, end_s

    def __iter__(self):
        for i in range(self.n):
            time.sleep(self.produce_s)
            yield torch.full((4,), float(i))
        time.sleep(self.end_s)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_overlap_stays_in_unit_interval_with_dataloader(num_workers):
    # Consumer-bound: the step (20 ms) hides production (1 ms): overlap near 1.
    loader = torch.utils.data.DataLoader(SlowEnd(10, 0.001, 0.4), batch_size=None,
                                         num_workers=num_workers)
    p = Prefetcher(loader, device="cpu")
    for b in p:
        time.sleep(0.02)
    s = p.stats()
    assert s["batches"] == 10 and 0.0 <= s["overlap"] <= 1.0
    if num_workers == 0:  # a worker process's start-up is waiting too, of any length
        assert s["overlap"] > 0.6, s
    # Producer-bound: the consumer mostly waits: overlap near 0, never below.
    p = Prefetcher(torch.utils.data.DataLoader(SlowEnd(6, 0.03, 0.2), batch_size=None), device="cpu")
    for b in p:
        pass
    s = p.stats()
    assert 0.0 <= s["overlap"] < 0.4, s
    assert s["consumer_wait_s"] <= s["elapsed_s"]


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("pinned_source", [False, True])
def test_cuda_order_and_values(pinned_source):
    rng = random.Random(0)
    sizes = [rng.randrange(1, 300_000) for _ in range(200)]

    def source():
        for i, n in enumerate(sizes):
            t = tagged(i, n)
            yield {"x": t.pin_memory() if pinned_source else t, "i": i}

    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # batches must be ready on the consumer's stream
        for i, b in enumerate(Prefetcher(source(), device="cuda")):
            assert b["x"].is_cuda and b["i"] == i
            torch.cuda._sleep(100_000)  # keep the GPU busy so reuse races would show
            check(i, b["x"].cpu(), sizes[i])
    torch.cuda.synchronize()


@pytest.mark.cuda
@requires_cuda
def test_cuda_kept_batches_and_device_passthrough():
    dev = torch.device("cuda", torch.cuda.current_device())
    on_gpu = torch.arange(5, device=dev)
    data = [(tagged(i, 1000 + i), on_gpu) for i in range(50)]
    kept = list(Prefetcher(data, device="cuda", depth=2))
    for i, (x, g) in enumerate(kept):
        assert g is on_gpu
        check(i, x.cpu(), 1000 + i)


# --- issue 10: pinned CPU slots are fenced.


@pytest.fixture
def fake_gpu():
    """The C++ stand-in CUDA backend: "pinned" slots are plain memory and each
    release records a fence that stays pending until the test completes it."""
    hook = torch.ops.peft_ext._prefetch_fake_gpu
    hook("complete")
    hook("install")
    yield hook
    hook("complete")
    hook("uninstall")


def test_pinned_cpu_slot_is_not_refilled_while_its_fence_is_pending(fake_gpu):
    # depth 1: batch 1 can only go into the slot that batch 0 was handed out in.
    ring = torch.classes.peft_ext.PrefetchRing("cpu", 1, True)
    n = 4096
    try:
        assert ring.put([tagged(0, n)]) and ring.put([tagged(1, n)])
        status, (b0,) = ring.next(5000)
        assert status == 0
        check(0, b0, n)
        recorded = fake_gpu("recorded")
        del b0  # the consumer's non_blocking copy from it may still be queued
        assert fake_gpu("recorded") == recorded + 1 and fake_gpu("pending") == 1
        # The worker must wait on the fence instead of overwriting the slot.
        deadline = time.monotonic() + 5
        while fake_gpu("waiting") == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fake_gpu("waiting") == 1
        status, _ = ring.next(200)
        assert status == 1, "the slot was refilled while the GPU could still read it"
        fake_gpu("complete")
        status, (b1,) = ring.next(5000)
        assert status == 0
        check(1, b1, n)
        assert ring.stats()["fence_waits"] == 1
        del b1
    finally:
        ring.finish()
        ring.stop(5000)


def test_unpinned_cpu_ring_records_no_fence(fake_gpu):
    before = fake_gpu("recorded")
    batches = list(Prefetcher((tagged(i, 100) for i in range(20)), device="cpu", pin_memory=False))
    for i, b in enumerate(batches):
        check(i, b, 100)
    del batches
    assert fake_gpu("recorded") == before


def test_detached_slot_memory_is_freed_by_the_worker(fake_gpu):
    # Keeping every batch makes the ring detach each slot; the last tensor of
    # a detached slot is dropped here, and its memory (with the fence, which
    # the worker waits on) goes back to the worker instead of blocking us.
    ring = torch.classes.peft_ext.PrefetchRing("cpu", 1, True)
    try:
        kept = []
        for i in range(3):
            assert ring.put([tagged(i, 64)])
            status, (b,) = ring.next(5000)
            assert status == 0
            kept.append(b)
        assert ring.stats()["detached"] == 2
        t0 = time.monotonic()
        kept.clear()  # fences stay pending: freeing here would block for 30 s
        assert time.monotonic() - t0 < 1.0
    finally:
        fake_gpu("complete")
        ring.finish()
        ring.stop(5000)


@pytest.mark.cuda
@requires_cuda
def test_cuda_pinned_cpu_ring_survives_queued_non_blocking_copies():
    # The documented pattern: a CPU ring with pinned slots, each batch sent
    # with .cuda(non_blocking=True) and dropped at once. The GPU is kept busy
    # so the copies are still queued when the slot is released: without the
    # fence the worker would overwrite the pinned bytes under them.
    n = 1 << 20
    outs = []
    for i, b in enumerate(Prefetcher((tagged(i, n) for i in range(40)), device="cpu", depth=2,
                                     pin_memory=True)):
        torch.cuda._sleep(2_000_000)
        outs.append(b.cuda(non_blocking=True))
        del b
    torch.cuda.synchronize()
    for i, o in enumerate(outs):
        check(i, o.cpu(), n)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_ring_on_second_gpu_creates_no_context_on_the_first():
    import subprocess
    import sys

    code = (
        "import torch, peft_ext\n"
        "from peft_ext import Prefetcher\n"
        "for b in Prefetcher((torch.ones(1000) * i for i in range(5)), device='cuda:1'):\n"
        "    assert b.device.index == 1\n"
        "print(torch._C._cuda_hasPrimaryContext(0))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"
