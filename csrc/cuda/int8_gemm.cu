// CUDA W8A8 linear: per-token activation quantization (int8_quant.cu), then
// an int8 tensor-core GEMM (mma.sync m16n8k32 s8.s8.s32, sm_80+) fed by a
// cp.async multi-stage pipeline, with exact int32 sums kept in registers and an
// epilogue that applies s_x, s_w and the bias and writes the output dtype
// directly: no int32 tensor ever goes to global memory.
//
// Weight tiles go through cp.async in 16-, 8- or 4-byte pieces, the widest
// that K and the weight's alignment allow; only odd K (or a misaligned view)
// falls back to byte loads.
//
// Dispatch by shape (int8_linear_cuda):
//   M <= 16                          dp4a GEMV (int8_gemv.cu): streams the weight once
//   tiles of 128x128 fill the GPU    GEMM, 128x128 block tile, 8 warps
//   otherwise                        GEMM, 64x128 block tile, 4 warps (twice the blocks)
//
// Layouts: A = the quantized activations [M, lda] (lda a multiple of 16, zero
// padded past K); B = the weight as stored, row-major int8 [N, K]. That is the
// "col" operand of mma.row.col, so both tiles are copied row by row into
// shared memory and ldmatrix hands out the fragments without any transpose.
#include <algorithm>
#include <array>
#include <atomic>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../int8_checks.h"
#include "int8_cuda.h"
#include "ptx.cuh"

