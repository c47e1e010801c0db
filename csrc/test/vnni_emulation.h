// Portable stand-ins for the few AVX-512 / AVX-VNNI intrinsics the VNNI micro
// kernels use (csrc/cpu/int8_gemm_vnni256.inc, int8_gemm_avx512_vnni.inc), so
// the C++ test can run those kernels' own code on a CPU without VNNI. They live
// in peft_ext::cpu::emulated; the test includes the kernel bodies inside that
// namespace, so unqualified lookup there finds these before any <immintrin.h>
// declaration.
//
// Written from the instruction definitions (Intel SDM, VPDPBUSD): each int32
// lane adds the four products of its unsigned bytes of `a` with the signed
// bytes of `b`, wrapping (the non-saturating form). The aligned loads check
// their alignment, as the real ones fault without it.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace peft_ext::cpu::emulated {

// The kernel bodies spell the register types with their reserved names; in
// this test those names denote the structs below (as emulation layers do).
struct EmuVec256 {
  int32_t d[8];
};
struct EmuVec512 {
  int32_t d[16];
};
using __m256i = EmuVec256;  // NOLINT(bugprone-reserved-identifier)
using __m512i = EmuVec512;  // NOLINT(bugprone-reserved-identifier)

template <typename V>
inline V emu_load(const void* p, size_t align) {
  if (align != 0 && reinterpret_cast<uintptr_t>(p) % align != 0) {
    std::fprintf(stderr, "emulated aligned load of %zu bytes at a misaligned address %p\n",
                 sizeof(V), p);
    std::abort();
  }
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V>
inline V emu_set1(int32_t x) {
  V v;
  for (int32_t& d : v.d) d = x;
  return v;
}

template <typename V>
inline V emu_dpbusd(V src, V a, V b) {
  V r;
  constexpr int lanes = sizeof(V) / 4;
  for (int i = 0; i < lanes; ++i) {
    uint8_t ua[4];
    int8_t sb[4];
    std::memcpy(ua, &a.d[i], 4);
    std::memcpy(sb, &b.d[i], 4);
    uint32_t acc = static_cast<uint32_t>(src.d[i]);
    for (int j = 0; j < 4; ++j)
      acc += static_cast<uint32_t>(static_cast<int32_t>(ua[j]) * static_cast<int32_t>(sb[j]));
    r.d[i] = static_cast<int32_t>(acc);
  }
  return r;
}

inline __m256i _mm256_loadu_si256(const __m256i* p) { return emu_load<__m256i>(p, 0); }
inline __m256i _mm256_load_si256(const __m256i* p) { return emu_load<__m256i>(p, 32); }
inline void _mm256_storeu_si256(__m256i* p, __m256i v) { std::memcpy(p, &v, sizeof(v)); }
inline __m256i _mm256_set1_epi32(int32_t x) { return emu_set1<__m256i>(x); }
inline __m256i _mm256_dpbusd_epi32(__m256i s, __m256i a, __m256i b) { return emu_dpbusd(s, a, b); }
inline __m256i _mm256_dpbusd_avx_epi32(__m256i s, __m256i a, __m256i b) {
  return emu_dpbusd(s, a, b);
}

inline __m512i _mm512_loadu_si512(const void* p) { return emu_load<__m512i>(p, 0); }
inline __m512i _mm512_load_si512(const void* p) { return emu_load<__m512i>(p, 64); }
inline void _mm512_storeu_si512(void* p, __m512i v) { std::memcpy(p, &v, sizeof(v)); }
inline __m512i _mm512_set1_epi32(int32_t x) { return emu_set1<__m512i>(x); }
inline __m512i _mm512_dpbusd_epi32(__m512i s, __m512i a, __m512i b) { return emu_dpbusd(s, a, b); }

}  // namespace peft_ext::cpu::emulated
