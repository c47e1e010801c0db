// AVX2/FMA int8 kernels. Each function carries a target attribute instead of the
// whole file being built with -mavx2, so the library stays loadable on any
// x86-64 CPU; cpu_features decides at run time whether these are called.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include <c10/util/Exception.h>

#include "int8_kernels.h"

#define PEFT_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace peft_ext::cpu {

namespace {

PEFT_AVX2 inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

PEFT_AVX2 inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One 32-byte step of MR x NR int8 dot products. vpmaddubsw multiplies u8 by s8
// and saturates pairs at int16: with a = |x| (<= 127) and b = sign(x) * w
// (|w| <= 127) a pair sums to at most 2 * 127 * 127 = 32258, so it never
// saturates and the result is the exact x * w. vpmaddwd with ones widens to int32.
// Each weight vector is loaded once and used for all MR rows.
template <int MR, int NR>
PEFT_AVX2 inline void step_s8(const int8_t* const* wrows, int64_t k, const int8_t* q,
                              const uint8_t* aq, int64_t ldq, __m256i (&acc)[MR][NR]) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i xs[MR], xa[MR];
  for (int i = 0; i < MR; ++i) {
    xs[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i * ldq));
    xa[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(aq + i * ldq));
  }
  for (int j = 0; j < NR; ++j) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrows[j] + k));
    for (int i = 0; i < MR; ++i) {
      __m256i t = _mm256_sign_epi8(w, xs[i]);
      t = _mm256_maddubs_epi16(xa[i], t);
      t = _mm256_madd_epi16(t, ones);
      acc[i][j] = _mm256_add_epi32(acc[i][j], t);
    }
  }
}

// Full-K dot products of MR activation rows with NR weight rows into out[MR][NR].
template <int MR, int NR>
PEFT_AVX2 void tile_s8(const int8_t* q, const uint8_t* aq, int64_t ldq,
                       const int8_t* const* wrows, int64_t K, int32_t* out) {
  __m256i acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_si256();
  const int64_t k32 = K & ~int64_t{31};
  for (int64_t k = 0; k < k32; k += 32) step_s8<MR, NR>(wrows, k, q + k, aq + k, ldq, acc);
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
    step_s8<MR, NR>(tails, 0, q + k32, aq + k32, ldq, acc);
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
PEFT_AVX2 inline void store_row16(const Epilogue& ep, int64_t m, int64_t n, int64_t nr,
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

// Packed panel of 16 weight rows for the outer-product kernel: for every group
// of 4 k, the 4 bytes of each of the 16 rows side by side ([ceil(K/4)][16][4]),
// so one 32-byte load holds 8 columns x 4 k. Rows past n1 and k past K are zero.
// Blocks of 32 k are transposed in registers; the tail goes group by group.
PEFT_AVX2 void pack_panel(const int8_t* w, int64_t K, int64_t n, int64_t n1, int8_t* panel) {
  const int64_t k32 = K & ~int64_t{31};
  for (int64_t k = 0; k < k32; k += 32) {
    for (int half = 0; half < 2; ++half) {
      __m256i v[8];
      for (int r = 0; r < 8; ++r) {
        const int64_t row = n + 8 * half + r;
        v[r] = row < n1 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + row * K + k))
                        : _mm256_setzero_si256();
      }
      transpose8_store(v, panel + 16 * k + 32 * half);
    }
  }
  const int64_t kq = (K + 3) / 4;
  for (int j = 0; j < 16; ++j) {
    const int8_t* row = w + (n + j) * K;
    for (int64_t t = k32 / 4; t < kq; ++t) {
      int8_t* dst = panel + 64 * t + 4 * j;
      for (int b = 0; b < 4; ++b) {
        const int64_t k = 4 * t + b;
        dst[b] = n + j < n1 && k < K ? row[k] : 0;
      }
    }
  }
}

// MR activation rows x 16 columns over kq groups of 4 k. Each activation
// 4-byte group is broadcast to all lanes; the sign trick of step_s8 keeps
// vpmaddubsw exact. (Measured here: ~20 multiply-adds per cycle against ~14
// for an int16 vpmaddwd variant.)
template <int MR>
PEFT_AVX2 void micro_s8(const int8_t* q, const uint8_t* aq, int64_t ldq, const int8_t* panel,
                        int64_t kq, int32_t (&out)[4][16]) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
  for (int64_t t = 0; t < kq; ++t) {
    const __m256i b0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(panel + 64 * t));
    const __m256i b1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(panel + 64 * t + 32));
    for (int i = 0; i < MR; ++i) {
      int32_t xs4, xa4;
      std::memcpy(&xs4, q + i * ldq + 4 * t, 4);
      std::memcpy(&xa4, aq + i * ldq + 4 * t, 4);
      const __m256i xs = _mm256_set1_epi32(xs4);
      const __m256i xa = _mm256_set1_epi32(xa4);
      acc[i][0] = _mm256_add_epi32(
          acc[i][0], _mm256_madd_epi16(_mm256_maddubs_epi16(xa, _mm256_sign_epi8(b0, xs)), ones));
      acc[i][1] = _mm256_add_epi32(
          acc[i][1], _mm256_madd_epi16(_mm256_maddubs_epi16(xa, _mm256_sign_epi8(b1, xs)), ones));
    }
  }
  for (int i = 0; i < MR; ++i) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[i]), acc[i][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[i] + 8), acc[i][1]);
  }
}

}  // namespace