namespace peft_ext::cuda {
namespace {

constexpr int kBN = 128;      // block tile, output columns
constexpr int kBK = 64;       // bytes of K per pipeline stage (two mma k-steps)
constexpr int kStages = 4;    // cp.async pipeline depth
constexpr int kSmemRow = 80;  // kBK + 16: ldmatrix row addresses fall in distinct banks
constexpr int kWarpM = 64;    // warp tile: 4 m16 x 4 n8 mma tiles
constexpr int kWarpN = 32;

// Fragments (PTX ISA, lane = 4 * g + t): a[0] = A[g][4t..4t+3],
// a[1] = A[g+8][4t..], a[2] = A[g][16+4t..], a[3] = A[g+8][16+4t..];
// b[0] = B[k=4t..4t+3][n=g], b[1] = B[k=16+4t..][n=g];
// c[0], c[1] = C[g][2t], C[g][2t+1]; c[2], c[3] = C[g+8][2t], C[g+8][2t+1].
__device__ __forceinline__ void mma_s8(int32_t (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                       uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

struct GemmArgs {
  const int8_t* a;  // [M, lda], zero past K
  const int8_t* w;  // [N, K]
  const float* sx;  // [M]
  const float* sw;  // [N]
  const float* bias;  // [N] or null
  void* out;          // [M, N]
  int64_t M, N, K, lda;
  OutType out_type;
  // Widest cp.async the weight rows allow: 16 (K % 16 == 0, w 16-byte
  // aligned), 8 or 4 bytes; 1 means byte loads (K odd or w misaligned).
  int w_copy;
};

// w_copy for a weight of K columns at address w.
inline int weight_copy_bytes(const void* w, int64_t K) {
  const auto a = reinterpret_cast<uintptr_t>(w);
  for (int b : {16, 8, 4})
    if (K % b == 0 && a % b == 0) return b;
  return 1;
}

// Outputs (m, n) and (m, n + 1) from two int32 sums, in the CPU path's order:
// ((float)acc * s_x) * s_w + bias, each step rounded once.
__device__ __forceinline__ void store_pair(const GemmArgs& p, int64_t o, int64_t n, float sx,
                                           int32_t acc0, int32_t acc1, bool pair_ok) {
  if (n >= p.N) return;
  const bool two = n + 1 < p.N;
  float v0 = __fmul_rn(__fmul_rn(static_cast<float>(acc0), sx), p.sw[n]);
  float v1 = two ? __fmul_rn(__fmul_rn(static_cast<float>(acc1), sx), p.sw[n + 1]) : 0.0f;
  if (p.bias != nullptr) {
    v0 = __fadd_rn(v0, p.bias[n]);
    if (two) v1 = __fadd_rn(v1, p.bias[n + 1]);
  }
  if (two && pair_ok) {
    store_out2(p.out, o, v0, v1, p.out_type);
  } else {
    store_out(p.out, o, v0, p.out_type);
    if (two) store_out(p.out, o + 1, v1, p.out_type);
  }
}

// BM output rows per block, WARPS_M x 4 warps of 64 x 32 outputs each.
// MIN_BLOCKS is __launch_bounds__' minimum of resident blocks per SM, set per
// tile: 2 for the 128-row tile (<= 128 registers, two blocks per SM), 1 for
// the 64-row tile, which otherwise spilled at 128 registers on sm_80
// (8 B stores / 16 B loads; figures in bench/results/ptxas_sm80_sm90.txt).
template <int BM, int WARPS_M, int MIN_BLOCKS>
__global__ void __launch_bounds__(WARPS_M * 4 * 32, MIN_BLOCKS) gemm_s8_kernel(const GemmArgs p) {
  constexpr int kThreads = WARPS_M * 4 * 32;
  constexpr int kChunksA = BM * (kBK / 16);
  constexpr int kChunksB = kBN * (kBK / 16);
  static_assert(BM == WARPS_M * kWarpM, "warp tiling must cover the block tile");
  static_assert(kChunksA % kThreads == 0 && kChunksB % kThreads == 0, "even copy split");

  extern __shared__ __align__(16) int8_t smem[];
  int8_t* sA = smem;                                // [kStages][BM][kSmemRow]
  int8_t* sB = smem + kStages * BM * kSmemRow;      // [kStages][kBN][kSmemRow]

  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  const int warp_m = warp / 4, warp_n = warp % 4;
  const int64_t ktiles = (p.lda + kBK - 1) / kBK;

  auto load_stage = [&](int stage, int64_t kt) {
    const int64_t k0 = kt * kBK;
    int8_t* a_dst = sA + stage * BM * kSmemRow;
    int8_t* b_dst = sB + stage * kBN * kSmemRow;
#pragma unroll
    for (int i = 0; i < kChunksA / kThreads; ++i) {
      const int c = tid + i * kThreads;
      const int row = c / (kBK / 16), col = (c % (kBK / 16)) * 16;
      const int64_t gm = m0 + row, gk = k0 + col;
      const bool ok = gm < p.M && gk < p.lda;
      cp_async16(a_dst + row * kSmemRow + col, ok ? p.a + gm * p.lda + gk : p.a, ok ? 16 : 0);
    }
#pragma unroll
    for (int i = 0; i < kChunksB / kThreads; ++i) {
      const int c = tid + i * kThreads;
      const int row = c / (kBK / 16), col = (c % (kBK / 16)) * 16;
      const int64_t gn = n0 + row, gk = k0 + col;
      int8_t* dst = b_dst + row * kSmemRow + col;
      if (p.w_copy == 16) {
        const bool ok = gn < p.N && gk < p.K;
        cp_async16(dst, ok ? p.w + gn * p.K + gk : p.w, ok ? 16 : 0);
      } else if (p.w_copy == 8) {
        // K % 8 == 0: each 8-byte half lies wholly inside or past K.
#pragma unroll
        for (int h = 0; h < 16; h += 8) {
          const bool ok = gn < p.N && gk + h < p.K;
          cp_async8(dst + h, ok ? p.w + gn * p.K + gk + h : p.w, ok ? 8 : 0);
        }
      } else if (p.w_copy == 4) {
#pragma unroll
        for (int h = 0; h < 16; h += 4) {
          const bool ok = gn < p.N && gk + h < p.K;
          cp_async4(dst + h, ok ? p.w + gn * p.K + gk + h : p.w, ok ? 4 : 0);
        }
      } else {
        // Odd K or a misaligned view: byte loads, zero past K and N. A
        // plain store is visible to the consumers after the __syncthreads
        // that precedes the use of this stage, like the cp.async data.
        uint32_t words[4] = {0u, 0u, 0u, 0u};
        if (gn < p.N) {
          const int8_t* src = p.w + gn * p.K;
#pragma unroll
          for (int b = 0; b < 16; ++b) {
            if (gk + b < p.K) words[b / 4] |= (static_cast<uint32_t>(src[gk + b]) & 0xffu) << (8 * (b % 4));
          }
        }
        *reinterpret_cast<uint4*>(dst) = make_uint4(words[0], words[1], words[2], words[3]);
      }
    }
  };

  int32_t acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ktiles) load_stage(s, s);
    cp_async_commit();
  }

  // ldmatrix.x4 row addresses. A (16 x 32 bytes per m-tile): lanes 0-15 give
  // rows 0-15 at byte 0, lanes 16-31 rows 0-15 at byte 16 -> a[0..3].
  // B (two n8 tiles x 32 bytes): lanes 0-7 rows n 0-7 byte 0 (b[0] of tile 0),
  // 8-15 rows 0-7 byte 16 (b[1] of tile 0), 16-23 rows 8-15 byte 0 and 24-31
  // rows 8-15 byte 16 (tile 1).
  const int a_row = warp_m * kWarpM + (lane & 15);
  const int a_col = (lane >> 4) * 16;
  const int b_row = warp_n * kWarpN + (lane & 7) + ((lane >> 4) << 3);
  const int b_col = ((lane >> 3) & 1) * 16;

  for (int64_t kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    // The slot refilled here was read in iteration kt - 1, which every warp
    // has finished: it passed the barrier above.
    const int64_t next = kt + kStages - 1;
    if (next < ktiles) load_stage(static_cast<int>(next % kStages), next);
    cp_async_commit();

    const int stage = static_cast<int>(kt % kStages);
    const int8_t* a_tile = sA + stage * BM * kSmemRow;
    const int8_t* b_tile = sB + stage * kBN * kSmemRow;
#pragma unroll
    for (int ks = 0; ks < kBK; ks += 32) {
      uint32_t af[4][4];
      uint32_t bf[2][4];
#pragma unroll
      for (int i = 0; i < 4; ++i) ldmatrix_x4(af[i], a_tile + (a_row + i * 16) * kSmemRow + ks + a_col);
#pragma unroll
      for (int j = 0; j < 2; ++j) ldmatrix_x4(bf[j], b_tile + (b_row + j * 16) * kSmemRow + ks + b_col);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) mma_s8(acc[i][j], af[i], bf[j / 2][(j % 2) * 2], bf[j / 2][(j % 2) * 2 + 1]);
    }
  }
  cp_async_wait<0>();

