// The avx_vnni tier: 256-bit vpdpbusd on panels of 16 columns. Built twice
// from one body (int8_gemm_vnni256.inc) with per-function target attributes:
// the VEX form for AVX-VNNI CPUs (Alder Lake and later clients, Zen 5), the
// EVEX form for AVX-512 VNNI + VL CPUs (Ice Lake and later servers, Zen 4);
// cpu_features says which one this CPU has.
#include <cstring>

#include "avx2.h"
#include "cpu_features.h"
#include "int8_kernels.h"

namespace peft_ext::cpu {

namespace {

#define PEFT_VNNI256_TARGET PEFT_AVX2_TARGETS ",avxvnni"
#define PEFT_DPBUSD _mm256_dpbusd_avx_epi32
#define PEFT_VNNI256_NS vex
#define PEFT_VNNI256_NP 1
#include "int8_gemm_vnni256.inc"
#undef PEFT_VNNI256_TARGET
#undef PEFT_DPBUSD
#undef PEFT_VNNI256_NS
#undef PEFT_VNNI256_NP

#define PEFT_VNNI256_TARGET PEFT_AVX2_TARGETS ",avx512f,avx512bw,avx512vl,avx512vnni"
#define PEFT_DPBUSD _mm256_dpbusd_epi32
#define PEFT_VNNI256_NS evex
#define PEFT_VNNI256_NP 2
#include "int8_gemm_vnni256.inc"
#undef PEFT_VNNI256_TARGET
#undef PEFT_DPBUSD
#undef PEFT_VNNI256_NS
#undef PEFT_VNNI256_NP

}  // namespace

PackedKernel packed_kernel_avx_vnni() {
  // The AVX2 epilogue: every CPU of this tier has the avx2 tier too.
  // The tile of the form this CPU runs (VEX: one panel, EVEX: two).
  if (has_avx_vnni_vex()) return {vex::micro_tile, store_row16_avx2, vex::kMr, vex::kNp, true};
  return {evex::micro_tile, store_row16_avx2, evex::kMr, evex::kNp, true};
}

}  // namespace peft_ext::cpu
