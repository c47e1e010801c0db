// CUDA block-sparse (BSR) linear, and the CSR fallback. The 2:4 tensor-core
// kernel lives in sparse24_gemm.cu.
//
// BSR (bsr_linear_cuda): one thread block per block row of the weight (bh
// output features) and per tile of `tm` activation rows; it walks only the
// stored blocks of its row, staging each block and the matching x columns in
// shared memory as float32, 32 columns at a time, and accumulates bh x tm
// outputs in registers (at most four per thread) with plain FMA on the CUDA
// cores. Inputs and outputs are float32, bfloat16 or float16; sums are fp32.
// This is the kernel for high block sparsity and few rows, where the layer is
// bound by reading the weight and only the stored blocks are read; for many
// rows a dense tensor-core GEMM has far more arithmetic throughput (a
// tensor-core BSR kernel is future work). Block rows taller than kMaxBh fall
// back to the dense weight and cuBLAS.
//
// Structure checks: the CPU op validates crow / col on every call; here that
// would need a device-to-host copy and a synchronisation per call, so the
// kernel instead clamps each row's block range to [0, nnz_blocks) and skips
// blocks whose column lies outside the weight: malformed indices never cause
// an out-of-bounds read (their blocks are ignored). Row tiles beyond
// grid.y's 65535 are covered by a stride loop inside the kernel.
//
// CSR (csr_linear_cuda): no CUDA kernel; the weight is densified with ATen
// ops and multiplied by cuBLAS (at::linear), documented as a fallback. The
// fallbacks (CSR, and BSR blocks too tall for the kernel) copy crow / col to
// the host and validate them as the CPU does (ValueError): malformed indices
// would otherwise reach index_put_ and leave a device-side assert that
// poisons the CUDA context. The cost is one synchronising copy per call
// (these paths densify the weight on every call anyway; they cannot be
// captured in a CUDA graph).
#include <algorithm>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../sparse_checks.h"
#include "common.cuh"
#include "sparse_cuda.h"

namespace peft_ext::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kOutPerThread = 4;
constexpr int kMaxOutputs = kThreads * kOutPerThread;  // bh x tm outputs per block
constexpr int kMaxBh = 256;
constexpr int kMaxTm = 256;
constexpr int kKc = 32;        // columns staged per step
constexpr int kLd = kKc + 1;   // padded row: threads reading one column of different rows hit different banks
constexpr int64_t kMaxGridY = 65535;

template <typename T>
struct BsrArgs {
  const T* x;          // [M, K]
  const T* values;     // [nnzb, bh, bw]
  const int64_t* crow;  // [R + 1]
  const int32_t* col;   // [nnzb]
  const float* bias;    // [N] or null
  void* out;            // [M, N]
  int64_t M, N, K, nnzb;
  int bh, bw, tm;
  OutType out_type;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) bsr_kernel(const BsrArgs<T> p) {
  extern __shared__ float smem[];
  float* sw = smem;               // [bh][kLd]
  float* sx = smem + p.bh * kLd;  // [tm][kLd]
  const int64_t r = blockIdx.x;
  const int tid = threadIdx.x;
  const int outputs = p.bh * p.tm;
  const int64_t kblocks = p.K / p.bw;
  const int64_t first = p.crow[r], last = p.crow[r + 1];
  const int64_t lo = first < 0 ? 0 : first;
  const int64_t hi = last > p.nnzb ? p.nnzb : last;
  // grid.y is at most 65535: each block strides over row tiles.
  for (int64_t m0 = static_cast<int64_t>(blockIdx.y) * p.tm; m0 < p.M;
       m0 += static_cast<int64_t>(gridDim.y) * p.tm) {
    // Output o = tid + q * kThreads is feature i = o % bh of row m = o / bh:
    // neighbouring threads write neighbouring features (coalesced stores) and
    // read one x row (a shared-memory broadcast).
    float acc[kOutPerThread] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t b = lo; b < hi; ++b) {
      const int64_t c = p.col[b];
      if (c < 0 || c >= kblocks) continue;  // uniform across the block
      const T* wb = p.values + b * p.bh * p.bw;
      const T* xb = p.x + c * p.bw;
      for (int kc = 0; kc < p.bw; kc += kKc) {
        const int kw = min(kKc, p.bw - kc);
        for (int e = tid; e < p.bh * kKc; e += kThreads) {
          const int i = e / kKc, k = e % kKc;
          sw[i * kLd + k] = k < kw ? to_float(wb[i * p.bw + kc + k]) : 0.0f;
        }
        for (int e = tid; e < p.tm * kKc; e += kThreads) {
          const int mm = e / kKc, k = e % kKc;
          const int64_t gm = m0 + mm;
          sx[mm * kLd + k] = (k < kw && gm < p.M) ? to_float(xb[gm * p.K + kc + k]) : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int q = 0; q < kOutPerThread; ++q) {
          const int o = tid + q * kThreads;
          if (o < outputs) {
            const float* wr = sw + (o % p.bh) * kLd;
            const float* xr = sx + (o / p.bh) * kLd;
            float s = acc[q];
#pragma unroll 8
            for (int k = 0; k < kKc; ++k) s = fmaf(wr[k], xr[k], s);
            acc[q] = s;
          }
        }
        __syncthreads();
      }
    }
#pragma unroll
    for (int q = 0; q < kOutPerThread; ++q) {
      const int o = tid + q * kThreads;
      const int64_t gm = m0 + o / p.bh;
      if (o < outputs && gm < p.M) {
        const int64_t n = r * p.bh + o % p.bh;
        store_out(p.out, gm * p.N + n, acc[q] + (p.bias != nullptr ? p.bias[n] : 0.0f), p.out_type);
      }
    }
  }
}

