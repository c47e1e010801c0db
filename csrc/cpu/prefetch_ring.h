// The prefetch ring's seam to CUDA. csrc/cpu/prefetch_ring.cpp holds the ring
// and its worker thread and needs no CUDA headers; csrc/cuda/prefetch_ring.cu
// registers a CudaBackend when the extension is built with CUDA. Without it,
// device="cuda" raises and host staging is plain (unpinned) memory.
#pragma once

#include <cstddef>
#include <memory>
#include <vector>

#include <c10/core/Device.h>

namespace peft_ext::prefetch {

// One host-to-device copy of a slot's upload: `bytes` from `host` to the
// device buffer at `offset`.
struct Copy {
  const void* host;
  size_t offset;
  size_t bytes;
};

// Device memory of one slot plus the events that order its use:
// `ready` (recorded on the side stream after the upload) and `released`
// (recorded on the consumer's stream when the consumer's tensors die).
class DeviceBuffer {
 public:
  // Waits for the consumer's last use and the last upload, then frees.
  virtual ~DeviceBuffer() = default;
  virtual void* data() = 0;
  virtual size_t bytes() const = 0;
  // Worker: on the side stream, wait for `released`, copy, record `ready`.
  virtual void upload(const std::vector<Copy>& copies) = 0;
  // Worker: block until the last upload finished reading host memory;
  // returns its duration in seconds (0 when there was none).
  virtual double wait_uploaded() = 0;
  // Consumer: make the current stream wait for `ready`, remember that stream.
  virtual void acquire() = 0;
  // Any thread (the consumer's tensors died): record `released` on the
  // stream remembered by acquire().
  virtual void release() = 0;
};

// A point in a CUDA stream's work, recorded when a pinned host slot of a CPU
// ring is released: the consumer may have queued `.cuda(non_blocking=True)`
// copies from the slot that the GPU has not run yet.
class StreamFence {
 public:
  virtual ~StreamFence() = default;
  // Blocks until the GPU passed the point (the copies read the slot).
  virtual void wait() = 0;
};

class CudaBackend {
 public:
  virtual ~CudaBackend() = default;
  virtual bool device_available() = 0;
  // Page-locked host memory of exactly `bytes` (no power-of-two rounding).
  virtual void* host_alloc(size_t bytes) = 0;
  virtual void host_free(void* ptr) = 0;
  virtual std::unique_ptr<DeviceBuffer> device_alloc(size_t bytes, c10::Device device) = 0;
  // A fence on the current CUDA stream of the calling thread's current device,
  // the stream torch runs a non_blocking copy on.
  virtual std::unique_ptr<StreamFence> record_fence() = 0;
  // Makes `device` the calling thread's current device (the ring's worker,
  // so that its allocations and events never create a context on GPU 0).
  virtual void set_device(c10::Device device) = 0;
};

// nullptr when the extension was built without CUDA.
CudaBackend* cuda_backend();
// Called once from a static initializer in csrc/cuda/prefetch_ring.cu.
void set_cuda_backend(CudaBackend* backend);

}  // namespace peft_ext::prefetch
