// AVX2/FMA int8 kernels. Each function carries a target attribute instead of the
// whole file being built with -mavx2, so the library stays loadable on any
// x86-64 CPU; cpu_features decides at run time whether these are called.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include <c10/util/Exception.h>

#include "avx2.h"
#include "int8_kernels.h"

namespace peft_ext::cpu {

namespace {

// One 32-byte step of MR x NR int8 dot products. vpmaddubsw multiplies u8 by s8
// and saturates pairs at int16: with a = |w| (<= 128, as u8) and b = sign(w) * x
// (|x| <= 127) a pair sums to at most 2 * 128 * 127 = 32512, so it never
// saturates and the result is the exact x * w, also for a weight of -128
// (the other way round, sign(x) * w, would wrap -(-128) to -128).
// vpmaddwd with ones widens to int32. Each weight vector is loaded once and
// used for all MR rows.
template <int MR, int NR>
PEFT_AVX2 inline void step_s8(const int8_t* const* wrows, int64_t k, const int8_t* q, int64_t ldq,
                              __m256i (&acc)[MR][NR]) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i xs[MR];
  for (int i = 0; i < MR; ++i) xs[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i * ldq));
  for (int j = 0; j < NR; ++j) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrows[j] + k));
    const __m256i wa = _mm256_abs_epi8(w);
    for (int i = 0; i < MR; ++i) {
      __m256i t = _mm256_sign_epi8(xs[i], w);
      t = _mm256_maddubs_epi16(wa, t);
      t = _mm256_madd_epi16(t, ones);
      acc[i][j] = _mm256_add_epi32(acc[i][j], t);
    }
  }
}

// Full-K dot products of MR activation rows with NR weight rows into out[MR][NR].
template <int MR, int NR>
PEFT_AVX2 void tile_s8(const int8_t* q, int64_t ldq, const int8_t* const* wrows, int64_t K,
                       int32_t* out) {
  __m256i acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_si256();
  const int64_t k32 = K & ~int64_t{31};
  for (int64_t k = 0; k < k32; k += 32) step_s8<MR, NR>(wrows, k, q + k, ldq, acc);
  if (k32 < K) {
    // Weight rows are not padded: copy their tails into zeroed blocks rather
    // than read past the end of the buffer. Activations are padded with zeros.
    alignas(32) int8_t tail[NR][32];
    std::memset(tail, 0, sizeof(tail));
    const int8_t* tails[NR];
    for (int j = 0; j < NR; ++j) {
      std::memcpy(tail[j], wrows[j] + k32, static_cast<size_t>(K - k32));
      tails[j] = tail[j];
    }
    step_s8<MR, NR>(tails, 0, q + k32, ldq, acc);
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) out[i * NR + j] = hsum_epi32(acc[i][j]);
}

template <int NR>
PEFT_AVX2 void tile_wo(const float* x, const int8_t* const* wrows, int64_t K, float* out) {
  __m256 acc[NR];
  for (int j = 0; j < NR; ++j) acc[j] = _mm256_setzero_ps();
  const int64_t k8 = K & ~int64_t{7};
  for (int64_t k = 0; k < k8; k += 8) {
    const __m256 xv = _mm256_loadu_ps(x + k);
    for (int j = 0; j < NR; ++j) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(wrows[j] + k));
      acc[j] = _mm256_fmadd_ps(xv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), acc[j]);
    }
  }
  for (int j = 0; j < NR; ++j) {
    float s = hsum_ps(acc[j]);
    for (int64_t k = k8; k < K; ++k) s += x[k] * static_cast<float>(wrows[j][k]);
    out[j] = s;
  }
}

// MR activation rows x NR weight rows: each weight vector is converted to
// float once and used by all MR rows. Same summation order per (row, column)
// as tile_wo (8 lanes, then the horizontal sum, then the scalar tail).
template <int MR, int NR>
PEFT_AVX2 void tile_wo_rows(const float* x, int64_t ldx, const int8_t* const* wrows, int64_t K,
                            float* out) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  const int64_t k8 = K & ~int64_t{7};
  for (int64_t k = 0; k < k8; k += 8) {
    __m256 xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_ps(x + i * ldx + k);
    for (int j = 0; j < NR; ++j) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(wrows[j] + k));
      const __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float s = hsum_ps(acc[i][j]);
      for (int64_t k = k8; k < K; ++k) s += x[i * ldx + k] * static_cast<float>(wrows[j][k]);
      out[i * NR + j] = s;
    }
}

