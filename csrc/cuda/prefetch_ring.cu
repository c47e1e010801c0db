// The CUDA half of the prefetch ring (csrc/cpu/prefetch_ring.cpp): exact-size
// pinned host memory, and per-slot device buffers whose host-to-device copies
// run on a side stream. Reuse is ordered by events, never by record_stream:
// `ready` is recorded after the copy and waited on by the consumer's stream;
// `released` is recorded on the consumer's stream when its tensors die and
// waited on (on the side stream) before the next copy into the slot. Pinned
// slots of a CPU ring get a fence on the consumer's current stream when
// released (record_fence), waited on by the worker before it refills them.
#include <cuda_runtime.h>

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../cpu/prefetch_ring.h"

namespace peft_ext::prefetch {
namespace {

class CudaDeviceBuffer final : public DeviceBuffer {
 public:
  CudaDeviceBuffer(size_t bytes, c10::Device device)
      : device_(device),
        bytes_(bytes),
        side_(c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device.index())) {
    c10::cuda::CUDAGuard guard(device_);
    try {
      // Blocking-sync events: the worker sleeps in cudaEventSynchronize
      // instead of spinning a core the consumer may need.
      C10_CUDA_CHECK(cudaEventCreateWithFlags(&start_, cudaEventBlockingSync));
      C10_CUDA_CHECK(cudaEventCreateWithFlags(&ready_, cudaEventBlockingSync));
      C10_CUDA_CHECK(
          cudaEventCreateWithFlags(&released_, cudaEventBlockingSync | cudaEventDisableTiming));
      // Allocated on the side stream, which writes it; freed only after both
      // events completed (destructor), so no other stream's use is outstanding.
      data_ = c10::cuda::CUDACachingAllocator::raw_alloc_with_stream(std::max<size_t>(bytes, 1),
                                                                     side_.stream());
    } catch (...) {
      free_all();  // a throwing constructor runs no destructor
      throw;
    }
  }

  ~CudaDeviceBuffer() override {
    c10::cuda::CUDAGuard guard(device_);
    if (released_recorded_) C10_CUDA_CHECK_WARN(cudaEventSynchronize(released_));
    if (uploaded_) C10_CUDA_CHECK_WARN(cudaEventSynchronize(ready_));
    free_all();
  }

  void* data() override { return data_; }
  size_t bytes() const override { return bytes_; }

  void upload(const std::vector<Copy>& copies) override {
    c10::cuda::CUDAGuard guard(device_);
    const cudaStream_t side = side_.stream();
    if (released_recorded_) C10_CUDA_CHECK(cudaStreamWaitEvent(side, released_, 0));
    C10_CUDA_CHECK(cudaEventRecord(start_, side));
    for (const Copy& c : copies) {
      C10_CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(data_) + c.offset, c.host, c.bytes,
                                     cudaMemcpyHostToDevice, side));
    }
    C10_CUDA_CHECK(cudaEventRecord(ready_, side));
    uploaded_ = true;
    timed_ = true;
  }

  double wait_uploaded() override {
    if (!uploaded_) return 0.0;
    c10::cuda::CUDAGuard guard(device_);
    C10_CUDA_CHECK(cudaEventSynchronize(ready_));
    float ms = 0.0f;
    if (timed_) C10_CUDA_CHECK(cudaEventElapsedTime(&ms, start_, ready_));
    timed_ = false;
    return ms / 1000.0;
  }

  void acquire() override {
    c10::cuda::CUDAGuard guard(device_);
    consumer_ = c10::cuda::getCurrentCUDAStream(device_.index()).stream();
    if (uploaded_) C10_CUDA_CHECK(cudaStreamWaitEvent(consumer_, ready_, 0));
  }

  void release() override {
    c10::cuda::CUDAGuard guard(device_);
    C10_CUDA_CHECK(cudaEventRecord(released_, consumer_));
    released_recorded_ = true;
  }

 private:
  void free_all() noexcept {
    if (data_ != nullptr) c10::cuda::CUDACachingAllocator::raw_delete(data_);
    for (cudaEvent_t e : {start_, ready_, released_})
      if (e != nullptr) C10_CUDA_CHECK_WARN(cudaEventDestroy(e));
    data_ = nullptr;
    start_ = ready_ = released_ = nullptr;
  }

  c10::Device device_;
  size_t bytes_;
  c10::cuda::CUDAStream side_;
  void* data_ = nullptr;
  cudaEvent_t start_ = nullptr, ready_ = nullptr, released_ = nullptr;
  cudaStream_t consumer_ = nullptr;
  bool uploaded_ = false, timed_ = false, released_recorded_ = false;
};

class CudaFence final : public StreamFence {
 public:
  CudaFence() {
    C10_CUDA_CHECK(cudaGetDevice(&device_));
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventBlockingSync | cudaEventDisableTiming));
    const cudaError_t err =
        cudaEventRecord(event_, c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_)).stream());
    if (err != cudaSuccess) {
      C10_CUDA_CHECK_WARN(cudaEventDestroy(event_));
      C10_CUDA_CHECK(err);
    }
  }
  ~CudaFence() override {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    C10_CUDA_CHECK_WARN(cudaEventDestroy(event_));
  }
  void wait() override {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    C10_CUDA_CHECK(cudaEventSynchronize(event_));
  }

 private:
  int device_ = 0;
  cudaEvent_t event_ = nullptr;
};

class CudaBackendImpl final : public CudaBackend {
 public:
  bool device_available() override { return c10::cuda::device_count() > 0; }

  void* host_alloc(size_t bytes) override {
    void* p = nullptr;
    // Portable: the pages count as pinned for every device's context.
    const cudaError_t err = cudaHostAlloc(&p, bytes, cudaHostAllocPortable);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();  // clear the sticky-free error so later calls work
      TORCH_CHECK_WITH(OutOfMemoryError, false, "cudaHostAlloc of ", bytes,
                       " bytes failed: ", cudaGetErrorString(err));
    }
    return p;
  }

  void host_free(void* ptr) override { C10_CUDA_CHECK_WARN(cudaFreeHost(ptr)); }

  std::unique_ptr<DeviceBuffer> device_alloc(size_t bytes, c10::Device device) override {
    return std::make_unique<CudaDeviceBuffer>(bytes, device);
  }

  std::unique_ptr<StreamFence> record_fence() override { return std::make_unique<CudaFence>(); }

  void set_device(c10::Device device) override { c10::cuda::set_device(device.index()); }
};

// Registers the backend when the library loads (see prefetch_ring.h).
const bool registered = [] {
  static CudaBackendImpl impl;
  set_cuda_backend(&impl);
  return true;
}();

}  // namespace
}  // namespace peft_ext::prefetch
