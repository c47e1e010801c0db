// Launchers shared by the CUDA int8 translation units (int8_quant.cu,
// int8_gemm.cu, int8_gemv.cu) and the host-side helpers they have in common.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include <ATen/ATen.h>

#include "../linear_common.h"

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace peft_ext::cuda {

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// x[..., K] as a contiguous [M, K] matrix in its own dtype (a copy only for
// non-contiguous views).
inline at::Tensor rows(const at::Tensor& x) { return x.reshape({-1, x.size(-1)}).contiguous(); }

// Per-token quantization of x2d [M, K] (contiguous, float/bf16/half) into
// q [M, ldq] int8 (columns K..ldq-1 zero) and scale [M] float32, one kernel,
// on the current stream. ldq >= K.
void quantize_rows(const at::Tensor& x2d, int64_t ldq, at::Tensor& q, at::Tensor& scale);

// Output rows at most this many go to the GEMV kernels (int8_gemv.cu): they
// stream the weight once for all rows; beyond it a tensor-core GEMM wins.
constexpr int64_t kGemvMaxM = 16;

// y[m, n] = sum_k q[m, k] * w[n, k] (exact int32) * sx[m] * sw[n] + bias[n],
// M <= kGemvMaxM. q has row stride ldq. out is [M, N] contiguous in x's dtype.
void gemv_s8(const at::Tensor& q, int64_t ldq, const at::Tensor& sx, const at::Tensor& w,
             const at::Tensor& sw, const at::Tensor& bias, at::Tensor& out);

// y[m, n] = sum_k x[m, k] * w[n, k] (fp32) * sw[n] + bias[n], M <= kGemvMaxM,
// x contiguous [M, K] float/bf16/half; out [M, N] contiguous in x's dtype.
void gemv_weight_only(const at::Tensor& x2d, const at::Tensor& w, const at::Tensor& sw,
                      const at::Tensor& bias, at::Tensor& out);

// w * sw[:, None] in float32, bfloat16 or float16 (one elementwise kernel).
at::Tensor dequantize(const at::Tensor& w, const at::Tensor& sw, at::ScalarType dtype);

// Epilogue store shared by the kernels: out is float, bfloat16 or half,
// chosen at run time (one instantiation per kernel instead of three).
enum class OutType : int { kFloat = 0, kBFloat16 = 1, kHalf = 2 };

inline OutType out_type(at::ScalarType t) {
  return t == at::kBFloat16 ? OutType::kBFloat16 : t == at::kHalf ? OutType::kHalf : OutType::kFloat;
}

#ifdef __CUDACC__
__device__ __forceinline__ void store_out(void* out, int64_t i, float v, OutType t) {
  if (t == OutType::kBFloat16) {
    static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(v);
  } else if (t == OutType::kHalf) {
    static_cast<__half*>(out)[i] = __float2half_rn(v);
  } else {
    static_cast<float*>(out)[i] = v;
  }
}
#endif

}  // namespace peft_ext::cuda