PEFT_AVX2 inline void transpose8_store(__m256i (&v)[8], int8_t* dst) {
  // v[r] holds 8 dwords (groups of 4 k, p = 0..7) of row r; dst + 64 * p
  // receives the 8 rows' dwords of group p.
  __m256i t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {
    const int b = 4 * h;
    u[b + 0] = _mm256_unpacklo_epi64(t[b + 0], t[b + 2]);
    u[b + 1] = _mm256_unpackhi_epi64(t[b + 0], t[b + 2]);
    u[b + 2] = _mm256_unpacklo_epi64(t[b + 1], t[b + 3]);
    u[b + 3] = _mm256_unpackhi_epi64(t[b + 1], t[b + 3]);
  }
  for (int p = 0; p < 4; ++p) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(dst + 64 * p), _mm256_permute2x128_si256(u[p], u[p + 4], 0x20));
    _mm256_store_si256(reinterpret_cast<__m256i*>(dst + 64 * (p + 4)), _mm256_permute2x128_si256(u[p], u[p + 4], 0x31));
  }
}

// Eight finished values to the output in its dtype, rounding like c10's
// scalar conversions (round to nearest even; NaN stays NaN).
PEFT_AVX2 inline void store8(const Epilogue& ep, int64_t i, __m256 v) {
  switch (ep.dtype) {
    case c10::ScalarType::BFloat16: {
      const __m256i bits = _mm256_castps_si256(v);
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
      __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
      const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
      r = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<c10::BFloat16*>(ep.out) + i),
                       _mm256_castsi256_si128(r));
      break;
    }
    case c10::ScalarType::Half:
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<c10::Half*>(ep.out) + i),
                       _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      break;
    default:
      _mm256_storeu_ps(static_cast<float*>(ep.out) + i, v);
  }
}

// One row of a 16-column tile through the epilogue, vectorized. The arithmetic
// order matches Epilogue::store, so both give identical results.
PEFT_AVX2 inline void store_row16_impl(const Epilogue& ep, int64_t m, int64_t n, int64_t nr,
                                  const int32_t* acc) {
  if (nr < 16) {
    for (int64_t j = 0; j < nr; ++j) ep.store(m, n + j, static_cast<float>(acc[j]));
    return;
  }
  const __m256 rs = _mm256_set1_ps(ep.row_scale[m]);
  for (int h = 0; h < 2; ++h) {
    const __m256i a = _mm256_load_si256(reinterpret_cast<const __m256i*>(acc + 8 * h));
    __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(a), rs), _mm256_loadu_ps(ep.col_scale + n + 8 * h));
    if (ep.bias != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(ep.bias + n + 8 * h));
    store8(ep, m * ep.ldo + n + 8 * h, v);
  }
}

// Panel p of the weight (layout in int8_kernels.h). Blocks of 32 k are
// transposed in registers, 8 rows at a time; the tail goes group by group.
PEFT_AVX2 void pack_panel(const int8_t* w, int64_t N, int64_t K, int64_t p, int8_t* panel) {
  const int64_t n = p * kPanelCols;
  const int64_t k32 = K & ~int64_t{31};
  for (int64_t k = 0; k < k32; k += 32) {
    for (int half = 0; half < 2; ++half) {
      __m256i v[8];
      for (int r = 0; r < 8; ++r) {
        const int64_t row = n + 8 * half + r;
        v[r] = row < N ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + row * K + k))
                       : _mm256_setzero_si256();
      }
      transpose8_store(v, panel + 16 * k + 32 * half);
    }
  }
  const int64_t kq = k_groups(K);
  for (int j = 0; j < 16; ++j) {
    for (int64_t t = k32 / 4; t < kq; ++t) {
      int8_t* dst = panel + 64 * t + 4 * j;
      for (int b = 0; b < 4; ++b) {
        const int64_t k = 4 * t + b;
        dst[b] = n + j < N && k < K ? w[(n + j) * K + k] : 0;
      }
    }
  }
}

// Software prefetch one k block (kKc = 64 groups x 64 bytes of a panel) ahead:
// the panel stream then overlaps the arithmetic. Measured here in interleaved
// runs against fbgemm: W8A8 at M = 16 from ~0.78x to ~0.88x, M = 128 from
// ~0.86x to ~0.90x; 1 to 16 KiB ahead were within the noise of each other.
// A prefetch past the end of the buffer is harmless (it never faults); the
// address is formed as an integer, as pointer arithmetic there would be UB.
constexpr int64_t kPrefetchBytes = 4096;

