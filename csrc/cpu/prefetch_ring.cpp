// The prefetch ring: a fixed ring of slots filled, in order, by one C++ worker
// thread (put) or by the feeder's own thread (put_sync; the worker then
// exits), and handed to the consumer as tensors that point into the slot.
// A slot returns to the ring when the last of its tensors dies (a storage
// deleter), so the consumer can never see a slot overwritten under it; if the
// consumer still holds a slot the worker needs, the slot gives that memory to
// the consumer and allocates afresh ("detached"). All waits are timed and
// check a stop flag; worker errors reach the consumer in batch order. Each
// side waits on its own condition variable so a hand-off wakes one thread.
// Exposed to Python as torch.classes.peft_ext.PrefetchRing (peft_ext/prefetch.py).
#include "prefetch_ring.h"
#include "prefetch_ring_state.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>

#include <ATen/ATen.h>
#include <c10/util/Logging.h>
#include <torch/custom_class.h>
#include <torch/library.h>

namespace peft_ext::prefetch {

namespace {
// Atomic: the test hook swaps it while worker threads may read it.
std::atomic<CudaBackend*> g_backend{nullptr};
}  // namespace

CudaBackend* cuda_backend() { return g_backend.load(); }
void set_cuda_backend(CudaBackend* backend) { g_backend.store(backend); }

namespace {

// Runs when the last tensor of a hand-out dies, on whatever thread drops it.
// Device slots record their `released` event; pinned host slots of a CPU ring
// record a fence on the current stream (the consumer's non_blocking copies
// from them may still be queued), which the worker waits on before refilling.
// The writes to *h->mem happen before the slot is marked free under the lock,
// and the worker reads them only after it saw the slot free under that lock.
void release_handout(void* ctx) {
  std::unique_ptr<Handout> h(static_cast<Handout*>(ctx));
  try {
    SlotMemory& mem = *h->mem;
    if (mem.device) {
      mem.device->release();
    } else if (mem.host && mem.host->pinned()) {
      mem.host_fence = mem.host->pinned_by->record_fence();
    }
  } catch (const std::exception& e) {
    LOG(WARNING) << "prefetch ring: recording the release event failed: " << e.what();
  }
  State& s = *h->state;
  std::shared_ptr<SlotMemory> free_here;
  {
    std::lock_guard<std::mutex> lk(s.mu);
    Slot& slot = s.slots[h->slot];
    if (slot.gen == h->gen && slot.status == Status::kOut) {
      slot.status = Status::kFree;
      s.work_cv.notify_all();
    } else if (slot.mem != h->mem) {
      // Detached memory: its last user is gone. The worker frees it (that
      // waits for the GPU); once the worker has exited, it is freed here.
      if (s.worker_exited) {
        free_here = std::move(h->mem);
      } else {
        s.graveyard.push_back(std::move(h->mem));
        s.work_cv.notify_all();
      }
    }
  }
}

// Copies one batch into `slot` (owned by the worker while kFilling) and, on a
// device, starts its upload. Returns the seconds spent copying on the host.
double fill(State& s, Slot& slot, const Pending& p) {
  std::vector<Entry> layout;
  size_t total = 0;
  for (size_t i = 0; i < p.tensors.size(); ++i) {
    const at::Tensor& t = p.tensors[i];
    TORCH_CHECK_TYPE(t.layout() == at::kStrided, "batch tensor ", i, " has layout ", t.layout(),
                     "; only dense tensors can be prefetched");
    TORCH_CHECK_VALUE(!t.is_meta() && t.has_storage(), "batch tensor ", i, " on ", t.device(),
                      " has no data to copy");
    const size_t nbytes = static_cast<size_t>(t.numel()) * t.element_size();
    layout.push_back({t.scalar_type(), t.sizes().vec(), total, nbytes});
    total += align_up(nbytes);
  }
  if (!slot.mem) slot.mem = std::make_shared<SlotMemory>();
  SlotMemory& mem = *slot.mem;
  if (mem.host_fence) {
    // Pinned CPU slot: the GPU may still read it for the consumer's copies.
    const auto t0 = Clock::now();
    mem.host_fence->wait();
    mem.host_fence.reset();
    std::lock_guard<std::mutex> lk(s.mu);
    s.worker_wait_s += seconds_since(t0);
    s.fence_waits += 1;
  }
  if (mem.device) {
    // The last upload from this slot read its staging (or pinned sources).
    s.h2d_s += mem.device->wait_uploaded();
    slot.uploading.clear();
  }
  if (s.to_device && (!mem.device || mem.device->bytes() < total)) {
    mem.device.reset();  // waits for the consumer's last use before freeing
    mem.device = cuda_backend()->device_alloc(total, s.device);
  }
  std::vector<bool> direct(p.tensors.size(), false);
  bool staged = !s.to_device;
  for (size_t i = 0; i < p.tensors.size(); ++i) {
    const at::Tensor& t = p.tensors[i];
    direct[i] = s.to_device && t.is_cpu() && t.is_contiguous() && t.is_pinned();
    staged = staged || !direct[i];
  }
  if (staged && (!mem.host || mem.host->bytes < total)) {
    mem.host.reset();
    mem.host = std::make_unique<HostBuffer>(total, s.pin);
  }
  const auto t0 = Clock::now();
  std::vector<Copy> copies;
  bool last_staged = false;
  for (size_t i = 0; i < p.tensors.size(); ++i) {
    const at::Tensor& t = p.tensors[i];
    const Entry& e = layout[i];
    if (e.bytes == 0) continue;
    if (direct[i]) {
      // Already pinned: the device copies straight from it, no staging hop.
      copies.push_back({t.const_data_ptr(), e.offset, e.bytes});
      slot.uploading.push_back(t);
      last_staged = false;
      continue;
    }
    char* dst = static_cast<char*>(mem.host->ptr) + e.offset;
    if (t.is_cpu() && t.is_contiguous()) {
      std::memcpy(dst, t.const_data_ptr(), e.bytes);
    } else {
      at::from_blob(dst, e.sizes, at::TensorOptions().dtype(e.dtype)).copy_(t);
    }
    if (last_staged) {
      copies.back().bytes = e.offset + e.bytes - copies.back().offset;  // one copy for neighbours
    } else {
      copies.push_back({dst, e.offset, e.bytes});
    }
    last_staged = true;
  }
  const double host_s = seconds_since(t0);
  if (s.to_device && !copies.empty()) mem.device->upload(copies);
  slot.total = total;
  slot.layout = std::move(layout);
  return host_s;
}

// Frees detached memory handed back by release_handout (outside the lock).
void drain_graveyard(State& s, std::unique_lock<std::mutex>& lk) {
  while (!s.graveyard.empty()) {
    std::vector<std::shared_ptr<SlotMemory>> dead;
    dead.swap(s.graveyard);
    lk.unlock();
    dead.clear();
    lk.lock();
  }
}

void worker_main(std::shared_ptr<State> s) {
  at::NoGradGuard no_grad;  // copies of batches are data, never part of a graph
  try {
    // The ring's device, not GPU 0: pinned allocations, device buffers and
    // events of this thread belong to it.
    if (s->to_device) cuda_backend()->set_device(s->device);
  } catch (...) {
    std::lock_guard<std::mutex> lk(s->mu);
    s->error = std::current_exception();
    s->error_seq = 0;
    s->worker_exited = true;
    s->feed_cv.notify_all();
    s->out_cv.notify_all();
    return;
  }
  for (;;) {
    Pending p;
    size_t idx = 0;
    {
      std::unique_lock<std::mutex> lk(s->mu);
      // With put_sync() the worker has nothing to do: it exits rather than
      // wake at every slot release (detached memory is then freed where its
      // last tensor dies).
      for (;;) {
        drain_graveyard(*s, lk);
        if (s->stop || !s->input.empty() || s->input_done || s->sync) break;
        s->work_cv.wait_for(lk, kTick);
      }
      if (s->stop || s->input.empty()) break;
      p = std::move(s->input.front());
      s->input.pop_front();
      s->feed_cv.notify_all();
      idx = static_cast<size_t>(p.seq) % s->slots.size();
      const auto t0 = Clock::now();
      while (!s->stop && s->slots[idx].status != Status::kFree) {
        s->work_cv.wait_for(lk, kTick);
        drain_graveyard(*s, lk);
      }
      s->worker_wait_s += seconds_since(t0);
      if (s->stop) break;
      s->slots[idx].status = Status::kFilling;
    }
    Slot& slot = s->slots[idx];
    double host_s = 0;
    try {
      host_s = fill(*s, slot, p);
    } catch (c10::Error& e) {
      e.add_context("in the prefetch worker, copying batch " + std::to_string(p.seq));
      std::lock_guard<std::mutex> lk(s->mu);
      s->error = std::current_exception();
      s->error_seq = p.seq;
      break;
    } catch (...) {
      std::lock_guard<std::mutex> lk(s->mu);
      s->error = std::current_exception();
      s->error_seq = p.seq;
      break;
    }
    std::lock_guard<std::mutex> lk(s->mu);
    slot.status = Status::kReady;
    slot.seq = p.seq;
    s->copy_s += host_s;
    s->batches += 1;
    for (const Entry& e : slot.layout) s->bytes += static_cast<int64_t>(e.bytes);
    slot.held_bytes = (slot.mem->host ? slot.mem->host->bytes : 0) +
                      (slot.mem->device ? slot.mem->device->bytes() : 0);
    s->out_cv.notify_all();
  }
  std::unique_lock<std::mutex> lk(s->mu);
  s->worker_exited = true;
  drain_graveyard(*s, lk);
  s->feed_cv.notify_all();
  s->out_cv.notify_all();
}

std::vector<int64_t> contiguous_strides(const std::vector<int64_t>& sizes) {
  std::vector<int64_t> strides(sizes.size());
  int64_t st = 1;
  for (size_t i = sizes.size(); i-- > 0;) {
    strides[i] = st;
    st *= std::max<int64_t>(sizes[i], 1);
  }
  return strides;
}

}  // namespace

class PrefetchRing : public torch::CustomClassHolder {
 public:
  PrefetchRing(std::string device, int64_t depth, bool pin_memory) {
    TORCH_CHECK_VALUE(depth >= 1, "depth must be at least 1, got ", depth);
    const c10::Device dev(device);
    TORCH_CHECK_VALUE(dev.is_cpu() || (dev.is_cuda() && dev.has_index()),
                      "device must be \"cpu\" or \"cuda:<index>\", got \"", device, "\"");
    if (dev.is_cuda()) {
      TORCH_CHECK_VALUE(cuda_backend() != nullptr,
                        "device=\"cuda\" but peft_ext was built without CUDA");
      TORCH_CHECK_VALUE(cuda_backend()->device_available(),
                        "device=\"cuda\" but no CUDA device is available");
    }
    state_ = std::make_shared<State>();
    state_->device = dev;
    state_->to_device = dev.is_cuda();
    state_->pin = pin_memory || dev.is_cuda();
    state_->slots.resize(static_cast<size_t>(depth));
    worker_ = std::thread(worker_main, state_);
  }

