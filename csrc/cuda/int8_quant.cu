// CUDA per-token activation quantization (one kernel writes the int8 rows and
// their scales) and weight dequantization (the backward's frozen weight).
// The arithmetic is the CPU path's, operation for operation, and follows the
// agreed per-token semantics: a row holding NaN or +-inf gets scale NaN and
// q = 0 (so the GEMM epilogue writes NaN for the whole row); otherwise
// scale = absmax / 127 and q = clamp(rint_half_even(x / scale), -127, 127)
// with a true IEEE division by the scale (1 / scale overflows to inf for
// absmax below ~4e-37); absmax == 0 gives scale 0 and q = 0.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../int8_checks.h"
#include "int8_cuda.h"

namespace peft_ext::cuda {
namespace {

constexpr int kQuantThreads = 256;
constexpr int kDequantThreads = 256;

// s > 0 and finite: the row's scale; s == 0 or NaN: q = 0 (an all-zero or a
// non-finite row).
__device__ __forceinline__ uint32_t quantize(float v, float s) {
  if (!(s > 0.0f)) return 0u;
  const int r = min(127, max(-127, __float2int_rn(__fdiv_rn(v, s))));
  return static_cast<uint32_t>(r) & 0xffu;
}

// |v|, or +inf for NaN: the row maximum then flags any non-finite element
// (fmaxf would drop a NaN) as +inf.
__device__ __forceinline__ float abs_or_inf(float v) { return v == v ? fabsf(v) : INFINITY; }

__device__ float block_max(float v) {
  __shared__ float partial[kQuantThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = partial[0];
  for (int w = 1; w < kQuantThreads / 32; ++w) v = fmaxf(v, partial[w]);
  return v;
}

// One block per row: the first pass finds absmax, the second (served by L1/L2,
// a row is a few KiB) writes q. `vec` selects 16-byte loads when every row
// start is 16-byte aligned.
template <typename T>
__global__ void __launch_bounds__(kQuantThreads)
    quantize_rows_kernel(const T* __restrict__ x, int64_t K, int8_t* __restrict__ q, int64_t ldq,
                         float* __restrict__ scale, bool vec) {
  constexpr int E = 16 / sizeof(T);
  const T* xr = x + static_cast<int64_t>(blockIdx.x) * K;
  int8_t* qr = q + static_cast<int64_t>(blockIdx.x) * ldq;
  float amax = 0.0f;
  if (vec) {
    for (int64_t k = threadIdx.x * E; k < K; k += kQuantThreads * E) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(xr + k));
      const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int e = 0; e < E; ++e) amax = fmaxf(amax, abs_or_inf(to_float(v[e])));
    }
  } else {
    for (int64_t k = threadIdx.x; k < K; k += kQuantThreads) amax = fmaxf(amax, abs_or_inf(to_float(xr[k])));
  }
  amax = block_max(amax);
  // amax == inf: the row held NaN or +-inf.
  const float s = amax == INFINITY ? __int_as_float(0x7fc00000) : __fdiv_rn(amax, 127.0f);
  if (threadIdx.x == 0) scale[blockIdx.x] = s;
  if (vec) {
    for (int64_t k = threadIdx.x * E; k < K; k += kQuantThreads * E) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(xr + k));
      const T* v = reinterpret_cast<const T*>(&raw);
      uint32_t packed[E / 4];
#pragma unroll
      for (int w = 0; w < E / 4; ++w) {
        packed[w] = quantize(to_float(v[4 * w]), s) | quantize(to_float(v[4 * w + 1]), s) << 8 |
                    quantize(to_float(v[4 * w + 2]), s) << 16 |
                    quantize(to_float(v[4 * w + 3]), s) << 24;
      }
      if constexpr (E == 4) {
        *reinterpret_cast<uint32_t*>(qr + k) = packed[0];
      } else {
        *reinterpret_cast<uint2*>(qr + k) = make_uint2(packed[0], packed[1]);
      }
    }
  } else {
    for (int64_t k = threadIdx.x; k < K; k += kQuantThreads)
      qr[k] = static_cast<int8_t>(quantize(to_float(xr[k]), s));
  }
  for (int64_t k = K + threadIdx.x; k < ldq; k += kQuantThreads) qr[k] = 0;
}

