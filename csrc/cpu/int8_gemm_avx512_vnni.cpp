// The avx512_vnni tier: 512-bit vpdpbusd, one zmm per panel-line (16 columns x
// 4 k). Only the inner loop (int8_gemm_avx512_vnni.inc) is specific to this
// tier; packing, column sums, the +128 shift, tails and the epilogue are the
// shared code of int8_gemm.cpp and int8_gemm_avx2.cpp.
#include <cstring>

#include "avx2.h"
#include "int8_kernels.h"

namespace peft_ext::cpu {

namespace {

#define PEFT_AVX512_TARGET PEFT_AVX2_TARGETS ",avx512f,avx512bw,avx512vl,avx512vnni"
#define PEFT_AVX512_NS zmm
#include "int8_gemm_avx512_vnni.inc"
#undef PEFT_AVX512_TARGET
#undef PEFT_AVX512_NS

}  // namespace

PackedKernel packed_kernel_avx512_vnni() {
  return {zmm::micro_tile, store_row16_avx2, zmm::kMr, zmm::kNp, true};
}

}  // namespace peft_ext::cpu