  ~PrefetchRing() override { stop(5000); }

  // Feeder side: queue one batch; blocks while the worker is behind. False
  // once the ring was stopped or the worker failed.
  bool put(std::vector<at::Tensor> tensors) {
    std::unique_lock<std::mutex> lk(state_->mu);
    TORCH_CHECK(!state_->input_done, "put() after finish()");
    const auto t0 = Clock::now();
    while (!state_->stop && !state_->error && !state_->input.empty())
      state_->feed_cv.wait_for(lk, kTick);
    state_->put_wait_s += seconds_since(t0);
    if (state_->stop || state_->error) return false;
    state_->input.push_back({state_->next_put++, std::move(tensors)});
    state_->work_cv.notify_all();
    return true;
  }

  // Feeder side, instead of put(): copies the batch into its slot on the
  // calling thread (waiting, like the worker, for the slot to be free), then
  // marks it ready. On return the source's tensors are no longer read (a
  // pinned source uploaded directly is waited for), so the caller may refill
  // them; and no worker wake-up sits between the feeder and the consumer.
  // False once the ring was stopped or a copy failed (the consumer gets the
  // error in batch order). Use either put() or put_sync() on one ring.
  bool put_sync(std::vector<at::Tensor> tensors) {
    State& s = *state_;
    // The feeder's thread, like the worker, must allocate and copy on the
    // ring's device, not on whatever device that thread defaults to.
    if (s.to_device) cuda_backend()->set_device(s.device);
    Pending p;
    size_t idx = 0;
    {
      std::unique_lock<std::mutex> lk(s.mu);
      TORCH_CHECK(!s.input_done, "put_sync() after finish()");
      if (s.stop || s.error) return false;
      if (!s.sync) {
        s.sync = true;
        s.work_cv.notify_all();
      }
      p.seq = s.next_put++;
      p.tensors = std::move(tensors);
      idx = static_cast<size_t>(p.seq) % s.slots.size();
      const auto t0 = Clock::now();
      while (!s.stop && s.slots[idx].status != Status::kFree) s.work_cv.wait_for(lk, kTick);
      s.worker_wait_s += seconds_since(t0);
      if (s.stop) return false;
      s.slots[idx].status = Status::kFilling;
    }
    Slot& slot = s.slots[idx];
    double host_s = 0, h2d_s = 0;
    try {
      at::NoGradGuard no_grad;
      host_s = fill(s, slot, p);
      if (!slot.uploading.empty()) h2d_s = slot.mem->device->wait_uploaded();
    } catch (c10::Error& e) {
      e.add_context("in the prefetch worker, copying batch " + std::to_string(p.seq));
      std::lock_guard<std::mutex> lk(s.mu);
      s.error = std::current_exception();
      s.error_seq = p.seq;
      s.out_cv.notify_all();
      return false;
    } catch (...) {
      std::lock_guard<std::mutex> lk(s.mu);
      s.error = std::current_exception();
      s.error_seq = p.seq;
      s.out_cv.notify_all();
      return false;
    }
    std::lock_guard<std::mutex> lk(s.mu);
    slot.status = Status::kReady;
    slot.seq = p.seq;
    s.copy_s += host_s;
    s.h2d_s += h2d_s;
    s.batches += 1;
    for (const Entry& e : slot.layout) s.bytes += static_cast<int64_t>(e.bytes);
    slot.held_bytes = (slot.mem->host ? slot.mem->host->bytes : 0) +
                      (slot.mem->device ? slot.mem->device->bytes() : 0);
    s.out_cv.notify_all();
    return !s.stop;
  }

