// In-register throughput of the AVX2 int8 inner loops, one thread, operands in L1:
// why exact W8A8 on AVX2 stays below fbgemm's rate (README, issue 11).
//
//   g++ -O3 -std=c++17 -pthread -o /tmp/int8_inner_loop bench/int8_inner_loop.cpp && /tmp/int8_inner_loop
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
//
// On a CPU with AVX-512 VNNI it also times, per thread:
//  - vnni512_peak: 24 independent zmm vpdpbusd chains on registers only, the
//    instruction's own rate, on one thread and on both cores at once (the
//    machine's in-register peak is twice the second);
//  - vnni512_micro / vnni256_micro: our micro kernels themselves (the .inc
//    bodies of csrc/cpu, 6 rows x 4 panels of 16 columns and, for the 256-bit
//    EVEX form, 6 rows x 2 panels) over panel slices of 4 KiB each in L1, as
//    the driver's k block.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <thread>
#include <vector>

// The micro kernels exactly as the library builds them (their .inc bodies).
namespace peft_ext::cpu {
constexpr int kTileLd = 64;
#define PEFT_AVX512_TARGET "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni"
#define PEFT_AVX512_NS zmm
#include "../csrc/cpu/int8_gemm_avx512_vnni.inc"
#undef PEFT_AVX512_NS
#define PEFT_VNNI256_TARGET PEFT_AVX512_TARGET
#define PEFT_DPBUSD _mm256_dpbusd_epi32
#define PEFT_VNNI256_NS ymm
#define PEFT_VNNI256_NP 2
#include "../csrc/cpu/int8_gemm_vnni256.inc"
#undef PEFT_VNNI256_TARGET
#undef PEFT_DPBUSD
#undef PEFT_VNNI256_NS
#undef PEFT_VNNI256_NP
}  // namespace peft_ext::cpu

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

// 24 independent chains of zmm vpdpbusd, operands in registers: 24 * 64
// multiply-adds per step, written in asm so the compiler neither merges the
// chains nor moves the accumulators through memory.
__attribute__((target(PEFT_AVX512_TARGET), noinline)) double vnni512_peak(int64_t steps) {
  __m512i a = _mm512_set1_epi32(0x01020304), b = _mm512_set1_epi32(0x05060708);
  const auto t0 = std::chrono::steady_clock::now();
  // The accumulators' starting values do not matter: the rate is the same for any.
  asm volatile(
      "1:\n\t"
#define PEFT_DP(r) "vpdpbusd %[b], %[a], %%zmm" #r "\n\t"
      PEFT_DP(8) PEFT_DP(9) PEFT_DP(10) PEFT_DP(11) PEFT_DP(12) PEFT_DP(13) PEFT_DP(14)
      PEFT_DP(15) PEFT_DP(16) PEFT_DP(17) PEFT_DP(18) PEFT_DP(19) PEFT_DP(20) PEFT_DP(21)
      PEFT_DP(22) PEFT_DP(23) PEFT_DP(24) PEFT_DP(25) PEFT_DP(26) PEFT_DP(27) PEFT_DP(28)
      PEFT_DP(29) PEFT_DP(30) PEFT_DP(31)
#undef PEFT_DP
      "dec %[n]\n\t"
      "jnz 1b\n\t"
      : [n] "+r"(steps)
      : [a] "v"(a), [b] "v"(b)
      : "cc", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16",
        "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23", "xmm24", "xmm25", "xmm26",
        "xmm27", "xmm28", "xmm29", "xmm30", "xmm31");
  const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return sec;
}

// One of our VNNI micro kernels (np panels of kKq groups, 6 rows) called reps times.
template <bool kWide>
double vnni_micro(const uint8_t* x, const int8_t* panels, int reps) {
  using namespace peft_ext::cpu;
  const int np = kWide ? zmm::kNp : ymm::kNp;
  alignas(64) int32_t out[zmm::kMr * kTileLd] = {};
  const auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < reps; ++r) {
    if constexpr (kWide)
      zmm::micro_tile(x, 4 * kKq, zmm::kMr, panels, 64 * kKq, np, kKq, out);
    else
      ymm::micro_tile(x, 4 * kKq, ymm::kMr, panels, 64 * kKq, np, kKq, out);
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  volatile int32_t sink = out[0];
  (void)sink;
  return static_cast<double>(reps) * kKq * 4 * 16 * np * zmm::kMr / s / 1e9;
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
      "\"exact_over_7bit_median_of_pairs\": %.3f, \"rounds\": %d",
      kMr, static_cast<long long>(kKq), median(exact), median(seven), median(ratio), rounds);
  if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw")) {
    alignas(64) static int8_t panels[4 * 64 * kKq];
    alignas(64) static uint8_t xs[peft_ext::cpu::zmm::kMr * 4 * kKq];
    for (int i = 0; i < 4 * 64 * kKq; ++i) panels[i] = static_cast<int8_t>((i * 37) % 255 - 127);
    for (int i = 0; i < peft_ext::cpu::zmm::kMr * 4 * kKq; ++i) xs[i] = static_cast<uint8_t>(i * 11);
    std::vector<double> peak, peak2, wide, narrow;
    vnni512_peak(1 << 20);  // warm-up
    for (int r = 0; r < rounds; ++r) {
      const int64_t steps = 1 << 22;
      peak.push_back(static_cast<double>(steps) * 24 * 64 / vnni512_peak(steps) / 1e9);
      // Both cores at once (clocks can drop when both run 512-bit code): per thread.
      double sec2[2];
      std::thread other([&] { sec2[1] = vnni512_peak(steps); });
      sec2[0] = vnni512_peak(steps);
      other.join();
      peak2.push_back(static_cast<double>(steps) * 24 * 64 / std::max(sec2[0], sec2[1]) / 1e9);
      wide.push_back(vnni_micro<true>(xs, panels, reps / 4));
      narrow.push_back(vnni_micro<false>(xs, panels, reps));
    }
    std::printf(
        ", \"vnni512_peak_gmacs\": %.2f, \"vnni512_peak_per_thread_of_2_gmacs\": %.2f, "
        "\"vnni512_micro_gmacs\": %.2f, \"vnni256_micro_gmacs\": %.2f",
        median(peak), median(peak2), median(wide), median(narrow));
  }
  std::printf("}\n");
  return 0;
}
