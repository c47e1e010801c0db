// AVX2/FMA sparse-weight kernels, chosen at run time like int8_gemm_avx2.cpp
// (per-function target attributes, no -mavx2 on the file).
#include <algorithm>
#include <cstring>
#include <vector>

#include "avx2.h"
#include "sparse_kernels.h"

namespace peft_ext::cpu {

namespace {

// One weight row against MR activation rows. Eight kept values cover 16
// columns: their x values are picked out of two 8-wide loads by a permute
// each (vpermps, no gather), so x is read contiguously and only the kept half
// of the weights (plus 2 bits each) comes from memory.
template <int MR>
PEFT_AVX2 void sp24_row(const float* x, int64_t ldx, const float* v, const uint8_t* idx, int64_t K,
                        float* out, int64_t ldo) {
  const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i base = _mm256_setr_epi32(0, 0, 4, 4, 0, 0, 4, 4);
  const __m256i three = _mm256_set1_epi32(3);
  __m256 acc0[MR], acc1[MR];
  for (int i = 0; i < MR; ++i) acc0[i] = acc1[i] = _mm256_setzero_ps();
  // 16 columns (8 kept values) per step; two steps per iteration into two
  // accumulator sets, which halves the FMA dependency chain at M = 1.
  auto step = [&](int64_t t, __m256(&acc)[MR]) PEFT_AVX2_LAMBDA {
    uint16_t bits;
    std::memcpy(&bits, idx + 2 * t, 2);
    const __m256i pos = _mm256_add_epi32(
        _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(bits), shifts), three), base);
    const __m256 w = _mm256_loadu_ps(v + 8 * t);
    for (int i = 0; i < MR; ++i) {
      const float* xr = x + i * ldx + 16 * t;
      const __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xr), pos);
      const __m256 hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xr + 8), pos);
      acc[i] = _mm256_fmadd_ps(w, _mm256_blend_ps(lo, hi, 0xF0), acc[i]);
    }
  };
  const int64_t steps = K / 16;
  int64_t t = 0;
  for (; t + 2 <= steps; t += 2) {
    step(t, acc0);
    step(t + 1, acc1);
  }
  if (t < steps) step(t, acc0);
  for (int i = 0; i < MR; ++i) {
    float s = hsum_ps(_mm256_add_ps(acc0[i], acc1[i]));
    for (int64_t j = 8 * steps; j < K / 2; ++j) s += v[j] * x[i * ldx + sp24_column(idx, j)];
    out[i * ldo] = s;
  }
}

// xT and yT rows are 32-byte aligned (torch allocations, ldt a multiple of 8).
// NR weight rows against one activation row (M < 4). Several rows at once
// keep several weight streams in flight, which a lone stream does not: at
// M = 1 the kernel is bound by how fast the kept values arrive (one Zen 3
// core, K = N = 4096: 1 row 3.5 ms, 4 rows 2.6 ms, 8 rows 2.5 ms).
template <int NR>
PEFT_AVX2 void sp24_rows_x1(const float* x, const float* v, int64_t half, const uint8_t* idx, int64_t ib,
                            int64_t K, float* out) {
  const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i base = _mm256_setr_epi32(0, 0, 4, 4, 0, 0, 4, 4);
  const __m256i three = _mm256_set1_epi32(3);
  __m256 acc[NR];
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) acc[r] = _mm256_setzero_ps();
  const int64_t steps = K / 16;
  for (int64_t t = 0; t < steps; ++t) {
    const __m256 lo = _mm256_loadu_ps(x + 16 * t);
    const __m256 hi = _mm256_loadu_ps(x + 16 * t + 8);
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      uint16_t bits;
      std::memcpy(&bits, idx + r * ib + 2 * t, 2);
      const __m256i pos = _mm256_add_epi32(
          _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(bits), shifts), three), base);
      const __m256 g = _mm256_blend_ps(_mm256_permutevar8x32_ps(lo, pos), _mm256_permutevar8x32_ps(hi, pos), 0xF0);
      acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(v + r * half + 8 * t), g, acc[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) {
    float s = hsum_ps(acc[r]);
    for (int64_t j = 8 * steps; j < half; ++j) s += v[r * half + j] * x[sp24_column(idx + r * ib, j)];
    out[r] = s;
  }
}