  // Feeder side: no more batches.
  void finish() {
    std::lock_guard<std::mutex> lk(state_->mu);
    state_->input_done = true;
    state_->work_cv.notify_all();
    state_->out_cv.notify_all();  // with put_sync() no worker is left to tell the consumer
  }

  // Consumer side: (0, tensors) for the next batch, (1, []) when nothing came
  // within timeout_ms, (2, []) at the end or after stop(); rethrows a worker
  // error once the batches before it were delivered.
  std::tuple<int64_t, std::vector<at::Tensor>> next(int64_t timeout_ms) {
    State& s = *state_;
    std::shared_ptr<SlotMemory> mem, detached;
    size_t idx = 0, total = 0;
    uint64_t gen = 0;
    std::vector<Entry> layout;
    {
      std::unique_lock<std::mutex> lk(s.mu);
      const auto t0 = Clock::now();
      const auto deadline = t0 + std::chrono::milliseconds(std::max<int64_t>(timeout_ms, 0));
      idx = static_cast<size_t>(s.next_get) % s.slots.size();
      Slot& slot = s.slots[idx];
      for (;;) {
        if (slot.status == Status::kReady && slot.seq == s.next_get) break;
        if (s.error && s.error_seq <= s.next_get) {
          s.consumer_wait_s += seconds_since(t0);
          std::rethrow_exception(s.error);
        }
        if (s.stop || (s.worker_exited && (!s.sync || s.input_done))) {
          s.consumer_wait_s += seconds_since(t0);
          return {2, {}};
        }
        if (slot.status == Status::kOut) {
          // The consumer still holds the batch that used this slot and the
          // worker needs the slot now: the consumer keeps that memory.
          detached = std::move(slot.mem);
          slot.gen += 1;
          slot.status = Status::kFree;
          s.detached += 1;
          slot.held_bytes = 0;
          s.work_cv.notify_all();
        }
        const auto now = Clock::now();
        if (now >= deadline) {
          s.consumer_wait_s += seconds_since(t0);
          return {1, {}};
        }
        s.out_cv.wait_until(lk, std::min(deadline, now + kTick));
      }
      s.consumer_wait_s += seconds_since(t0);
      slot.status = Status::kOut;
      slot.gen += 1;
      gen = slot.gen;
      mem = slot.mem;
      layout = slot.layout;
      total = slot.total;
      s.next_get += 1;
    }
    if (mem->device) mem->device->acquire();
    void* base = mem->device ? mem->device->data() : mem->host->ptr;
    const c10::Device dev = mem->device ? s.device : c10::Device(c10::kCPU);
    auto* ctx = new Handout{state_, mem, idx, gen};
    c10::Storage storage(c10::Storage::use_byte_size_t(), static_cast<int64_t>(total),
                         c10::DataPtr(base, ctx, &release_handout, dev), nullptr, false);
    std::vector<at::Tensor> out;
    out.reserve(layout.size());
    for (const Entry& e : layout) {
      const auto opts = at::TensorOptions().dtype(e.dtype).device(dev);
      const int64_t offset = static_cast<int64_t>(e.offset / c10::elementSize(e.dtype));
      out.push_back(at::empty({0}, opts).set_(storage, offset, e.sizes, contiguous_strides(e.sizes)));
    }
    return {0, std::move(out)};
  }