template <typename T>
void launch_bsr(const at::Tensor& x2d, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                const at::Tensor& bias, at::Tensor& out, int64_t K) {
  const int64_t M = x2d.size(0), R = crow.numel() - 1;
  const int bh = static_cast<int>(values.size(1)), bw = static_cast<int>(values.size(2));
  const int tm = static_cast<int>(std::min<int64_t>({kMaxTm, std::max(1, kMaxOutputs / bh), M}));
  // More row tiles than grid.y holds: the kernel strides over them.
  const int64_t m_tiles = std::min<int64_t>((M + tm - 1) / tm, kMaxGridY);
  const BsrArgs<T> args{reinterpret_cast<const T*>(x2d.data_ptr()), reinterpret_cast<const T*>(values.data_ptr()),
                        crow.data_ptr<int64_t>(), col.data_ptr<int32_t>(),
                        bias.defined() ? bias.data_ptr<float>() : nullptr, out.data_ptr(), M, R * bh, K,
                        values.size(0), bh, bw, tm, out_type(x2d.scalar_type())};
  const size_t smem = static_cast<size_t>(bh + tm) * kLd * sizeof(float);
  const dim3 grid(static_cast<unsigned>(R), static_cast<unsigned>(m_tiles));
  bsr_kernel<T><<<grid, kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Row index of every stored entry (block) from crow, without a host sync:
// the total is known on the host.
at::Tensor row_of_each(const at::Tensor& crow, int64_t total) {
  return at::repeat_interleave(at::diff(crow), total);
}

// The fallbacks' host-side structure check (the CPU op's, same ValueErrors).
void check_rows_on_host(const at::Tensor& crow, const at::Tensor& col, int64_t cols, const char* what) {
  check_rows(crow.cpu(), col.cpu(), cols, what);
}

}  // namespace

at::Tensor bsr_linear_cuda(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                           const at::Tensor& values, int64_t in_features, const c10::optional<at::Tensor>& bias) {
  const int64_t N = check_bsr_args(x, crow, col, values, in_features, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType dtype = x.scalar_type();
  const int64_t nnzb = values.size(0), bh = values.size(1), bw = values.size(2), R = crow.numel() - 1;
  at::Tensor out = at::empty(out_shape(x, N), x.options());
  const int64_t M = leading_rows(x);
  if (M == 0 || N == 0) return out;
  if (in_features == 0) {
    fill_empty_k(out, bias);
    return out;
  }
  const at::Tensor v = values.to(dtype).contiguous();
  if (bh > kMaxBh) {
    // Too tall for the block kernel's per-thread outputs: densify, then cuBLAS.
    check_rows_on_host(crow, col, in_features / bw, "blocks");
    const at::Tensor blocks = at::zeros({R, in_features / bw, bh, bw}, v.options());
    if (nnzb > 0) blocks.index_put_({row_of_each(crow, nnzb), col.to(at::kLong)}, v);
    const at::Tensor w = blocks.permute({0, 2, 1, 3}).reshape({N, in_features});
    return at::linear(x, w, bias.has_value() ? bias->to(dtype) : at::Tensor());
  }
  if (nnzb == 0) {
    fill_empty_k(out, bias);
    return out;
  }
  const at::Tensor x2d = rows(x);
  const at::Tensor b = bias_f32(bias);
  at::Tensor out2d = out.view({M, N});
  if (dtype == at::kBFloat16) {
    launch_bsr<__nv_bfloat16>(x2d, crow, col, v, b, out2d, in_features);
  } else if (dtype == at::kHalf) {
    launch_bsr<__half>(x2d, crow, col, v, b, out2d, in_features);
  } else {
    launch_bsr<float>(x2d, crow, col, v, b, out2d, in_features);
  }
  return out;
}

at::Tensor csr_linear_cuda(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                           const at::Tensor& values, int64_t in_features, const c10::optional<at::Tensor>& bias) {
  const int64_t N = check_csr_args(x, crow, col, values, in_features, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  check_rows_on_host(crow, col, in_features, "values");
  const at::ScalarType dtype = x.scalar_type();
  at::Tensor out = at::empty(out_shape(x, N), x.options());
  if (leading_rows(x) == 0 || N == 0) return out;
  if (in_features == 0) {
    fill_empty_k(out, bias);
    return out;
  }
  at::Tensor w = at::zeros({N, in_features}, x.options());
  if (values.numel() > 0) w.index_put_({row_of_each(crow, values.numel()), col.to(at::kLong)}, values.to(dtype));
  return at::linear(x, w, bias.has_value() ? bias->to(dtype) : at::Tensor());
}

// Every CUDA sparse op, one registration (the 2:4 kernel is in sparse24_gemm.cu).
TORCH_LIBRARY_IMPL(peft_ext, CUDA, m) {
  m.impl("sparse24_linear", &sparse24_linear_cuda);
  m.impl("bsr_linear", &bsr_linear_cuda);
  m.impl("csr_linear", &csr_linear_cuda);
}

}  // namespace peft_ext::cuda
