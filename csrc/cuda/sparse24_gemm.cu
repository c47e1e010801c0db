// CUDA 2:4 sparse linear: y = x @ W^T + bias with W stored as kept values
// [N, K/2] and packed 2-bit positions [N, ceil(K/8)] (csrc/cpu/sparse_kernels.h),
// on the sparse tensor cores (mma.sp m16n8k32, bf16/fp16 in, fp32 sums, sm_80+).
//
// The sparse operand of mma.sp is A (16 x 32, rows = output features n), so
// the GEMM is computed transposed: D[n, m] = W[n, :] . x[m, :]. x [M, K]
// row-major is then the "col" operand B, and both tiles are copied row by row
// into shared memory (cp.async) and handed out with ldmatrix, no transpose.
// The epilogue adds the bias and writes D transposed back into y [M, N].
//
// Metadata needs no conversion: for 16-bit types the PTX metadata of one row
// and 16 columns is a 16-bit word of four 4-bit chunks, each holding the
// positions of the chunk's two kept values (first value in the low two bits),
// which is exactly two consecutive bytes of the stored indices (value j's
// position at bit 2 * (j % 4) of byte j / 4). With sparsity selector 0, lanes
// 4g and 4g+1 supply it: lane 4g+s holds columns 16s..16s+15 of the k32 step,
// row g of the 16-row tile in bits 0-15 and row g+8 in bits 16-31. We use
// mma.sp::ordered_metadata (the PTX ISA advises it: plain mma.sp may be slower
// on newer targets), which needs the two positions of a chunk ascending.
// compress_24 always writes them so; any other chunk (for instance the zeros
// of a freshly constructed, not yet loaded module) is rewritten in registers
// to positions (0, 1) so that the hardware never sees invalid metadata. A
// chunk with unordered or equal positions is therefore computed as if its
// values sat at positions 0 and 1: only compress_24's format is supported.
//
// Shapes: any M and N (tiles zero-filled and stores guarded); K must be a
// multiple of 4 (2:4), and the kernel itself wants K % 64 == 0 and 16-byte
// aligned rows: other K are padded with zeros into temporaries first
// (documented cost: one copy of the weight per call); a misaligned x view
// alone costs a copy of x only.
// float32 inputs have no sparse tensor-core path: they go through the
// decompressed weight and at::linear (cuBLAS), documented as a fallback.
#include <algorithm>
#include <atomic>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../sparse_checks.h"
#include "common.cuh"
#include "ptx.cuh"
#include "sparse_cuda.h"

