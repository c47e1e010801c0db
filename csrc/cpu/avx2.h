// The one definition of the AVX2 tier's target list, shared by every AVX2
// kernel file: functions carry this attribute instead of the file being built
// with -mavx2, so the library still loads on any x86-64 CPU. cpu_features
// enables the avx2 tier only where the CPU has all of these (and the OS saves
// ymm state), so one list here keeps compile targets and run-time checks equal.
#pragma once

#include <immintrin.h>

#define PEFT_AVX2_TARGETS "avx2,fma,f16c"
#define PEFT_AVX2 __attribute__((target(PEFT_AVX2_TARGETS)))
// For lambdas inside PEFT_AVX2 functions (they do not inherit the target).
#define PEFT_AVX2_LAMBDA __attribute__((target(PEFT_AVX2_TARGETS), always_inline))

namespace peft_ext::cpu {

PEFT_AVX2 inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

PEFT_AVX2 inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

}  // namespace peft_ext::cpu
