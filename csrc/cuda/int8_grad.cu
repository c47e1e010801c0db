// CUDA int8 backward op: grad_x[M, K] = sum_n g[M, n] * w[n, K] with
// g = grad * weight_scale (folded once, activation sized), read straight from
// the int8 weight, so no float copy of W is allocated per backward.
//
// STATUS: compiled for sm_80/sm_90 (0 spills), not yet run on a GPU; the test
// is tests/test_int8_grad.py::test_grad_input_cuda_matches_reference.
//
// A plain shared-memory tiled SIMT GEMM: a block computes a 64 x 64 tile of
// grad_x, stepping over n 32 at a time; g and the int8 weight slice are staged
// in shared memory as fp32 and every thread accumulates a 4 x 4 sub-tile in
// registers. Accumulation is fp32 whatever grad's dtype.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../int8_checks.h"
#include "int8_cuda.h"

namespace peft_ext::cuda {
namespace {

constexpr int kTileM = 64;
constexpr int kTileK = 64;
constexpr int kTileN = 32;
constexpr int kThreads = 256;  // 16 x 16 threads, 4 x 4 outputs each

__global__ void __launch_bounds__(kThreads)
    grad_input_kernel(const float* __restrict__ g, const int8_t* __restrict__ w, void* out,
                      int64_t M, int64_t N, int64_t K, OutType out_type) {
  // g is stored n-major in shared memory so a warp's reads of one n broadcast.
  __shared__ float gs[kTileN][kTileM + 1];
  __shared__ float ws[kTileN][kTileK];
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kTileK;
  float acc[4][4] = {};
  for (int64_t n0 = 0; n0 < N; n0 += kTileN) {
    for (int i = tid; i < kTileM * kTileN; i += kThreads) {
      const int r = i / kTileN, c = i % kTileN;
      const int64_t m = m0 + r, n = n0 + c;
      gs[c][r] = (m < M && n < N) ? g[m * N + n] : 0.0f;
    }
    for (int i = tid; i < kTileN * kTileK; i += kThreads) {
      const int r = i / kTileK, c = i % kTileK;
      const int64_t n = n0 + r, k = k0 + c;
      ws[r][c] = (n < N && k < K) ? static_cast<float>(w[n * K + k]) : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int c = 0; c < kTileN; ++c) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = gs[c][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = ws[c][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty * 4 + i;
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      // Columns tx + 16 j: a warp's stores of one row are contiguous.
      const int64_t k = k0 + tx + 16 * j;
      if (k < K) store_out(out, m * K + k, acc[i][j], out_type);
    }
  }
}

}  // namespace

at::Tensor int8_grad_input_cuda(const at::Tensor& grad, const at::Tensor& weight,
                                const at::Tensor& weight_scale) {
  check_int8_grad_args(grad, weight, weight_scale);
  const int64_t N = weight.size(0), K = weight.size(1);
  const c10::cuda::CUDAGuard guard(grad.device());
  auto shape = grad.sizes().vec();
  shape.back() = K;
  const int64_t M = N > 0 ? grad.numel() / N : 0;
  if (N == 0 || M == 0 || K == 0) return at::zeros(shape, grad.options());
  const at::Tensor g = grad.reshape({M, N}).to(at::kFloat).mul(weight_scale).contiguous();
  at::Tensor out = at::empty(shape, grad.options());
  const int64_t row_blocks = (M + kTileM - 1) / kTileM;
  const int64_t col_blocks = (K + kTileK - 1) / kTileK;
  TORCH_CHECK_VALUE(col_blocks <= 65535, "in_features=", K, " is too large for int8_grad_input");
  TORCH_CHECK_VALUE(row_blocks <= 2147483647, "grad has too many rows (", M, ")");
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(col_blocks));
  grad_input_kernel<<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      g.data_ptr<float>(), weight.data_ptr<int8_t>(), out.data_ptr(), M, N, K,
      out_type(grad.scalar_type()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace peft_ext::cuda