  // Stops the worker and waits for it at most timeout_ms; true if it ended.
  bool stop(int64_t timeout_ms) {
    std::deque<Pending> dropped;
    bool exited = true;
    {
      std::unique_lock<std::mutex> lk(state_->mu);
      state_->stop = true;
      state_->feed_cv.notify_all();
      state_->work_cv.notify_all();
      state_->out_cv.notify_all();
      if (worker_.joinable()) {
        exited = state_->out_cv.wait_for(lk, std::chrono::milliseconds(std::max<int64_t>(timeout_ms, 0)),
                                     [&] { return state_->worker_exited; });
      }
      dropped.swap(state_->input);
    }
    if (worker_.joinable()) {
      if (exited) {
        worker_.join();
      } else {
        // Stuck in a copy; it owns a reference to the state and ends on its own.
        LOG(WARNING) << "prefetch ring: worker did not stop within " << timeout_ms << " ms";
        worker_.detach();
      }
    }
    return exited;
  }

  c10::Dict<std::string, double> stats() {
    std::lock_guard<std::mutex> lk(state_->mu);
    c10::Dict<std::string, double> d;
    d.insert("batches", static_cast<double>(state_->batches));
    d.insert("bytes", static_cast<double>(state_->bytes));
    d.insert("copy_s", state_->copy_s);
    d.insert("h2d_s", state_->h2d_s);
    d.insert("consumer_wait_s", state_->consumer_wait_s);
    d.insert("worker_wait_s", state_->worker_wait_s);
    d.insert("put_wait_s", state_->put_wait_s);
    d.insert("detached", static_cast<double>(state_->detached));
    d.insert("fence_waits", static_cast<double>(state_->fence_waits));
    size_t held = 0;
    for (const Slot& slot : state_->slots) held += slot.held_bytes;
    d.insert("slot_bytes", static_cast<double>(held));
    return d;
  }

