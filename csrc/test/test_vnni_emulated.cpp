// The VNNI tiers' micro kernels on any x86-64 CPU: their own source
// (int8_gemm_vnni256.inc, int8_gemm_avx512_vnni.inc) compiled over the
// portable intrinsics of vnni_emulation.h, checked
//  1. against the micro kernel contract (int8_kernels.h: MicroFn) for every
//     row count, panel count and k length class, and
//  2. end to end through the shared packed driver (gemm_panels) with the
//     tier's register tile, odd shapes, -128 weights and K blocks, against
//     the exact integer product, bit for bit.
// On a CPU with the tier, the pytest suite runs the real instructions too;
// this test is what covers the kernels' indexing where the CPU lacks them.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/int8_kernels.h"
#include "vnni_emulation.h"

namespace peft_ext::cpu::emulated {

// The 256-bit body twice, with the VEX tile (one panel) and the EVEX tile (two).
#define PEFT_VNNI256_TARGET "sse2"
#define PEFT_DPBUSD _mm256_dpbusd_avx_epi32
#define PEFT_VNNI256_NS ymm_vex
#define PEFT_VNNI256_NP 1
#include "cpu/int8_gemm_vnni256.inc"
#undef PEFT_VNNI256_NS
#undef PEFT_VNNI256_NP
#define PEFT_VNNI256_NS ymm_evex
#define PEFT_VNNI256_NP 2
#include "cpu/int8_gemm_vnni256.inc"
#undef PEFT_VNNI256_TARGET
#undef PEFT_DPBUSD
#undef PEFT_VNNI256_NS
#undef PEFT_VNNI256_NP

#define PEFT_AVX512_TARGET "sse2"
#define PEFT_AVX512_NS zmm
#include "cpu/int8_gemm_avx512_vnni.inc"
#undef PEFT_AVX512_TARGET
#undef PEFT_AVX512_NS

}  // namespace peft_ext::cpu::emulated

namespace {

using namespace peft_ext::cpu;

struct Tier {
  const char* name;
  MicroFn micro;
  int mr_max, np_max;
};

// Each tier's own descriptor (packed_kernel_*(), which runs no VNNI code)
// gives the tile the shared driver asks of the kernel; the emulated build of
// the kernel body must serve exactly that tile.
// body_mr / body_np: the tile the kernel body serves. The avx_vnni tier has
// two bodies (VEX, EVEX); its descriptor gives the tile of the one this CPU
// would run (`selected`), and the other body is checked with its own tile.
bool vex_selected() { return has_avx_vnni_vex(); }
bool evex_selected() { return !has_avx_vnni_vex(); }
bool always() { return true; }
struct TierSpec {
  const char* name;
  MicroFn emulated_micro;
  int body_mr, body_np;
  PackedKernel (*real)();
  bool (*selected)();
};
const TierSpec kTiers[] = {
    {"avx_vnni VEX tile (emulated)", emulated::ymm_vex::micro_tile, emulated::ymm_vex::kMr,
     emulated::ymm_vex::kNp, packed_kernel_avx_vnni, vex_selected},
    {"avx_vnni EVEX tile (emulated)", emulated::ymm_evex::micro_tile, emulated::ymm_evex::kMr,
     emulated::ymm_evex::kNp, packed_kernel_avx_vnni, evex_selected},
    {"avx512_vnni (emulated)", emulated::zmm::micro_tile, emulated::zmm::kMr, emulated::zmm::kNp,
     packed_kernel_avx512_vnni, always},
};

std::mt19937 rng(1234);

int8_t random_s8() { return static_cast<int8_t>(static_cast<int>(rng() % 256) - 128); }

// 64-byte aligned storage, as the packed weight is.
struct Aligned {
  std::vector<int8_t> raw;
  int8_t* p;
  explicit Aligned(size_t n) : raw(n + 64) {
    p = raw.data() + (64 - reinterpret_cast<uintptr_t>(raw.data()) % 64) % 64;
  }
};

int failures = 0;

void expect(bool ok, const char* tier, const char* what, int64_t a, int64_t b, int64_t c) {
  if (!ok) {
    ++failures;
    if (failures <= 20) std::printf("FAIL %s: %s (%lld, %lld, %lld)\n", tier, what,
                                    static_cast<long long>(a), static_cast<long long>(b),
                                    static_cast<long long>(c));
  }
}

// 1. out[i * kTileLd + 16 p + j] += sum_{t, b} x[i * ldx + 4 t + b] *
//    panel[p * ps + 64 t + 4 j + b], wrapping, for every mr <= mr_max and
//    np <= np_max; entries outside the tile stay as they were.
void check_micro(const Tier& tier) {
  for (int64_t kq : {1, 2, 5, 64, 65}) {
    const int64_t ldx = 4 * kq + 12, ps = 64 * (kq + 3);
    for (int mr = 1; mr <= tier.mr_max; ++mr) {
      for (int np = 1; np <= tier.np_max; ++np) {
        std::vector<uint8_t> x(static_cast<size_t>(ldx * mr));
        for (auto& v : x) v = static_cast<uint8_t>(rng());
        Aligned panel(static_cast<size_t>(ps * np));
        for (int64_t i = 0; i < ps * np; ++i) panel.p[i] = random_s8();
        if (kq == 65) {  // the extremes: u8 255 times s8 -128 everywhere in row 0 / panel 0
          for (int64_t k = 0; k < 4 * kq; ++k) x[k] = 255;
          for (int64_t i = 0; i < 64 * kq; ++i) panel.p[i] = -128;
        }
        std::vector<int32_t> out(8 * kTileLd), want(8 * kTileLd);
        for (size_t i = 0; i < out.size(); ++i) out[i] = want[i] = static_cast<int32_t>(rng());
        // Two lanes start at the ends of int32, so one of them wraps whichever
        // way the sum goes (in the extreme case every sum is negative).
        out[0] = want[0] = INT32_MAX - 5;
        out[1] = want[1] = INT32_MIN + 5;
        for (int i = 0; i < mr; ++i)
          for (int p = 0; p < np; ++p)
            for (int j = 0; j < kPanelCols; ++j) {
              uint32_t acc = static_cast<uint32_t>(want[i * kTileLd + 16 * p + j]);
              for (int64_t t = 0; t < kq; ++t)
                for (int b = 0; b < 4; ++b)
                  acc += static_cast<uint32_t>(
                      static_cast<int32_t>(x[i * ldx + 4 * t + b]) *
                      static_cast<int32_t>(panel.p[p * ps + 64 * t + 4 * j + b]));
              want[i * kTileLd + 16 * p + j] = static_cast<int32_t>(acc);
            }
        tier.micro(x.data(), ldx, mr, panel.p, ps, np, kq, out.data());
        bool same = out == want;
        expect(same, tier.name, "micro kernel (kq, mr, np)", kq, mr, np);
      }
    }
  }
}

void store_row_plain(const Epilogue& ep, int64_t m, int64_t n, int64_t nr, const int32_t* acc) {
  for (int64_t j = 0; j < nr; ++j) ep.store(m, n + j, static_cast<float>(acc[j]));
}

// 2. The shared driver with this tier's tile: q [M, K] in [-127, 127] times
//    w [N, K] (with -128s), split into column slices of np_max panels as the
//    threads split it, against the exact int32 sums through the same epilogue
//    arithmetic (so the floats must match bit for bit).
void check_driver(const Tier& tier, int64_t M, int64_t K, int64_t N) {
  const PackedKernel g{tier.micro, store_row_plain, tier.mr_max, tier.np_max, true};
  const int64_t ldq = (K + 31) / 32 * 32, P = panel_count(N);
  std::vector<int8_t> q(static_cast<size_t>(M * ldq), 0), w(static_cast<size_t>(N * K));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) q[m * ldq + k] = static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
  for (auto& v : w) v = random_s8();
  if (N > 0 && K > 0) w[0] = -128;
  std::vector<float> rs(static_cast<size_t>(M)), cs(static_cast<size_t>(N)), bias(static_cast<size_t>(N));
  std::uniform_real_distribution<float> u(0.001f, 0.02f);
  for (auto& v : rs) v = u(rng);
  for (auto& v : cs) v = u(rng);
  for (auto& v : bias) v = u(rng) - 0.01f;

