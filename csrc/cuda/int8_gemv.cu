// CUDA GEMV kernels for few output rows (M <= 16, decode), and the weight-only
// int8 linear op.
//
// At small M a linear layer is bound by reading its weight: each block streams
// kGemvRows weight rows once, 16 bytes per lane per step, and multiplies them
// with all M activation rows (from L1/L2). Its warps split K; a shared-memory
// reduction and the epilogue finish the block. Two flavours share the kernel:
//   W8A8 (x int8):          exact int32 dot products with dp4a, then * s_x * s_w + bias
//   weight-only (x float):  int8 -> fp32 in registers, fp32 FMA, then * s_w + bias
//                           (bf16/fp16 with 5..16 rows: the tensor-core variant below)
//
// Weight-only dispatch (int8_linear_weight_only_cuda):
//   M <= 16   this GEMV (weight bytes halved against bf16, the point of int8 at decode)
//   M > 16    compute bound: the weight is dequantized into x's dtype (one
//             elementwise kernel, int8_quant.cu) and cuBLAS multiplies (at::addmm);
//             the temporary costs N*K*2 bytes from the caching allocator.
#include <type_traits>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../int8_checks.h"
#include "int8_cuda.h"

namespace peft_ext::cuda {
namespace {

constexpr int kGemvWarps = 4;   // warps per block, splitting K
constexpr int kGemvRows = 2;    // weight rows per block
constexpr int kChunk = 16;      // weight bytes per lane per step
constexpr int kStep = kGemvWarps * 32 * kChunk;
constexpr int64_t kGemvMmaMinM = 5;  // bf16/fp16 from this many rows: tensor-core GEMV

struct GemvArgs {
  const void* x;     // [M, ldx] elements of XT
  int64_t ldx;
  const float* sx;   // [M] (W8A8 only)
  const int8_t* w;   // [N, K]
  const float* sw;   // [N]
  const float* bias;  // [N] or null
  void* out;          // [M, N]
  int64_t M, N, K;
  OutType out_type;
  bool vec;  // 16-byte loads: K % 16 == 0 and x, w 16-byte aligned
};

// 16 int8 values row[k0 .. k0+15], zeros past K. The weight is streamed once
// (kStream: evict-first, so it does not push the activations out of L1/L2);
// quantized activations are re-read by every block (the read-only path).
template <bool kStream>
__device__ __forceinline__ uint4 load_s8(const int8_t* row, int64_t k0, int64_t K, bool vec) {
  if (vec) {
    const uint4* p = reinterpret_cast<const uint4*>(row + k0);
    return kStream ? __ldcs(p) : __ldg(p);
  }
  uint32_t v[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int b = 0; b < kChunk; ++b)
    if (k0 + b < K) v[b / 4] |= (static_cast<uint32_t>(row[k0 + b]) & 0xffu) << (8 * (b % 4));
  return make_uint4(v[0], v[1], v[2], v[3]);
}

__device__ __forceinline__ uint4 load_w(const int8_t* row, int64_t k0, int64_t K, bool vec) {
  return load_s8<true>(row, k0, K, vec);
}

// Four signed bytes to exact floats: 0x4B000000 | (b + 128) is the float
// 2^23 + b + 128, so one byte permute and one subtraction per element.
__device__ __forceinline__ void bytes_to_float(uint32_t word, float* f) {
  const uint32_t biased = word ^ 0x80808080u;
#pragma unroll
  for (int i = 0; i < 4; ++i)
    f[i] = __uint_as_float(__byte_perm(biased, 0x4B000000u, 0x7540u | i)) - 8388736.0f;
}

// 16 activations x[k0 .. k0+15] as floats, zeros past K.
template <typename XT>
__device__ __forceinline__ void load_x(const XT* row, int64_t k0, int64_t K, bool vec, float* f) {
  if (vec) {
    constexpr int E = 16 / sizeof(XT);
#pragma unroll
    for (int c = 0; c < kChunk / E; ++c) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row + k0) + c);
      const XT* v = reinterpret_cast<const XT*>(&raw);
#pragma unroll
      for (int e = 0; e < E; ++e) f[c * E + e] = to_float(v[e]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kChunk; ++j) f[j] = k0 + j < K ? to_float(row[k0 + j]) : 0.0f;
  }
}

