// Host and device helpers shared by every CUDA kernel file (int8 and sparse):
// operand rows, alignment, the output dtype chosen at run time and its stores,
// fp32 conversion of the input types, and the dynamic shared-memory opt-in.
#pragma once

#include <atomic>
#include <cstdint>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../linear_common.h"

namespace peft_ext::cuda {

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// x[..., K] as a contiguous [M, K] matrix in its own dtype (a copy only for
// non-contiguous views). K must be > 0: handle K == 0 first (fill_empty_k).
inline at::Tensor rows(const at::Tensor& x) { return x.reshape({-1, x.size(-1)}).contiguous(); }

// The output is float, bfloat16 or half, chosen at run time (one kernel
// instantiation instead of three).
enum class OutType : int { kFloat = 0, kBFloat16 = 1, kHalf = 2 };

inline OutType out_type(at::ScalarType t) {
  return t == at::kBFloat16 ? OutType::kBFloat16 : t == at::kHalf ? OutType::kHalf : OutType::kFloat;
}

__device__ __forceinline__ void store_out(void* out, int64_t i, float v, OutType t) {
  if (t == OutType::kBFloat16) {
    static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(v);
  } else if (t == OutType::kHalf) {
    static_cast<__half*>(out)[i] = __float2half_rn(v);
  } else {
    static_cast<float*>(out)[i] = v;
  }
}

// Outputs o and o + 1 (o even, so the pair is 4- or 8-byte aligned) in one store.
__device__ __forceinline__ void store_out2(void* out, int64_t o, float v0, float v1, OutType t) {
  if (t == OutType::kBFloat16) {
    *reinterpret_cast<__nv_bfloat162*>(static_cast<__nv_bfloat16*>(out) + o) = __floats2bfloat162_rn(v0, v1);
  } else if (t == OutType::kHalf) {
    *reinterpret_cast<__half2*>(static_cast<__half*>(out) + o) = __floats2half2_rn(v0, v1);
  } else {
    *reinterpret_cast<float2*>(static_cast<float*>(out) + o) = make_float2(v0, v1);
  }
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// Above 48 KiB of dynamic shared memory a kernel needs the opt-in, once per
// device: the first (eager, warm-up) call sets it, so graph capture never
// sees it. `configured` is the caller's per-kernel bit set of devices done.
template <typename Kernel>
void opt_in_shared_memory(Kernel kernel, int bytes, int device, std::atomic<uint64_t>& configured) {
  const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
  if (bit != 0 && (configured.load() & bit) != 0) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  configured.fetch_or(bit);
}

}  // namespace peft_ext::cuda