  Aligned panels(static_cast<size_t>(P * panel_bytes(K)));
  pack_panels_scalar(w.data(), N, K, 0, P, panels.p);
  std::vector<int32_t> sums(static_cast<size_t>(P * kPanelCols));
  column_sums(w.data(), N, K, 0, P * kPanelCols, sums.data());
  std::vector<uint8_t> xs(q.size());
  for (size_t i = 0; i < q.size(); ++i) xs[i] = static_cast<uint8_t>(q[i]) ^ 0x80;

  std::vector<float> out(static_cast<size_t>(M * N), -1.0f), want(out.size());
  const Epilogue ep{rs.data(), cs.data(), bias.data(), out.data(), N, c10::ScalarType::Float};
  const Epilogue ref{rs.data(), cs.data(), bias.data(), want.data(), N, c10::ScalarType::Float};
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      int32_t s = 0;
      for (int64_t k = 0; k < K; ++k) s += static_cast<int32_t>(q[m * ldq + k]) * w[n * K + k];
      ref.store(m, n, static_cast<float>(s));
    }
  // Two column slices, the first of np_max panels, as parallel_columns may split them.
  const int64_t split = std::min<int64_t>(P, tier.np_max);
  const int64_t slices[2][2] = {{0, split}, {split, P}};
  for (const auto& sl : slices)
    if (sl[0] < sl[1])
      gemm_panels(g, xs.data(), ldq, M, K, N, panels.p + sl[0] * panel_bytes(K),
                  sums.data() + sl[0] * kPanelCols, sl[0], sl[1], ep);
  expect(std::memcmp(out.data(), want.data(), sizeof(float) * out.size()) == 0, tier.name,
         "driver (M, K, N)", M, K, N);
}

}  // namespace

int main() {
  for (const TierSpec& spec : kTiers) {
    const PackedKernel real = spec.real();
    const bool selected = spec.selected();
    const Tier tier{spec.name, spec.emulated_micro, selected ? real.mr_max : spec.body_mr,
                    selected ? real.np_max : spec.body_np};
    const int before = failures;
    // The emulated body's own tile constants must be the descriptor's, and the
    // tier must take the shifted (u8 x s8) path the kernels assume.
    if (selected)
      expect(real.shifted && real.mr_max == spec.body_mr && real.np_max == spec.body_np, tier.name,
             "descriptor (mr_max, np_max, shifted) matches the kernel body", real.mr_max,
             real.np_max, real.shifted);
    check_micro(tier);
    for (int64_t M : {1, 5, 6, 7, 13, 49, 50})
      for (int64_t K : {1, 3, 4, 31, 257, 300})
        for (int64_t N : {1, 15, 16, 17, 65, 100}) check_driver(tier, M, K, N);
    std::printf("%s: %s\n", failures == before ? "ok  " : "FAIL", tier.name);
  }
  return failures == 0 ? 0 : 1;
}