// MR activation rows x 16 columns (one panel) over kq groups of 4 k. Each
// activation 4-byte group is broadcast to all lanes; the operand roles of
// step_s8 (|w| unsigned, sign(w) * x signed) keep vpmaddubsw exact, -128
// included. (Measured here: ~20 multiply-adds per cycle against ~14 for an
// int16 vpmaddwd variant.)
template <int MR>
PEFT_AVX2 void micro_s8(const uint8_t* x, int64_t ldx, const int8_t* panel, int64_t kq,
                        int32_t* out) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MR][2];
  for (int i = 0; i < MR; ++i) {
    acc[i][0] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(out + i * kTileLd));
    acc[i][1] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(out + i * kTileLd + 8));
  }
  for (int64_t t = 0; t < kq; ++t) {
    _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(panel) + 64 * t + kPrefetchBytes),
                 _MM_HINT_T0);
    const __m256i b0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(panel + 64 * t));
    const __m256i b1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(panel + 64 * t + 32));
    const __m256i a0 = _mm256_abs_epi8(b0);
    const __m256i a1 = _mm256_abs_epi8(b1);
    for (int i = 0; i < MR; ++i) {
      int32_t x4;
      std::memcpy(&x4, x + i * ldx + 4 * t, 4);
      const __m256i xb = _mm256_set1_epi32(x4);
      acc[i][0] = _mm256_add_epi32(
          acc[i][0], _mm256_madd_epi16(_mm256_maddubs_epi16(a0, _mm256_sign_epi8(xb, b0)), ones));
      acc[i][1] = _mm256_add_epi32(
          acc[i][1], _mm256_madd_epi16(_mm256_maddubs_epi16(a1, _mm256_sign_epi8(xb, b1)), ones));
    }
  }
  for (int i = 0; i < MR; ++i) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i * kTileLd), acc[i][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i * kTileLd + 8), acc[i][1]);
  }
}

PEFT_AVX2 void micro_avx2(const uint8_t* x, int64_t ldx, int mr, const int8_t* panel,
                          int64_t /*ps*/, int /*np*/, int64_t kq, int32_t* out) {
  switch (mr) {
    case 3: micro_s8<3>(x, ldx, panel, kq, out); break;
    case 2: micro_s8<2>(x, ldx, panel, kq, out); break;
    default: micro_s8<1>(x, ldx, panel, kq, out); break;
  }
}

}  // namespace

PEFT_AVX2 void store_row16_avx2(const Epilogue& ep, int64_t m, int64_t n, int64_t nr,
                                const int32_t* acc) {
  store_row16_impl(ep, m, n, nr, acc);
}

// Three rows: with four, the 8 accumulators, 2 weight vectors, their absolute
// values and the broadcasts do not fit the 16 ymm registers and GCC spills
// (measured in L1 here: ~21 multiply-adds per cycle for three rows, ~16 for four).
PackedKernel packed_kernel_avx2() { return {micro_avx2, store_row16_avx2, 3, 1, false}; }

PEFT_AVX2 void pack_panels_avx2(const int8_t* w, int64_t N, int64_t K, int64_t p0, int64_t p1,
                                int8_t* dst) {
  for (int64_t p = p0; p < p1; ++p) pack_panel(w, N, K, p, dst + (p - p0) * panel_bytes(K));
}

PEFT_AVX2 void quantize_rows_avx2(const float* x, int64_t ldx, int64_t M, int64_t K, int8_t* q,
                                  int64_t ldq, float* scale) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 inf = _mm256_set1_ps(INFINITY);
  const __m256i lim = _mm256_set1_epi32(127);
  const __m256i nlim = _mm256_set1_epi32(-127);
  // packs interleave 128-bit lanes; this restores element order.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const int64_t k32 = K & ~int64_t{31};
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * ldx;
    int8_t* qr = q + m * ldq;
    __m256 mx = _mm256_setzero_ps();
    // |x| not below inf, or unordered: inf or NaN.
    __m256 bad = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      const __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(xr + k));
      mx = _mm256_max_ps(mx, a);
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    float absmax = _mm_cvtss_f32(m4);
    bool finite = _mm256_movemask_ps(bad) == 0;
    for (; k < K; ++k) {
      finite = finite && std::isfinite(xr[k]);
      absmax = std::max(absmax, std::fabs(xr[k]));
    }
    const float s = absmax / 127.0f;
    // absmax 0, or so small (< ~1.8e-43) that the scale underflows to 0: q 0.
    if (!finite || s == 0.0f) {
      scale[m] = finite ? 0.0f : NAN;
      std::memset(qr, 0, static_cast<size_t>(ldq));
      continue;
    }
    scale[m] = s;
    const __m256 vs = _mm256_set1_ps(s);
    for (k = 0; k < k32; k += 32) {
      __m256i v[4];
      for (int p = 0; p < 4; ++p) {
        // cvtps2dq rounds half to even under the default MXCSR, like torch.round.
        __m256i r = _mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(xr + k + 8 * p), vs));
        v[p] = _mm256_max_epi32(_mm256_min_epi32(r, lim), nlim);
      }
      const __m256i w16a = _mm256_packs_epi32(v[0], v[1]);
      const __m256i w16b = _mm256_packs_epi32(v[2], v[3]);
      __m256i b = _mm256_packs_epi16(w16a, w16b);
      b = _mm256_permutevar8x32_epi32(b, order);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qr + k), b);
    }
    for (; k < K; ++k) {
      float r = std::nearbyint(xr[k] / s);
      r = std::min(127.0f, std::max(-127.0f, r));
      qr[k] = static_cast<int8_t>(r);
    }
    std::memset(qr + K, 0, static_cast<size_t>(ldq - K));
  }
}

