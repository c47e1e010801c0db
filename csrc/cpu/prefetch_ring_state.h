// Internals of the prefetch ring shared by the worker and the consumer
// (csrc/cpu/prefetch_ring.cpp only): slots, their memory, the shared state.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <vector>

#include <ATen/ATen.h>

#include "prefetch_ring.h"

namespace peft_ext::prefetch {

using Clock = std::chrono::steady_clock;
// Waits wake on notify; the tick only bounds how long a missed wake-up lasts.
constexpr auto kTick = std::chrono::milliseconds(50);
constexpr size_t kAlign = 64;

inline size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }
inline double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Host staging of one slot, allocated at exactly the size asked for: pinned
// through the CUDA backend when asked and possible, plain memory otherwise.
struct HostBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  CudaBackend* pinned_by = nullptr;  // the backend that pinned it (frees it too)

  HostBuffer(size_t n, bool pin) : bytes(n) {
    const size_t alloc = std::max<size_t>(n, kAlign);
    CudaBackend* be = cuda_backend();
    if (pin && be != nullptr && be->device_available()) {
      ptr = be->host_alloc(alloc);
      pinned_by = be;
    } else if (posix_memalign(&ptr, kAlign, alloc) != 0) {
      ptr = nullptr;
    }
    TORCH_CHECK_WITH(OutOfMemoryError, ptr != nullptr, "prefetch ring: cannot allocate ", n,
                     " bytes of ", pin ? "pinned " : "", "host staging memory");
  }
  ~HostBuffer() {
    if (pinned_by != nullptr) {
      pinned_by->host_free(ptr);
    } else {
      std::free(ptr);
    }
  }
  bool pinned() const { return pinned_by != nullptr; }
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;
};

// What a slot's tensors point into; shared by the slot and the tensors handed
// out, so detached memory lives until the consumer lets go of it.
struct SlotMemory {
  std::unique_ptr<HostBuffer> host;
  // CPU ring with pinned host memory: recorded when the consumer's tensors
  // die (they may be the source of non_blocking copies still queued on the
  // GPU); the worker waits on it before it writes `host` again.
  std::unique_ptr<StreamFence> host_fence;
  // Declared last so it is destroyed first: it waits for the upload that
  // still reads `host`.
  std::unique_ptr<DeviceBuffer> device;

  SlotMemory() = default;
  SlotMemory(const SlotMemory&) = delete;
  SlotMemory& operator=(const SlotMemory&) = delete;
  ~SlotMemory() {
    device.reset();
    if (host_fence) {
      try {
        host_fence->wait();
      } catch (const std::exception&) {
        // Freeing pinned memory synchronises with the device anyway.
      }
    }
  }
};

struct Entry {
  at::ScalarType dtype;
  std::vector<int64_t> sizes;
  size_t offset;
  size_t bytes;
};

enum class Status { kFree, kFilling, kReady, kOut };

struct Slot {
  std::shared_ptr<SlotMemory> mem;
  Status status = Status::kFree;
  int64_t seq = -1;
  uint64_t gen = 0;  // bumped at each hand-out and detach; stale deleters see a mismatch
  size_t total = 0;
  std::vector<Entry> layout;
  std::vector<at::Tensor> uploading;  // pinned sources copied directly, kept until uploaded
  size_t held_bytes = 0;  // host + device memory the slot owns (stats)
};

struct Pending {
  int64_t seq;
  std::vector<at::Tensor> tensors;
};

struct State {
  std::mutex mu;
  std::condition_variable feed_cv;  // the feeder waits here for room in `input`
  std::condition_variable work_cv;  // the worker waits for input or a free slot
  std::condition_variable out_cv;   // the consumer (and stop()) wait for the worker
  c10::Device device{c10::kCPU};
  bool to_device = false;
  bool pin = false;
  std::vector<Slot> slots;
  std::deque<Pending> input;  // at most one batch waits here: memory stays bounded
  int64_t next_put = 0;
  int64_t next_get = 0;
  bool input_done = false;
  bool sync = false;  // put_sync() in use: the copies run on the feeder, the worker has exited
  bool stop = false;
  bool worker_exited = false;
  // Detached slot memory whose last tensor died: freed by the worker, since
  // freeing device memory waits for the GPU (never on the consumer's thread).
  std::vector<std::shared_ptr<SlotMemory>> graveyard;
  std::exception_ptr error;
  int64_t error_seq = -1;
  double copy_s = 0, h2d_s = 0, consumer_wait_s = 0, worker_wait_s = 0, put_wait_s = 0;
  int64_t bytes = 0, batches = 0, detached = 0, fence_waits = 0;
};

struct Handout {
  std::shared_ptr<State> state;
  std::shared_ptr<SlotMemory> mem;
  size_t slot;
  uint64_t gen;
};

}  // namespace peft_ext::prefetch
