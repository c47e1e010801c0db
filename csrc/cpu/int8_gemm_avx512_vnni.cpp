// The avx512_vnni tier: 512-bit vpdpbusd, one zmm per panel-line (16 columns x
// 4 k). Only the inner loop is specific to this tier; packing, column sums,
// the +128 shift, tails and the epilogue are the shared code of int8_gemm.cpp
// and int8_gemm_avx2.cpp.
#include <cstring>

#include "avx2.h"
#include "int8_kernels.h"

#define PEFT_AVX512_VNNI __attribute__((target(PEFT_AVX2_TARGETS ",avx512f,avx512bw,avx512vl,avx512vnni")))

namespace peft_ext::cpu {

namespace {

// MR rows of u8 activations x NP panels: MR * NP zmm accumulators (up to 24
// of the 32), NP panel registers, one broadcast. Wrapping int32 sums.
template <int MR, int NP>
PEFT_AVX512_VNNI void micro(const uint8_t* x, int64_t ldx, const int8_t* panel, int64_t ps,
                            int64_t kq, int32_t* out) {
  __m512i acc[MR][NP];
  for (int i = 0; i < MR; ++i)
    for (int p = 0; p < NP; ++p) acc[i][p] = _mm512_loadu_si512(out + i * kTileLd + 16 * p);
  for (int64_t t = 0; t < kq; ++t) {
    __m512i b[NP];
    for (int p = 0; p < NP; ++p) b[p] = _mm512_load_si512(panel + p * ps + 64 * t);
    for (int i = 0; i < MR; ++i) {
      int32_t x4;
      std::memcpy(&x4, x + i * ldx + 4 * t, 4);
      const __m512i xb = _mm512_set1_epi32(x4);
      for (int p = 0; p < NP; ++p) acc[i][p] = _mm512_dpbusd_epi32(acc[i][p], xb, b[p]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int p = 0; p < NP; ++p) _mm512_storeu_si512(out + i * kTileLd + 16 * p, acc[i][p]);
}

template <int NP>
void micro_np(const uint8_t* x, int64_t ldx, int mr, const int8_t* panel, int64_t ps, int64_t kq,
              int32_t* out) {
  switch (mr) {
    case 6: micro<6, NP>(x, ldx, panel, ps, kq, out); break;
    case 5: micro<5, NP>(x, ldx, panel, ps, kq, out); break;
    case 4: micro<4, NP>(x, ldx, panel, ps, kq, out); break;
    case 3: micro<3, NP>(x, ldx, panel, ps, kq, out); break;
    case 2: micro<2, NP>(x, ldx, panel, ps, kq, out); break;
    default: micro<1, NP>(x, ldx, panel, ps, kq, out); break;
  }
}

void micro_tile(const uint8_t* x, int64_t ldx, int mr, const int8_t* panel, int64_t ps, int np,
                int64_t kq, int32_t* out) {
  switch (np) {
    case 4: micro_np<4>(x, ldx, mr, panel, ps, kq, out); break;
    case 3: micro_np<3>(x, ldx, mr, panel, ps, kq, out); break;
    case 2: micro_np<2>(x, ldx, mr, panel, ps, kq, out); break;
    default: micro_np<1>(x, ldx, mr, panel, ps, kq, out); break;
  }
}

}  // namespace

PackedKernel packed_kernel_avx512_vnni() { return {micro_tile, store_row16_avx2, 6, 4, true}; }

}  // namespace peft_ext::cpu