PEFT_AVX2 void gemm_s8_avx2(const int8_t* q, int64_t ldq, const int8_t* w, int64_t M, int64_t K,
                            int64_t n0, int64_t n1, const Epilogue& ep) {
  // Two activation rows share each weight load; a lone row (decode, M = 1)
  // streams eight weight rows at once instead, to keep more loads in flight.
  constexpr int NR = 4, NR1 = 8;
  // NC weight rows (NC * K bytes, 256 KiB at K = 4096) stay in L2 while every
  // pair of activation rows passes over them.
  const int64_t nc = std::max<int64_t>(NR1, (int64_t{256} << 10) / std::max<int64_t>(K, 1) / NR1 * NR1);
  for (int64_t nb = n0; nb < n1; nb += nc) {
    const int64_t ne = std::min(nb + nc, n1);
    for (int64_t m = 0; m < M; m += 2) {
      const bool pair = M - m >= 2;
      const int64_t step = pair ? NR : NR1;
      for (int64_t n = nb; n < ne; n += step) {
        const int64_t nr = std::min<int64_t>(step, ne - n);
        // A short last tile repeats its last row; the extra results are dropped.
        const int8_t* rows[NR1];
        for (int j = 0; j < step; ++j) rows[j] = w + std::min<int64_t>(n + j, ne - 1) * K;
        int32_t res[2 * NR];
        if (pair) {
          tile_s8<2, NR>(q + m * ldq, ldq, rows, K, res);
        } else {
          tile_s8<1, NR1>(q + m * ldq, ldq, rows, K, res);
        }
        const int64_t mr = pair ? 2 : 1;
        for (int64_t i = 0; i < mr; ++i)
          for (int64_t j = 0; j < nr; ++j) ep.store(m + i, n + j, static_cast<float>(res[i * step + j]));
      }
    }
  }
}

PEFT_AVX2 void gemm_wo_avx2(const float* x, int64_t ldx, const int8_t* w, int64_t M, int64_t K,
                            int64_t n0, int64_t n1, const Epilogue& ep) {
  // A lone row streams eight weight rows at once; several rows share each
  // converted weight vector, four rows by two weight rows at a time.
  constexpr int NR1 = 8, MR = 4, NR = 2;
  const int64_t step = M == 1 ? NR1 : NR;
  for (int64_t n = n0; n < n1; n += step) {
    const int64_t nr = std::min<int64_t>(step, n1 - n);
    const int8_t* rows[NR1];
    for (int j = 0; j < step; ++j) rows[j] = w + std::min<int64_t>(n + j, n1 - 1) * K;
    if (M == 1) {
      float res[NR1];
      tile_wo<NR1>(x, rows, K, res);
      for (int64_t j = 0; j < nr; ++j) ep.store(0, n + j, res[j]);
      continue;
    }
    for (int64_t m = 0; m < M; m += MR) {
      const int64_t mr = std::min<int64_t>(MR, M - m);
      float res[MR * NR];
      switch (mr) {
        case 4: tile_wo_rows<4, NR>(x + m * ldx, ldx, rows, K, res); break;
        case 3: tile_wo_rows<3, NR>(x + m * ldx, ldx, rows, K, res); break;
        case 2: tile_wo_rows<2, NR>(x + m * ldx, ldx, rows, K, res); break;
        default: tile_wo_rows<1, NR>(x + m * ldx, ldx, rows, K, res); break;
      }
      for (int64_t i = 0; i < mr; ++i)
        for (int64_t j = 0; j < nr; ++j) ep.store(m + i, n + j, res[i * NR + j]);
    }
  }
}

}  // namespace peft_ext::cpu