PEFT_AVX2 void quantize_rows_avx2(const float* x, int64_t ldx, int64_t M, int64_t K, int8_t* q,
                                  uint8_t* aq, int64_t ldq, float* scale) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i lim = _mm256_set1_epi32(127);
  const __m256i nlim = _mm256_set1_epi32(-127);
  // packs interleave 128-bit lanes; this restores element order.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const int64_t k32 = K & ~int64_t{31};
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * ldx;
    __m256 mx = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(xr + k)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    float absmax = _mm_cvtss_f32(m4);
    for (; k < K; ++k) absmax = std::max(absmax, std::fabs(xr[k]));
    const float s = absmax / 127.0f;
    const float inv = absmax > 0.0f ? 1.0f / s : 0.0f;
    scale[m] = s;
    int8_t* qr = q + m * ldq;
    uint8_t* ar = aq + m * ldq;
    const __m256 vinv = _mm256_set1_ps(inv);
    for (k = 0; k < k32; k += 32) {
      __m256i v[4];
      for (int p = 0; p < 4; ++p) {
        // cvtps2dq rounds half to even under the default MXCSR, like torch.round.
        __m256i r = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k + 8 * p), vinv));
        v[p] = _mm256_max_epi32(_mm256_min_epi32(r, lim), nlim);
      }
      const __m256i w16a = _mm256_packs_epi32(v[0], v[1]);
      const __m256i w16b = _mm256_packs_epi32(v[2], v[3]);
      __m256i b = _mm256_packs_epi16(w16a, w16b);
      b = _mm256_permutevar8x32_epi32(b, order);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qr + k), b);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(ar + k), _mm256_abs_epi8(b));
    }
    for (; k < K; ++k) {
      float r = std::nearbyint(xr[k] * inv);
      r = std::min(127.0f, std::max(-127.0f, r));
      qr[k] = static_cast<int8_t>(r);
      ar[k] = static_cast<uint8_t>(std::abs(static_cast<int>(r)));
    }
    std::memset(qr + K, 0, static_cast<size_t>(ldq - K));
    std::memset(ar + K, 0, static_cast<size_t>(ldq - K));
  }
}

PEFT_AVX2 void gemm_s8_avx2(const int8_t* q, const uint8_t* aq, int64_t ldq, const int8_t* w,
                            int64_t M, int64_t K, int64_t n0, int64_t n1, const Epilogue& ep) {
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
          tile_s8<2, NR>(q + m * ldq, aq + m * ldq, ldq, rows, K, res);
        } else {
          tile_s8<1, NR1>(q + m * ldq, aq + m * ldq, ldq, rows, K, res);
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
  constexpr int NR = 8;
  for (int64_t n = n0; n < n1; n += NR) {
    const int64_t nr = std::min<int64_t>(NR, n1 - n);
    const int8_t* rows[NR];
    for (int j = 0; j < NR; ++j) rows[j] = w + std::min<int64_t>(n + j, n1 - 1) * K;
    for (int64_t m = 0; m < M; ++m) {
      float res[NR];
      tile_wo<NR>(x + m * ldx, rows, K, res);
      for (int64_t j = 0; j < nr; ++j) ep.store(m, n + j, res[j]);
    }
  }
}

PEFT_AVX2 void gemm_s8_packed_avx2(const int8_t* q, const uint8_t* aq, int64_t ldq,
                                   const int8_t* w, int64_t M, int64_t K, int64_t n0, int64_t n1,
                                   const Epilogue& ep) {
  const int64_t kq = (K + 3) / 4;
  // One panel of 16 weight rows (K * 16 bytes, L2 resident) serves every group
  // of 4 activation rows.
  auto* panel = static_cast<int8_t*>(std::aligned_alloc(32, static_cast<size_t>(kq * 64)));
  TORCH_CHECK(panel != nullptr, "int8_linear: out of memory for a packed weight panel");
  alignas(32) int32_t res[4][16];
  for (int64_t n = n0; n < n1; n += 16) {
    pack_panel(w, K, n, n1, panel);
    const int64_t nr = std::min<int64_t>(16, n1 - n);
    for (int64_t m = 0; m < M; m += 4) {
      const int64_t mr = std::min<int64_t>(4, M - m);
      const int8_t* qm = q + m * ldq;
      const uint8_t* am = aq + m * ldq;
      switch (mr) {
        case 4: micro_s8<4>(qm, am, ldq, panel, kq, res); break;
        case 3: micro_s8<3>(qm, am, ldq, panel, kq, res); break;
        case 2: micro_s8<2>(qm, am, ldq, panel, kq, res); break;
        default: micro_s8<1>(qm, am, ldq, panel, kq, res); break;
      }
      for (int64_t i = 0; i < mr; ++i) store_row16(ep, m + i, n, nr, res[i]);
    }
  }
  std::free(panel);
}

}  // namespace peft_ext::cpu