  // An exact-size pinned copy of a CPU tensor (torch's pinned allocator
  // rounds up to powers of two); a contiguous copy when pinning is impossible.
  static at::Tensor pin(const at::Tensor& t) {
    TORCH_CHECK_VALUE(t.is_cpu(), "pin: tensor must be on the CPU, got ", t.device());
    CudaBackend* be = cuda_backend();
    if (be == nullptr || !be->device_available()) return t.contiguous().clone();
    const size_t nbytes = std::max<size_t>(static_cast<size_t>(t.numel()) * t.element_size(), 1);
    at::NoGradGuard no_grad;
    void* p = be->host_alloc(nbytes);
    at::Tensor out = at::from_blob(
        p, t.sizes(), [be](void* q) { be->host_free(q); }, t.options());
    out.copy_(t);
    return out;
  }

 private:
  std::shared_ptr<State> state_;
  std::thread worker_;
};

namespace {

// A stand-in CUDA backend for tests on machines without a GPU: "pinned"
// memory is plain memory, and a fence stays pending until the test says the
// GPU finished (`complete`), so a test can check that the worker never
// refills a released pinned slot while its fence is pending.
struct FakeGpu {
  std::mutex mu;
  std::condition_variable cv;
  int64_t recorded = 0, completed = 0, waiting = 0;
};

FakeGpu& fake_gpu() {
  static FakeGpu g;
  return g;
}

class FakeFence final : public StreamFence {
 public:
  explicit FakeFence(int64_t ticket) : ticket_(ticket) {}
  void wait() override {
    FakeGpu& g = fake_gpu();
    std::unique_lock<std::mutex> lk(g.mu);
    g.waiting += 1;
    // Bounded, so that a broken test cannot hang the worker forever.
    g.cv.wait_for(lk, std::chrono::seconds(30), [&] { return g.completed >= ticket_; });
    g.waiting -= 1;
  }