namespace peft_ext::cuda {
namespace {

constexpr int kBK = 64;       // uncompressed K per pipeline stage: 32 kept values per weight row
constexpr int kWRow = 80;     // bytes per weight row in shared memory (64 + 16: ldmatrix conflict-free)
constexpr int kXRow = 144;    // bytes per activation row (128 + 16)
constexpr int kMetaRow = 8;   // index bytes per weight row per stage (64 columns / 8)

// Every 4-bit chunk whose second position is not above its first becomes
// 0b0100 (positions 0 and 1). Per chunk d = (4 + p1) - p0 lies in [1, 7], so
// the subtraction never borrows across chunks; p1 > p0 exactly when d >= 5.
__device__ __forceinline__ uint32_t ordered_metadata(uint32_t e) {
  const uint32_t p0 = e & 0x33333333u;
  const uint32_t p1 = (e >> 2) & 0x33333333u;
  const uint32_t d = (p1 | 0x44444444u) - p0;
  const uint32_t ok = (d >> 2) & (d | (d >> 1)) & 0x11111111u;
  const uint32_t bad = ~ok & 0x11111111u;
  return (e & ~(bad * 0xFu)) | (bad * 0x4u);
}

// Fragments (PTX ISA, lane = 4g + t): a[0] = A[g][2t, 2t+1] (kept values,
// compressed columns), a[1] = A[g+8][2t..], a[2] = A[g][8+2t..],
// a[3] = A[g+8][8+2t..]; b[r] = B[k = 8r+2t, 8r+2t+1][n = g];
// c[0], c[1] = C[g][2t, 2t+1], c[2], c[3] = C[g+8][2t, 2t+1].
template <bool kHalf>
__device__ __forceinline__ void mma_sp(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[4], uint32_t e) {
  if constexpr (kHalf) {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, "
        "{%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
  } else {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
        "{%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
  }
}

struct Sp24Args {
  const uint16_t* values;  // [N, K/2] bf16/fp16 bits
  const uint8_t* indices;  // [N, K/8]
  const uint16_t* x;       // [M, K]
  const float* bias;       // [N] or null
  void* out;               // [M, N]
  int64_t M, N, K;         // K % 64 == 0
  OutType out_type;
};

// Two outputs of one activation row m at features n, n + 1 (n even).
__device__ __forceinline__ void store2(const Sp24Args& p, int64_t m, int64_t n, float v0, float v1) {
  if (m >= p.M || n >= p.N) return;
  if (p.bias != nullptr) v0 += p.bias[n];
  const int64_t o = m * p.N + n;
  if (n + 1 >= p.N) {
    store_out(p.out, o, v0, p.out_type);
    return;
  }
  if (p.bias != nullptr) v1 += p.bias[n + 1];
  if (p.N % 2 == 0) {  // o even: one 4- or 8-byte store
    store_out2(p.out, o, v0, v1, p.out_type);
  } else {
    store_out(p.out, o, v0, p.out_type);
    store_out(p.out, o + 1, v1, p.out_type);
  }
}

// A block computes BN = WN * TI * 16 output features by BM = WM * TJ * 8
// activation rows with WN x WM warps; each warp TI m16 tiles (features) by TJ
// n8 tiles (rows).
template <bool kHalf, int WN, int WM, int TI, int TJ, int STAGES>
__global__ void __launch_bounds__(WN * WM * 32) sp24_gemm_kernel(const Sp24Args p) {
  constexpr int kThreads = WN * WM * 32;
  constexpr int BN = WN * TI * 16;
  constexpr int BM = WM * TJ * 8;
  constexpr int kWBytes = BN * kWRow, kMetaBytes = BN * kMetaRow, kXBytes = BM * kXRow;
  constexpr int kStageBytes = kWBytes + kMetaBytes + kXBytes;
  static_assert(kStageBytes % 16 == 0, "stages stay 16-byte aligned");

  extern __shared__ __align__(16) uint8_t smem[];

  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int warp_n = warp % WN, warp_m = warp / WN;
  const int64_t ktiles = p.K / kBK;
  const int64_t half_k = p.K / 2, idx_row = p.K / 8;

  auto load_stage = [&](int stage, int64_t kt) {
    uint8_t* w_dst = smem + stage * kStageBytes;
    uint8_t* e_dst = w_dst + kWBytes;
    uint8_t* x_dst = e_dst + kMetaBytes;
    // Kept values: 64 bytes (4 chunks) per weight row.
#pragma unroll
    for (int i = 0; i < (BN * 4 + kThreads - 1) / kThreads; ++i) {
      const int c = tid + i * kThreads;
      if (BN * 4 % kThreads != 0 && c >= BN * 4) break;
      const int row = c / 4, col = c % 4;
      const int64_t gn = n0 + row;
      const bool ok = gn < p.N;
      cp_async16(w_dst + row * kWRow + col * 16, ok ? p.values + gn * half_k + kt * 32 + col * 8 : p.values,
                 ok ? 16 : 0);
    }
    // Positions: 8 bytes per weight row (zero past N: rewritten to a valid chunk).
#pragma unroll
    for (int i = 0; i < (BN + kThreads - 1) / kThreads; ++i) {
      const int c = tid + i * kThreads;
      if (BN % kThreads != 0 && c >= BN) break;
      const int64_t gn = n0 + c;
      const bool ok = gn < p.N;
      cp_async8(e_dst + c * kMetaRow, ok ? p.indices + gn * idx_row + kt * 8 : p.indices, ok ? 8 : 0);
    }
    // Activations: 128 bytes (8 chunks) per row.
#pragma unroll
    for (int i = 0; i < (BM * 8 + kThreads - 1) / kThreads; ++i) {
      const int c = tid + i * kThreads;
      if (BM * 8 % kThreads != 0 && c >= BM * 8) break;
      const int row = c / 8, col = c % 8;
      const int64_t gm = m0 + row;
      const bool ok = gm < p.M;
      cp_async16(x_dst + row * kXRow + col * 16, ok ? p.x + gm * p.K + kt * kBK + col * 8 : p.x, ok ? 16 : 0);
    }
  };

  float acc[TI][TJ][4];
#pragma unroll
  for (int i = 0; i < TI; ++i)
#pragma unroll
    for (int j = 0; j < TJ; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < ktiles) load_stage(s, s);
    cp_async_commit();
  }