// One block per weight row; same arithmetic as the CPU's float multiply.
template <typename T>
__global__ void __launch_bounds__(kDequantThreads)
    dequantize_kernel(const int8_t* __restrict__ w, const float* __restrict__ sw, int64_t K,
                      T* __restrict__ out) {
  const int64_t row = blockIdx.x;
  const float s = sw[row];
  const int8_t* wr = w + row * K;
  T* orow = out + row * K;
  for (int64_t k = threadIdx.x; k < K; k += kDequantThreads) {
    const float v = __fmul_rn(static_cast<float>(wr[k]), s);
    if constexpr (std::is_same_v<T, float>) {
      orow[k] = v;
    } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      orow[k] = __float2bfloat16_rn(v);
    } else {
      orow[k] = __float2half_rn(v);
    }
  }
}

template <typename T>
void launch_quantize(const at::Tensor& x2d, int64_t ldq, at::Tensor& q, at::Tensor& scale) {
  const int64_t M = x2d.size(0), K = x2d.size(1);
  const T* xp = reinterpret_cast<const T*>(x2d.data_ptr());
  int8_t* qp = q.data_ptr<int8_t>();
  constexpr int E = 16 / sizeof(T);
  const bool vec = aligned16(xp) && aligned16(qp) && K % E == 0 && ldq % E == 0;
  quantize_rows_kernel<T><<<M, kQuantThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      xp, K, qp, ldq, scale.data_ptr<float>(), vec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_per_token_cuda(const at::Tensor& x) {
  check_float_input(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = leading_rows(x), K = x.size(-1);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0) return {q, scale};
  if (K == 0) {
    // An empty row: absmax 0, scale 0 (no reshape: it cannot infer M here).
    scale.zero_();
    return {q, scale};
  }
  quantize_rows(rows(x), K, q, scale);
  return {q, scale};
}

at::Tensor int8_dequantize_cuda(const at::Tensor& weight, const at::Tensor& weight_scale,
                                at::ScalarType dtype) {
  check_int8_weight(weight, weight_scale);
  TORCH_CHECK_TYPE(at::isFloatingType(dtype), "int8_dequantize: dtype must be floating point, got ",
                   dtype);
  const c10::cuda::CUDAGuard guard(weight.device());
  if (dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf) {
    return dequantize(weight, weight_scale, at::kFloat).to(dtype);
  }
  return dequantize(weight, weight_scale, dtype);
}

void quantize_rows(const at::Tensor& x2d, int64_t ldq, at::Tensor& q, at::Tensor& scale) {
  TORCH_INTERNAL_ASSERT(x2d.is_contiguous() && ldq >= x2d.size(1));
  switch (x2d.scalar_type()) {
    case at::kBFloat16:
      launch_quantize<__nv_bfloat16>(x2d, ldq, q, scale);
      break;
    case at::kHalf:
      launch_quantize<__half>(x2d, ldq, q, scale);
      break;
    default:
      launch_quantize<float>(x2d, ldq, q, scale);
  }
}

at::Tensor dequantize(const at::Tensor& w, const at::Tensor& sw, at::ScalarType dtype) {
  const int64_t N = w.size(0), K = w.size(1);
  at::Tensor out = at::empty({N, K}, w.options().dtype(dtype));
  if (N == 0 || K == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = sw.data_ptr<float>();
  switch (dtype) {
    case at::kBFloat16:
      dequantize_kernel<<<N, kDequantThreads, 0, stream>>>(
          wp, sp, K, reinterpret_cast<__nv_bfloat16*>(out.data_ptr()));
      break;
    case at::kHalf:
      dequantize_kernel<<<N, kDequantThreads, 0, stream>>>(
          wp, sp, K, reinterpret_cast<__half*>(out.data_ptr()));
      break;
    default:
      dequantize_kernel<<<N, kDequantThreads, 0, stream>>>(wp, sp, K, out.data_ptr<float>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace peft_ext::cuda
