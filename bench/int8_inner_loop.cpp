// In-register throughput of the AVX2 int8 inner loops, one thread, operands in L1:
// why exact W8A8 on AVX2 stays below fbgemm's rate (README, issue 11).
//
//   g++ -O3 -o /tmp/int8_inner_loop bench/int8_inner_loop.cpp && /tmp/int8_inner_loop
//
// Both loops run the tile of our AVX2 micro kernel (csrc/cpu/int8_gemm_avx2.cpp:
// micro_s8, 3 activation rows x one 16-column panel, 6 accumulators) over a
// 4 KiB panel slice that stays in L1:
//  - exact:  vpmaddubsw(|w|, sign(x, w)), vpmaddwd(ones), vpaddd: the sign trick
//            that keeps 8-bit activations exact (4 ops per 32 multiply-adds, plus
//            one vpabsb per weight vector shared by the 3 rows);
//  - 7-bit:  vpmaddubsw(x, w), vpmaddwd(ones), vpaddd: fbgemm's scheme, exact only
//            because its activations are 7-bit (reduce_range), 3 ops per 32.
// Rounds alternate between the two (this VM's speed drifts); prints JSON with
// the medians and their ratio.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

namespace {

constexpr int kMr = 3;
constexpr int64_t kKq = 64;  // groups of 4 k: a 4 KiB panel slice, as the driver's k block

template <bool kExact>
__attribute__((target("avx2"), noinline)) void tile(const uint8_t* x, int64_t ldx,
                                                    const int8_t* panel, int32_t* out) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[kMr][2];
  for (int i = 0; i < kMr; ++i) {
    acc[i][0] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(out + 16 * i));
    acc[i][1] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(out + 16 * i + 8));
  }
  for (int64_t t = 0; t < kKq; ++t) {
    const __m256i b0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(panel + 64 * t));
    const __m256i b1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(panel + 64 * t + 32));
    const __m256i a0 = kExact ? _mm256_abs_epi8(b0) : b0;
    const __m256i a1 = kExact ? _mm256_abs_epi8(b1) : b1;
    for (int i = 0; i < kMr; ++i) {
      int32_t x4;
      std::memcpy(&x4, x + i * ldx + 4 * t, 4);
      const __m256i xb = _mm256_set1_epi32(x4);
      __m256i p0, p1;
      if (kExact) {
        p0 = _mm256_maddubs_epi16(a0, _mm256_sign_epi8(xb, b0));
        p1 = _mm256_maddubs_epi16(a1, _mm256_sign_epi8(xb, b1));
      } else {
        p0 = _mm256_maddubs_epi16(xb, a0);
        p1 = _mm256_maddubs_epi16(xb, a1);
      }
      acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(p0, ones));
      acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(p1, ones));
    }
  }
  for (int i = 0; i < kMr; ++i) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16 * i), acc[i][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16 * i + 8), acc[i][1]);
  }
}

template <bool kExact>
double gmacs(const uint8_t* x, const int8_t* panel, int reps) {
  alignas(32) int32_t out[16 * kMr] = {};
  const auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < reps; ++r) tile<kExact>(x, 4 * kKq, panel, out);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  volatile int32_t sink = out[0];
  (void)sink;
  return static_cast<double>(reps) * kKq * 4 * 16 * kMr / s / 1e9;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main() {
  if (!__builtin_cpu_supports("avx2")) {
    std::printf("{\"error\": \"this CPU has no AVX2\"}\n");
    return 1;
  }
  alignas(64) static int8_t panel[64 * kKq];
  alignas(64) static uint8_t x[kMr * 4 * kKq];
  for (int i = 0; i < 64 * kKq; ++i) panel[i] = static_cast<int8_t>((i * 37) % 255 - 127);
  for (int i = 0; i < kMr * 4 * kKq; ++i) x[i] = static_cast<uint8_t>((i * 11) % 128);
  const int reps = 200000, rounds = 15;
  std::vector<double> exact, seven;
  gmacs<true>(x, panel, reps);  // warm-up
  gmacs<false>(x, panel, reps);
  for (int r = 0; r < rounds; ++r) {
    exact.push_back(gmacs<true>(x, panel, reps));
    seven.push_back(gmacs<false>(x, panel, reps));
  }
  std::vector<double> ratio(rounds);
  for (int r = 0; r < rounds; ++r) ratio[r] = exact[r] / seven[r];
  std::printf(
      "{\"tile\": \"%d rows x 16 columns, %lld groups of 4 k in L1, one thread\", "
      "\"exact_8bit_gmacs\": %.2f, \"fbgemm_7bit_gmacs\": %.2f, "
      "\"exact_over_7bit_median_of_pairs\": %.3f, \"rounds\": %d}\n",
      kMr, static_cast<long long>(kKq), median(exact), median(seven), median(ratio), rounds);
  return 0;
}