// yT[0 .. 8 * MV) += sum_j vals[j] * xT[cols[j] * ldt + (0 .. 8 * MV)]: each
// stored weight is broadcast once and multiplies MV vectors of activations.
template <int MV>
PEFT_AVX2 void entries_tile(const float* xT, int64_t ldt, const int32_t* cols, const float* vals,
                            int64_t L, float* yT) {
  if (L == 0) return;
  // acc starts as the first product and yT is added at the end: with a zero
  // or yT-loaded start GCC keeps acc in memory and stores it every iteration.
  __m256 acc[MV];
  {
    const float* xp = xT + static_cast<int64_t>(cols[0]) * ldt;
    const __m256 w = _mm256_broadcast_ss(vals);
#pragma GCC unroll 8
    for (int u = 0; u < MV; ++u) acc[u] = _mm256_mul_ps(w, _mm256_load_ps(xp + 8 * u));
  }
  for (int64_t j = 1; j < L; ++j) {
    const float* xp = xT + static_cast<int64_t>(cols[j]) * ldt;
    const __m256 w = _mm256_broadcast_ss(vals + j);
#pragma GCC unroll 8
    for (int u = 0; u < MV; ++u) acc[u] = _mm256_fmadd_ps(w, _mm256_load_ps(xp + 8 * u), acc[u]);
  }
#pragma GCC unroll 8
  for (int u = 0; u < MV; ++u) _mm256_store_ps(yT + 8 * u, _mm256_add_ps(acc[u], _mm256_load_ps(yT + 8 * u)));
}

// All of one weight row's entries against every column tile of xT.
PEFT_AVX2 void entries_row(const float* xT, int64_t ldt, const int32_t* cols, const float* vals,
                           int64_t L, float* yT) {
  constexpr int64_t kTile = 64;
  for (int64_t m = 0; m < ldt; m += kTile) {
    const int64_t mv = std::min<int64_t>(kTile, ldt - m) / 8;
    const float* xm = xT + m;
    float* ym = yT + m;
    switch (mv) {
      case 8: entries_tile<8>(xm, ldt, cols, vals, L, ym); break;
      case 7: entries_tile<7>(xm, ldt, cols, vals, L, ym); break;
      case 6: entries_tile<6>(xm, ldt, cols, vals, L, ym); break;
      case 5: entries_tile<5>(xm, ldt, cols, vals, L, ym); break;
      case 4: entries_tile<4>(xm, ldt, cols, vals, L, ym); break;
      case 3: entries_tile<3>(xm, ldt, cols, vals, L, ym); break;
      case 2: entries_tile<2>(xm, ldt, cols, vals, L, ym); break;
      default: entries_tile<1>(xm, ldt, cols, vals, L, ym); break;
    }
  }
}

// Columns of x handled per pass: the xT rows they touch (32 x 64 floats per
// column tile, 8 KiB; 16 KiB for both tiles at M = 128) stay in L1 while a
// chunk of kRowBlock weight rows uses them (32 measured best of 16..256).
constexpr int64_t kColBlock = 32;
constexpr int64_t kRowBlock = 32;