template <typename XT>
using AccT = std::conditional_t<std::is_same_v<XT, int8_t>, int32_t, float>;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// MMAX is a bound on M so that the accumulators stay in registers; rows past
// M are skipped by uniform branches.
template <typename XT, int MMAX>
__global__ void __launch_bounds__(kGemvWarps * 32) gemv_kernel(const GemvArgs p) {
  using Acc = AccT<XT>;
  constexpr bool kInt8 = std::is_same_v<XT, int8_t>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n_base = static_cast<int64_t>(blockIdx.x) * kGemvRows;
  const XT* x = static_cast<const XT*>(p.x);

  const int8_t* wrow[kGemvRows];
#pragma unroll
  for (int r = 0; r < kGemvRows; ++r) {
    // Rows past N read row N - 1 and are discarded by the epilogue.
    const int64_t n = n_base + r < p.N ? n_base + r : p.N - 1;
    wrow[r] = p.w + n * p.K;
  }

  Acc acc[kGemvRows][MMAX];
#pragma unroll
  for (int r = 0; r < kGemvRows; ++r)
#pragma unroll
    for (int m = 0; m < MMAX; ++m) acc[r][m] = 0;

  int64_t k0 = static_cast<int64_t>(warp * 32 + lane) * kChunk;
  uint4 wcur[kGemvRows];
#pragma unroll
  for (int r = 0; r < kGemvRows; ++r) wcur[r] = k0 < p.K ? load_w(wrow[r], k0, p.K, p.vec) : make_uint4(0, 0, 0, 0);

  for (; k0 < p.K; k0 += kStep) {
    // Next step's weight is in flight while this one is multiplied.
    uint4 wnext[kGemvRows];
    const bool more = k0 + kStep < p.K;
#pragma unroll
    for (int r = 0; r < kGemvRows; ++r)
      wnext[r] = more ? load_w(wrow[r], k0 + kStep, p.K, p.vec) : make_uint4(0, 0, 0, 0);

    if constexpr (kInt8) {
#pragma unroll
      for (int m = 0; m < MMAX; ++m) {
        if (m < p.M) {
          const uint4 xq = load_s8<false>(x + m * p.ldx, k0, p.K, p.vec);
#pragma unroll
          for (int r = 0; r < kGemvRows; ++r) {
            Acc a = acc[r][m];
            a = __dp4a(static_cast<int>(xq.x), static_cast<int>(wcur[r].x), a);
            a = __dp4a(static_cast<int>(xq.y), static_cast<int>(wcur[r].y), a);
            a = __dp4a(static_cast<int>(xq.z), static_cast<int>(wcur[r].z), a);
            a = __dp4a(static_cast<int>(xq.w), static_cast<int>(wcur[r].w), a);
            acc[r][m] = a;
          }
        }
      }
    } else {
      float wf[kGemvRows][kChunk];
#pragma unroll
      for (int r = 0; r < kGemvRows; ++r) {
        bytes_to_float(wcur[r].x, wf[r]);
        bytes_to_float(wcur[r].y, wf[r] + 4);
        bytes_to_float(wcur[r].z, wf[r] + 8);
        bytes_to_float(wcur[r].w, wf[r] + 12);
      }
#pragma unroll
      for (int m = 0; m < MMAX; ++m) {
        if (m < p.M) {
          float xf[kChunk];
          load_x(x + m * p.ldx, k0, p.K, p.vec, xf);
#pragma unroll
          for (int r = 0; r < kGemvRows; ++r) {
            float a = acc[r][m];
#pragma unroll
            for (int j = 0; j < kChunk; ++j) a = fmaf(xf[j], wf[r][j], a);
            acc[r][m] = a;
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kGemvRows; ++r) wcur[r] = wnext[r];
  }

  __shared__ Acc partial[kGemvWarps][kGemvRows][MMAX];
#pragma unroll
  for (int r = 0; r < kGemvRows; ++r) {
#pragma unroll
    for (int m = 0; m < MMAX; ++m) {
      if (m < p.M) {
        const Acc v = warp_sum(acc[r][m]);
        if (lane == 0) partial[warp][r][m] = v;
      }
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kGemvRows * p.M; i += kGemvWarps * 32) {
    const int r = i / static_cast<int>(p.M), m = i % static_cast<int>(p.M);
    const int64_t n = n_base + r;
    if (n >= p.N) continue;
    Acc sum = partial[0][r][m];
#pragma unroll
    for (int w = 1; w < kGemvWarps; ++w) sum += partial[w][r][m];
    // The CPU path's order: ((acc * s_x) * s_w) + bias, each step rounded once.
    float v = static_cast<float>(sum);
    if constexpr (kInt8) v = __fmul_rn(v, p.sx[m]);
    v = __fmul_rn(v, p.sw[n]);
    if (p.bias != nullptr) v = __fadd_rn(v, p.bias[n]);
    store_out(p.out, m * p.N + n, v, p.out_type);
  }
}

// Tensor-core variant for bf16/fp16 activations and 4 < M <= 16, where fp32
// FMA on CUDA cores would become the bottleneck: mma.sync m16n8k16 with the
// activations as A (rows past M are zeros) and the int8 weight, converted to
// bf16/fp16 exactly in registers, as B; fp32 accumulation. A block owns
// kMmaTiles n8 tiles (16 weight rows) and its kMmaWarps warps split K.
//
// Each lane (g = lane / 4, t = lane % 4) loads 16 consecutive k of weight row
// g and of activation rows g and g + 8, at k = 16 t within the warp's 64-wide
// slice, and feeds them to four mma steps. The sum over k does not care how k
// is numbered as long as A and B agree, so mma step s maps the fragment's
// k = {2t, 2t+1, 2t+8, 2t+9} to the lane's own k = 16t + 4s + {0, 1, 2, 3}:
// A regs {a0a1, a2a3, a4a5, a6a7} = x[g][4s, 4s+1], x[g+8][4s, 4s+1],
// x[g][4s+2, 4s+3], x[g+8][4s+2, 4s+3]; B regs {b0b1, b2b3} = w[g][4s, 4s+1],
// w[g][4s+2, 4s+3]; C as in m16n8k32: c0, c1 = (g, 2t), (g, 2t+1); c2, c3 at row g+8.
constexpr int kMmaWarps = 8;
constexpr int kMmaTiles = 2;
constexpr int kMmaSlice = 64;                      // k per warp per step
constexpr int kMmaStep = kMmaWarps * kMmaSlice;  // k per block per step

// 16 activations x[k0 .. k0+15] as raw 16-bit pairs (zeros past K).
template <typename XT>
__device__ __forceinline__ void load_x_raw(const XT* row, int64_t k0, int64_t K, bool vec,
                                           uint32_t (&r)[8]) {
  if (vec) {
    const uint4 lo = __ldg(reinterpret_cast<const uint4*>(row + k0));
    const uint4 hi = __ldg(reinterpret_cast<const uint4*>(row + k0) + 1);
    r[0] = lo.x, r[1] = lo.y, r[2] = lo.z, r[3] = lo.w;
    r[4] = hi.x, r[5] = hi.y, r[6] = hi.z, r[7] = hi.w;
  } else {
    const uint16_t* raw = reinterpret_cast<const uint16_t*>(row);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const uint32_t lo = k0 + 2 * j < K ? raw[k0 + 2 * j] : 0u;
      const uint32_t hi = k0 + 2 * j + 1 < K ? raw[k0 + 2 * j + 1] : 0u;
      r[j] = lo | hi << 16;
    }
  }
}

// Two signed bytes of `word` (bytes 2p and 2p+1) as a packed bf16/fp16 pair,
// exact (|v| <= 127 fits either mantissa); the lower k in the low half.
template <typename XT>
__device__ __forceinline__ uint32_t bytes_to_pair(uint32_t word, int p) {
  float f[4];
  bytes_to_float(word, f);
  if constexpr (std::is_same_v<XT, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(f[2 * p], f[2 * p + 1]);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(f[2 * p], f[2 * p + 1]);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

template <typename XT>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (std::is_same_v<XT, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

template <typename XT>
__global__ void __launch_bounds__(kMmaWarps * 32) gemv_mma_kernel(const GemvArgs p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t n_base = static_cast<int64_t>(blockIdx.x) * (8 * kMmaTiles);
  const XT* x = static_cast<const XT*>(p.x);

  const int8_t* wrow[kMmaTiles];
#pragma unroll
  for (int j = 0; j < kMmaTiles; ++j) {
    // Rows past N read row N - 1 and are discarded by the epilogue.
    const int64_t n = n_base + 8 * j + g < p.N ? n_base + 8 * j + g : p.N - 1;
    wrow[j] = p.w + n * p.K;
  }
  const bool row_lo = g < p.M, row_hi = g + 8 < p.M;
  const XT* x_lo = x + (row_lo ? g : 0) * p.ldx;
  const XT* x_hi = x + (row_hi ? g + 8 : 0) * p.ldx;

  float acc[kMmaTiles][4];
#pragma unroll
  for (int j = 0; j < kMmaTiles; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;

  int64_t k0 = static_cast<int64_t>(warp) * kMmaSlice + 16 * t;
  uint4 wcur[kMmaTiles];
#pragma unroll
  for (int j = 0; j < kMmaTiles; ++j) wcur[j] = k0 < p.K ? load_w(wrow[j], k0, p.K, p.vec) : make_uint4(0, 0, 0, 0);

  // The loop runs while any lane of the warp has work (mma.sync needs the
  // whole warp); lanes past K contribute zeros.
  int64_t warp_k0 = static_cast<int64_t>(warp) * kMmaSlice;
  for (; warp_k0 < p.K; warp_k0 += kMmaStep, k0 += kMmaStep) {
    uint4 wnext[kMmaTiles];
    const bool more = k0 + kMmaStep < p.K;
#pragma unroll
    for (int j = 0; j < kMmaTiles; ++j)
      wnext[j] = more ? load_w(wrow[j], k0 + kMmaStep, p.K, p.vec) : make_uint4(0, 0, 0, 0);

    uint32_t xl[8] = {0u, 0u, 0u, 0u, 0u, 0u, 0u, 0u};
    uint32_t xh[8] = {0u, 0u, 0u, 0u, 0u, 0u, 0u, 0u};
    if (row_lo && k0 < p.K) load_x_raw(x_lo, k0, p.K, p.vec, xl);
    if (row_hi && k0 < p.K) load_x_raw(x_hi, k0, p.K, p.vec, xh);
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const uint32_t a[4] = {xl[2 * s], xh[2 * s], xl[2 * s + 1], xh[2 * s + 1]};
#pragma unroll
      for (int j = 0; j < kMmaTiles; ++j) {
        const uint32_t word = s == 0 ? wcur[j].x : s == 1 ? wcur[j].y : s == 2 ? wcur[j].z : wcur[j].w;
        mma_16816<XT>(acc[j], a, bytes_to_pair<XT>(word, 0), bytes_to_pair<XT>(word, 1));
      }
    }
#pragma unroll
    for (int j = 0; j < kMmaTiles; ++j) wcur[j] = wnext[j];
  }

  __shared__ float partial[kMmaWarps][kMmaTiles][32][4];
#pragma unroll
  for (int j = 0; j < kMmaTiles; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r) partial[warp][j][lane][r] = acc[j][r];
  __syncthreads();
  for (int i = threadIdx.x; i < kMmaTiles * 32 * 4; i += kMmaWarps * 32) {
    const int j = i / 128, l = (i / 4) % 32, r = i % 4;
    const int64_t m = l / 4 + 8 * (r / 2);
    const int64_t n = n_base + 8 * j + 2 * (l % 4) + (r % 2);
    if (m >= p.M || n >= p.N) continue;
    float v = partial[0][j][l][r];
#pragma unroll
    for (int w = 1; w < kMmaWarps; ++w) v += partial[w][j][l][r];
    v = __fmul_rn(v, p.sw[n]);
    if (p.bias != nullptr) v = __fadd_rn(v, p.bias[n]);
    store_out(p.out, m * p.N + n, v, p.out_type);
  }
}

template <typename XT>
void launch_gemv_mma(const GemvArgs& args) {
  const unsigned blocks = static_cast<unsigned>((args.N + 8 * kMmaTiles - 1) / (8 * kMmaTiles));
  gemv_mma_kernel<XT><<<blocks, kMmaWarps * 32, 0, c10::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename XT>
void launch_gemv(const GemvArgs& args) {
  const unsigned blocks = static_cast<unsigned>((args.N + kGemvRows - 1) / kGemvRows);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  // A tighter bound for M <= 4 keeps decode (M = 1) light on registers.
  if (args.M <= 4) {
    gemv_kernel<XT, 4><<<blocks, kGemvWarps * 32, 0, stream>>>(args);
  } else {
    gemv_kernel<XT, kGemvMaxM><<<blocks, kGemvWarps * 32, 0, stream>>>(args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor int8_linear_weight_only_cuda(const at::Tensor& x, const at::Tensor& weight,
                                        const at::Tensor& weight_scale,
                                        const std::optional<at::Tensor>& bias) {
  check_int8_linear_args(x, weight, weight_scale, bias, /*check_k_overflow=*/false);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = weight.size(0);
  at::Tensor out = at::empty(out_shape(x, N), x.options());
  const int64_t M = leading_rows(x);
  if (M == 0 || N == 0) return out;
  if (weight.size(1) == 0) {
    fill_empty_k(out, bias);
    return out;
  }
  const at::Tensor x2d = rows(x);
  at::Tensor out2d = out.view({M, N});
  if (M <= kGemvMaxM) {
    gemv_weight_only(x2d, weight, weight_scale, bias_f32(bias), out2d);
    return out;
  }
  const at::Tensor w = dequantize(weight, weight_scale, x.scalar_type());
  if (bias.has_value()) {
    at::addmm_out(out2d, bias->to(x.scalar_type()), x2d, w.t());
  } else {
    at::mm_out(out2d, x2d, w.t());
  }
  return out;
}

void gemv_s8(const at::Tensor& q, int64_t ldq, const at::Tensor& sx, const at::Tensor& w,
             const at::Tensor& sw, const at::Tensor& bias, at::Tensor& out) {
  const int64_t K = w.size(1);
  TORCH_INTERNAL_ASSERT(q.size(0) <= kGemvMaxM && ldq % 16 == 0);
  const GemvArgs args{q.data_ptr(), ldq, sx.data_ptr<float>(), w.data_ptr<int8_t>(),
                      sw.data_ptr<float>(), bias.defined() ? bias.data_ptr<float>() : nullptr,
                      out.data_ptr(), q.size(0), w.size(0), K, out_type(out.scalar_type()),
                      K % 16 == 0 && aligned16(q.data_ptr()) && aligned16(w.data_ptr())};
  launch_gemv<int8_t>(args);
}

void gemv_weight_only(const at::Tensor& x2d, const at::Tensor& w, const at::Tensor& sw,
                      const at::Tensor& bias, at::Tensor& out) {
  const int64_t K = w.size(1);
  TORCH_INTERNAL_ASSERT(x2d.is_contiguous() && x2d.size(0) <= kGemvMaxM);
  const GemvArgs args{x2d.data_ptr(), K, nullptr, w.data_ptr<int8_t>(), sw.data_ptr<float>(),
                      bias.defined() ? bias.data_ptr<float>() : nullptr, out.data_ptr(),
                      x2d.size(0), w.size(0), K, out_type(out.scalar_type()),
                      K % 16 == 0 && aligned16(x2d.data_ptr()) && aligned16(w.data_ptr())};
  // Past kGemvMmaMinM rows, fp32 FMA on CUDA cores would cost more than
  // streaming the weight: bf16/fp16 go to the tensor cores.
  const bool mma = x2d.size(0) >= kGemvMmaMinM;
  switch (x2d.scalar_type()) {
    case at::kBFloat16:
      mma ? launch_gemv_mma<__nv_bfloat16>(args) : launch_gemv<__nv_bfloat16>(args);
      break;
    case at::kHalf:
      mma ? launch_gemv_mma<__half>(args) : launch_gemv<__half>(args);
      break;
    default:
      launch_gemv<float>(args);
  }
}

}  // namespace peft_ext::cuda