 private:
  int64_t ticket_;
};

class FakeBackend final : public CudaBackend {
 public:
  bool device_available() override { return true; }
  void* host_alloc(size_t bytes) override {
    void* p = nullptr;
    TORCH_CHECK_WITH(OutOfMemoryError, posix_memalign(&p, kAlign, bytes) == 0, "fake host_alloc failed");
    return p;
  }
  void host_free(void* ptr) override { std::free(ptr); }
  std::unique_ptr<DeviceBuffer> device_alloc(size_t, c10::Device) override {
    TORCH_CHECK(false, "the fake CUDA backend has no device memory");
    return nullptr;
  }
  std::unique_ptr<StreamFence> record_fence() override {
    FakeGpu& g = fake_gpu();
    std::lock_guard<std::mutex> lk(g.mu);
    return std::make_unique<FakeFence>(++g.recorded);
  }
  void set_device(c10::Device) override {}
};

// Test hook (torch.ops.peft_ext._prefetch_fake_gpu): "install" swaps the fake
// backend in, "uninstall" restores the real one (or none), "complete" lets
// every recorded fence pass; all return the fences recorded so far, except
// "pending" (recorded minus completed) and "waiting" (threads blocked in wait).
int64_t prefetch_fake_gpu(std::string action) {
  static FakeBackend fake;
  static CudaBackend* real = nullptr;
  static bool installed = false;
  FakeGpu& g = fake_gpu();
  if (action == "install") {
    if (!installed) real = cuda_backend();
    installed = true;
    set_cuda_backend(&fake);
  } else if (action == "uninstall") {
    if (installed) set_cuda_backend(real);
    installed = false;
  } else if (action == "complete") {
    std::lock_guard<std::mutex> lk(g.mu);
    g.completed = g.recorded;
    g.cv.notify_all();
  } else {
    std::lock_guard<std::mutex> lk(g.mu);
    if (action == "pending") return g.recorded - g.completed;
    if (action == "waiting") return g.waiting;
    TORCH_CHECK_VALUE(action == "recorded", "unknown action \"", action, "\"");
  }
  std::lock_guard<std::mutex> lk(g.mu);
  return g.recorded;
}

}  // namespace

void register_prefetch_ring(torch::Library& m) {
  m.def("_prefetch_fake_gpu(str action) -> int", &prefetch_fake_gpu);
  m.class_<PrefetchRing>("PrefetchRing")
      .def(torch::init<std::string, int64_t, bool>())
      .def("put", &PrefetchRing::put)
      .def("put_sync", &PrefetchRing::put_sync)
      .def("finish", &PrefetchRing::finish)
      .def("next", &PrefetchRing::next)
      .def("stop", &PrefetchRing::stop)
      .def("stats", &PrefetchRing::stats)
      .def_static("pin", &PrefetchRing::pin);
}

}  // namespace peft_ext::prefetch