// Rows [i, i + NR) of block b against one column tile of xT, added into
// yT. The block's xT slice (bw x 8 * MV floats) stays in L1 while every row
// pair of the block passes over it.
template <int NR, int MV>
PEFT_AVX2 void bsr_tile(const float* xT, int64_t ldt, const Bsr& w, int64_t r, int64_t b, int64_t i,
                        float* yT) {
  const float* xb = xT + static_cast<int64_t>(w.col[b]) * w.bw * ldt;
  const float* vb = w.values + (b * w.bh + i) * w.bw;
  __m256 acc[NR][MV];
#pragma GCC unroll 8
  for (int a = 0; a < NR; ++a)
#pragma GCC unroll 8
    for (int u = 0; u < MV; ++u) acc[a][u] = _mm256_setzero_ps();
  for (int64_t c = 0; c < w.bw; ++c) {
    __m256 xv[MV];
#pragma GCC unroll 8
    for (int u = 0; u < MV; ++u) xv[u] = _mm256_load_ps(xb + c * ldt + 8 * u);
#pragma GCC unroll 8
    for (int a = 0; a < NR; ++a) {
      const __m256 wv = _mm256_broadcast_ss(vb + a * w.bw + c);
#pragma GCC unroll 8
      for (int u = 0; u < MV; ++u) acc[a][u] = _mm256_fmadd_ps(wv, xv[u], acc[a][u]);
    }
  }
#pragma GCC unroll 8
  for (int a = 0; a < NR; ++a) {
    float* y = yT + (r * w.bh + i + a) * ldt;
#pragma GCC unroll 8
    for (int u = 0; u < MV; ++u) _mm256_store_ps(y + 8 * u, _mm256_add_ps(acc[a][u], _mm256_load_ps(y + 8 * u)));
  }
}

template <int NR>
PEFT_AVX2 void bsr_rows_tile(const float* x, const Bsr& w, int64_t r, int64_t i, float* out, int64_t ldo) {
  __m256 acc[NR];
  for (int a = 0; a < NR; ++a) acc[a] = _mm256_setzero_ps();
  for (int64_t b = w.crow[r]; b < w.crow[r + 1]; ++b) {
    const float* xb = x + static_cast<int64_t>(w.col[b]) * w.bw;
    const float* vb = w.values + (b * w.bh + i) * w.bw;
    for (int64_t c = 0; c < w.bw; c += 8) {
      const __m256 xv = _mm256_loadu_ps(xb + c);
      for (int a = 0; a < NR; ++a) acc[a] = _mm256_fmadd_ps(_mm256_loadu_ps(vb + a * w.bw + c), xv, acc[a]);
    }
  }
  for (int a = 0; a < NR; ++a) out[a * ldo] = hsum_ps(acc[a]);
}

}  // namespace

PEFT_AVX2 void sp24_rows_avx2(const float* x, int64_t ldx, int64_t M, const Sp24& w, int64_t n0,
                              int64_t n1, float* y, int64_t ldy) {
  const int64_t half = w.K / 2, ib = (w.K + 7) / 8;
  if (M < 4) {
    for (int64_t m = 0; m < M; ++m) {
      int64_t n = n0;
      for (; n + 8 <= n1; n += 8)
        sp24_rows_x1<8>(x + m * ldx, w.values + n * half, half, w.indices + n * ib, ib, w.K, y + m * ldy + n);
      for (; n + 4 <= n1; n += 4)
        sp24_rows_x1<4>(x + m * ldx, w.values + n * half, half, w.indices + n * ib, ib, w.K, y + m * ldy + n);
      for (; n < n1; ++n)
        sp24_rows_x1<1>(x + m * ldx, w.values + n * half, half, w.indices + n * ib, ib, w.K, y + m * ldy + n);
    }
    return;
  }
  for (int64_t n = n0; n < n1; ++n) {
    const float* v = w.values + n * half;
    const uint8_t* idx = w.indices + n * ib;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) sp24_row<4>(x + m * ldx, ldx, v, idx, w.K, y + m * ldy + n, ldy);
    for (; m + 2 <= M; m += 2) sp24_row<2>(x + m * ldx, ldx, v, idx, w.K, y + m * ldy + n, ldy);
    if (m < M) sp24_row<1>(x + m * ldx, ldx, v, idx, w.K, y + m * ldy + n, ldy);
  }
}