  // ldmatrix.x4 row addresses. A (16 rows x 16 kept values = 32 bytes per k32
  // step): lanes 0-15 rows 0-15 at byte 0, lanes 16-31 rows 0-15 at byte 16
  // -> a[0..3]. B (8 activation rows x 32 k = 64 bytes per k32 step): lane l
  // gives row l % 8 at byte 16 * (l / 8) -> b[0..3] = k 0-7, 8-15, 16-23, 24-31.
  const int a_row = warp_n * TI * 16 + (lane & 15);
  const int a_col = (lane >> 4) * 16;
  const int b_row = warp_m * TJ * 8 + (lane & 7);
  const int b_col = (lane >> 3) * 16;
  // Metadata: lane 4g + s reads the 16-bit words of rows g and g + 8, columns
  // 16s.. of the k32 step (lanes with s = 2, 3 are ignored by selector 0 and
  // read the same words as s = 0, 1).
  const int e_row = warp_n * TI * 16 + lane / 4;
  const int e_col = (lane & 1) * 2;

  for (int64_t kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    // The slot refilled here was read in iteration kt - 1, which every warp
    // has finished: it passed the barrier above.
    const int64_t next = kt + STAGES - 1;
    if (next < ktiles) load_stage(static_cast<int>(next % STAGES), next);
    cp_async_commit();

    const uint8_t* w_tile = smem + static_cast<int>(kt % STAGES) * kStageBytes;
    const uint8_t* e_tile = w_tile + kWBytes;
    const uint8_t* x_tile = e_tile + kMetaBytes;
#pragma unroll
    for (int ks = 0; ks < kBK / 32; ++ks) {
      uint32_t af[TI][4], bf[TJ][4], ef[TI];
#pragma unroll
      for (int i = 0; i < TI; ++i) {
        ldmatrix_x4(af[i], w_tile + (a_row + i * 16) * kWRow + ks * 32 + a_col);
        const uint8_t* e = e_tile + (e_row + i * 16) * kMetaRow + ks * 4 + e_col;
        const uint32_t lo = *reinterpret_cast<const uint16_t*>(e);
        const uint32_t hi = *reinterpret_cast<const uint16_t*>(e + 8 * kMetaRow);
        ef[i] = ordered_metadata(lo | (hi << 16));
      }
#pragma unroll
      for (int j = 0; j < TJ; ++j) ldmatrix_x4(bf[j], x_tile + (b_row + j * 8) * kXRow + ks * 64 + b_col);
#pragma unroll
      for (int i = 0; i < TI; ++i)
#pragma unroll
        for (int j = 0; j < TJ; ++j) mma_sp<kHalf>(acc[i][j], af[i], bf[j], ef[i]);
    }
  }
  cp_async_wait<0>();

  // acc[i][j] holds D[n][m] for features n = g, g + 8 and rows m = 2t, 2t + 1.
  // Lanes g and g ^ 1 trade one value so that each holds two adjacent
  // features of one row: even g keeps row 2t (features g, g + 1), odd g row
  // 2t + 1 (features g - 1, g). Every shuffle runs first, in one fully
  // unrolled pass that rewrites acc in place (lane-dependent choices are
  // selects on registers, never an indexed array, so acc stays in registers:
  // the former interleaved shuffle-and-store loop kept it in local memory),
  // then the guarded stores.
  const int g = lane / 4, t = lane % 4;
  const bool even = (g & 1) == 0;
#pragma unroll
  for (int i = 0; i < TI; ++i) {
#pragma unroll
    for (int j = 0; j < TJ; ++j) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float c0 = acc[i][j][2 * h], c1 = acc[i][j][2 * h + 1];
        const float other = __shfl_xor_sync(0xffffffffu, even ? c1 : c0, 4);
        acc[i][j][2 * h] = even ? c0 : other;
        acc[i][j][2 * h + 1] = even ? other : c1;
      }
    }
  }
  const int64_t n_warp = n0 + warp_n * TI * 16 + (g & ~1);
  const int64_t m_warp = m0 + warp_m * TJ * 8 + 2 * t + (even ? 0 : 1);
#pragma unroll
  for (int i = 0; i < TI; ++i) {
#pragma unroll
    for (int j = 0; j < TJ; ++j) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        store2(p, m_warp + j * 8, n_warp + i * 16 + h * 8, acc[i][j][2 * h], acc[i][j][2 * h + 1]);
      }
    }
  }
}