  // Epilogue straight from the accumulators.
  const int g = lane / 4, t = lane % 4;
  const bool pair_ok = p.N % 2 == 0;  // row starts even: two outputs per store
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t m = m0 + warp_m * kWarpM + i * 16 + g + h * 8;
      if (m < p.M) {
        const float sx = p.sx[m];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int64_t n = n0 + warp_n * kWarpN + j * 8 + 2 * t;
          store_pair(p, m * p.N + n, n, sx, acc[i][j][2 * h], acc[i][j][2 * h + 1], pair_ok);
        }
      }
    }
  }
}

// ATen's device-properties helper lives in a header that needs the cuBLAS and
// cuSPARSE headers, which a bare toolkit lacks: ask the runtime once per device
// (the first, eager call; graph capture then makes no runtime query).
int multiprocessor_count(int device) {
  static std::array<std::atomic<int>, 64> cached{};
  if (device < 64 && cached[device].load() > 0) return cached[device].load();
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  if (device < 64) cached[device].store(sms);
  return sms;
}

template <int BM, int WARPS_M, int MIN_BLOCKS>
void launch_gemm(const GemmArgs& args, int device) {
  constexpr int smem = kStages * (BM + kBN) * kSmemRow;
  auto kernel = gemm_s8_kernel<BM, WARPS_M, MIN_BLOCKS>;
  static std::atomic<uint64_t> configured{0};
  opt_in_shared_memory(kernel, smem, device, configured);
  const dim3 grid(static_cast<unsigned>((args.M + BM - 1) / BM), static_cast<unsigned>((args.N + kBN - 1) / kBN));
  kernel<<<grid, WARPS_M * 4 * 32, smem, c10::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor int8_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& weight_scale, const std::optional<at::Tensor>& bias) {
  check_int8_linear_args(x, weight, weight_scale, bias, /*check_k_overflow=*/true);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = weight.size(0), K = weight.size(1);
  at::Tensor out = at::empty(out_shape(x, N), x.options());
  const int64_t M = leading_rows(x);
  if (M == 0 || N == 0) return out;
  if (K == 0) {
    fill_empty_k(out, bias);
    return out;
  }
  const at::Tensor x2d = rows(x);
  // Rows padded to 16 bytes so that every activation chunk is one aligned cp.async.
  const int64_t lda = round_up(std::max<int64_t>(K, 1), 16);
  at::Tensor q = at::empty({M, lda}, x2d.options().dtype(at::kChar));
  at::Tensor sx = at::empty({M}, x2d.options().dtype(at::kFloat));
  quantize_rows(x2d, lda, q, sx);
  const at::Tensor b = bias_f32(bias);
  at::Tensor out2d = out.view({M, N});
  if (M <= kGemvMaxM) {
    gemv_s8(q, lda, sx, weight, weight_scale, b, out2d);
    return out;
  }
  GemmArgs args{q.data_ptr<int8_t>(), weight.data_ptr<int8_t>(), sx.data_ptr<float>(),
                weight_scale.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr,
                out.data_ptr(), M, N, K, lda, out_type(x.scalar_type()),
                weight_copy_bytes(weight.data_ptr(), K)};
  const int64_t big_tiles = ((M + 127) / 128) * ((N + kBN - 1) / kBN);
  const int device = x.get_device();
  const int sms = multiprocessor_count(device);
  if (big_tiles >= sms) {
    launch_gemm<128, 2, 2>(args, device);
  } else {
    launch_gemm<64, 1, 1>(args, device);
  }
  return out;
}

// Every CUDA int8 op, one registration (kernels in int8_quant.cu, int8_gemm.cu, int8_gemv.cu).
TORCH_LIBRARY_IMPL(peft_ext, CUDA, m) {
  m.impl("quantize_per_token", &quantize_per_token_cuda);
  m.impl("int8_linear", &int8_linear_cuda);
  m.impl("int8_linear_weight_only", &int8_linear_weight_only_cuda);
  m.impl("int8_dequantize", &int8_dequantize_cuda);
  m.impl("int8_grad_input", &int8_grad_input_cuda);
}

}  // namespace peft_ext::cuda