PEFT_AVX2 void sp24_transposed_avx2(const float* xT, int64_t ldt, const Sp24& w, int64_t n0, int64_t n1,
                                    float* yT) {
  const int64_t half = w.K / 2, ib = (w.K + 7) / 8;
  int32_t cols[kColBlock / 2];
  // Chunks of kRowBlock weight rows keep their yT rows in cache across the
  // column blocks.
  for (int64_t nb = n0; nb < n1; nb += kRowBlock) {
    const int64_t ne = std::min(n1, nb + kRowBlock);
    for (int64_t k0 = 0; k0 < w.K; k0 += kColBlock) {
      const int64_t j0 = k0 / 2, j1 = std::min(w.K, k0 + kColBlock) / 2;
      for (int64_t n = nb; n < ne; ++n) {
        const uint8_t* idx = w.indices + n * ib;
        for (int64_t j = j0; j < j1; ++j) cols[j - j0] = static_cast<int32_t>(sp24_column(idx, j));
        entries_row(xT, ldt, cols, w.values + n * half + j0, j1 - j0, yT + n * ldt);
      }
    }
  }
}

PEFT_AVX2 void csr_transposed_avx2(const float* xT, int64_t ldt, const Csr& w, int64_t n0, int64_t n1,
                                   float* yT) {
  std::vector<int64_t> cursor(w.crow + n0, w.crow + n1);
  int64_t K = 0;
  for (int64_t n = n0; n < n1; ++n)
    if (w.crow[n + 1] > w.crow[n]) K = std::max<int64_t>(K, w.col[w.crow[n + 1] - 1] + 1);
  for (int64_t k0 = 0; k0 < K; k0 += kColBlock) {
    for (int64_t n = n0; n < n1; ++n) {
      int64_t& p = cursor[n - n0];
      int64_t e = p;
      while (e < w.crow[n + 1] && w.col[e] < k0 + kColBlock) ++e;
      if (e > p) entries_row(xT, ldt, w.col + p, w.values + p, e - p, yT + n * ldt);
      p = e;
    }
  }
}

PEFT_AVX2 void bsr_transposed_avx2(const float* xT, int64_t ldt, const Bsr& w, int64_t r0, int64_t r1,
                                   float* yT) {
  constexpr int64_t kTile = 32;
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t m = 0; m < ldt; m += kTile) {
      const int64_t mv = std::min<int64_t>(kTile, ldt - m) / 8;
      for (int64_t b = w.crow[r]; b < w.crow[r + 1]; ++b) {
        for (int64_t i = 0; i < w.bh; i += 2) {
          const bool pair = i + 1 < w.bh;
#define PEFT_BSR_TILE(MV)                                  \
  if (pair)                                                 \
    bsr_tile<2, MV>(xT + m, ldt, w, r, b, i, yT + m);       \
  else                                                      \
    bsr_tile<1, MV>(xT + m, ldt, w, r, b, i, yT + m);
          switch (mv) {
            case 4: PEFT_BSR_TILE(4) break;
            case 3: PEFT_BSR_TILE(3) break;
            case 2: PEFT_BSR_TILE(2) break;
            default: PEFT_BSR_TILE(1) break;
          }
#undef PEFT_BSR_TILE
        }
      }
    }
  }
}

PEFT_AVX2 void bsr_rows_avx2(const float* x, int64_t ldx, int64_t M, const Bsr& w, int64_t r0, int64_t r1,
                             float* y, int64_t ldy) {
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t m = 0; m < M; ++m) {
      int64_t i = 0;
      float* out = y + m * ldy + r * w.bh;
      for (; i + 8 <= w.bh; i += 8) bsr_rows_tile<8>(x + m * ldx, w, r, i, out + i, 1);
      for (; i + 4 <= w.bh; i += 4) bsr_rows_tile<4>(x + m * ldx, w, r, i, out + i, 1);
      for (; i < w.bh; ++i) bsr_rows_tile<1>(x + m * ldx, w, r, i, out + i, 1);
    }
  }
}

}  // namespace peft_ext::cpu