template <bool kHalf, int WN, int WM, int TI, int TJ, int STAGES>
void launch(const Sp24Args& args, int device) {
  constexpr int BN = WN * TI * 16, BM = WM * TJ * 8;
  constexpr int smem = STAGES * (BN * (kWRow + kMetaRow) + BM * kXRow);
  auto kernel = sp24_gemm_kernel<kHalf, WN, WM, TI, TJ, STAGES>;
  static std::atomic<uint64_t> configured{0};
  opt_in_shared_memory(kernel, smem, device, configured);
  const int64_t m_tiles = (args.M + BM - 1) / BM;
  TORCH_CHECK_VALUE(m_tiles <= 65535, "x has ", args.M, " rows; the 2:4 kernel takes at most ", 65535 * BM);
  const dim3 grid(static_cast<unsigned>((args.N + BN - 1) / BN), static_cast<unsigned>(m_tiles));
  kernel<<<grid, WN * WM * 32, smem, c10::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Up to this many activation rows the small tile (64 features x 32 rows, 4
// warps) launches twice as many blocks along N as the large one (128 x 128,
// 8 warps): with few rows the kernel streams the weight and needs the blocks.
constexpr int64_t kSmallTileMaxM = 64;

template <bool kHalf>
void dispatch(const Sp24Args& args, int device) {
  if (args.M <= kSmallTileMaxM) {
    launch<kHalf, 4, 1, 1, 4, 4>(args, device);
  } else {
    launch<kHalf, 2, 4, 4, 4, 3>(args, device);
  }
}

// rows x cols of t (2-D, contiguous) copied into the top left of a zero
// tensor with `padded_cols` columns.
at::Tensor pad_cols(const at::Tensor& t, int64_t padded_cols) {
  at::Tensor out = at::zeros({t.size(0), padded_cols}, t.options());
  out.narrow(1, 0, t.size(1)).copy_(t);
  return out;
}

}  // namespace

at::Tensor sparse24_linear_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
                                const c10::optional<at::Tensor>& bias) {
  const auto nk = check_sparse24_args(x, values, indices, bias);
  const int64_t N = nk.first, K = nk.second;
  const c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType dtype = x.scalar_type();
  at::Tensor out = at::empty(out_shape(x, N), x.options());
  const int64_t M = leading_rows(x);
  if (M == 0 || N == 0) return out;
  if (K == 0) {
    fill_empty_k(out, bias);
    return out;
  }
  if (dtype == at::kFloat) {
    // No float32 sparse tensor-core path: decompress, then cuBLAS.
    const at::Tensor b = bias.has_value() ? bias->to(dtype) : at::Tensor();
    return at::linear(x, decompress_24(values.to(dtype), indices), b);
  }
  at::Tensor x2d = rows(x);
  at::Tensor v = values.to(dtype).contiguous();
  at::Tensor idx = indices;
  const int64_t Kp = round_up(K, kBK);
  // x and the weight are padded (or realigned) independently: a misaligned
  // activation view must not cost a copy of the whole compressed weight.
  // Zero values and zero x columns contribute nothing; zero positions are
  // rewritten in-kernel to a valid chunk.
  if (Kp != K || !aligned16(x2d.data_ptr())) x2d = pad_cols(x2d, Kp);
  if (Kp != K || !aligned16(v.data_ptr()) || reinterpret_cast<uintptr_t>(idx.data_ptr()) % 8 != 0) {
    v = pad_cols(v, Kp / 2);
    idx = pad_cols(idx, Kp / 8);
  }
  const at::Tensor b = bias_f32(bias);
  const Sp24Args args{reinterpret_cast<const uint16_t*>(v.data_ptr()), idx.data_ptr<uint8_t>(),
                      reinterpret_cast<const uint16_t*>(x2d.data_ptr()), b.defined() ? b.data_ptr<float>() : nullptr,
                      out.data_ptr(), M, N, Kp, out_type(dtype)};
  if (dtype == at::kHalf) {
    dispatch<true>(args, x.get_device());
  } else {
    dispatch<false>(args, x.get_device());
  }
  return out;
}

// W [N, K] from the 2:4 format, with ATen ops on the tensors' device.
at::Tensor decompress_24(const at::Tensor& values, const at::Tensor& indices) {
  const int64_t N = values.size(0), half = values.size(1);
  const at::Tensor shifts = at::arange(0, 8, 2, indices.options());
  const at::Tensor pos =
      at::bitwise_and(at::bitwise_right_shift(indices.unsqueeze(-1), shifts), 3)
          .reshape({N, indices.size(1) * 4})
          .narrow(1, 0, half);
  const at::Tensor group = at::floor_divide(at::arange(half, indices.options().dtype(at::kLong)), 2).mul_(4);
  return at::zeros({N, 2 * half}, values.options()).scatter_(1, pos.to(at::kLong) + group, values);
}

}  // namespace peft_ext::cuda
