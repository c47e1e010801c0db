// AVX2/FMA kernel of the int8 backward op (see int8_grad_kernels.h). Per-function
// target attributes keep the library loadable on any x86-64 CPU.
#include <immintrin.h>

#include <algorithm>

#include "int8_grad_kernels.h"

#define PEFT_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace peft_ext::cpu {

namespace {

constexpr int kTileCols = 16;
constexpr int kMaxRows = 6;  // 12 accumulators + 2 weight vectors + 1 broadcast fit 16 ymm

// MR output rows x 16 columns starting at (m, k), summed over all N: each 16
// weight bytes are widened to floats once and used for all MR rows.
template <int MR>
PEFT_AVX2 void tile(const float* g, int64_t N, const int8_t* w, int64_t K, int64_t m, int64_t k,
                    float* out) {
  __m256 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const float* gm = g + m * N;
  const int8_t* wk = w + k;
  for (int64_t n = 0; n < N; ++n) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wk + n * K));
    const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
    const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
    for (int r = 0; r < MR; ++r) {
      const __m256 gv = _mm256_broadcast_ss(gm + r * N + n);
      acc[r][0] = _mm256_fmadd_ps(gv, w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(gv, w1, acc[r][1]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    float* o = out + (m + r) * K + k;
    _mm256_storeu_ps(o, acc[r][0]);
    _mm256_storeu_ps(o + 8, acc[r][1]);
  }
}

PEFT_AVX2 void tile_rows(int rows, const float* g, int64_t N, const int8_t* w, int64_t K,
                         int64_t m, int64_t k, float* out) {
  switch (rows) {
    case 6: return tile<6>(g, N, w, K, m, k, out);
    case 5: return tile<5>(g, N, w, K, m, k, out);
    case 4: return tile<4>(g, N, w, K, m, k, out);
    case 3: return tile<3>(g, N, w, K, m, k, out);
    case 2: return tile<2>(g, N, w, K, m, k, out);
    default: return tile<1>(g, N, w, K, m, k, out);
  }
}

}  // namespace

PEFT_AVX2 void grad_input_avx2(const float* g, int64_t M, int64_t N, const int8_t* w, int64_t K,
                               int64_t k0, int64_t k1, float* out) {
  const int64_t kv = k0 + (k1 - k0) / kTileCols * kTileCols;
  for (int64_t m = 0; m < M; m += kMaxRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, M - m));
    for (int64_t k = k0; k < kv; k += kTileCols) tile_rows(rows, g, N, w, K, m, k, out);
  }
  // The last columns of an odd K: fewer than one tile, same summation order.
  if (kv < k1) grad_input_scalar(g, M, N, w, K, kv, k1, out);
}

}  // namespace peft_ext::cpu
