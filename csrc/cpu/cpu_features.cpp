#include "cpu_features.h"

#include <atomic>
#include <cstdint>
#include <cstdlib>

#if defined(__x86_64__)
#include <cpuid.h>
#endif

#include <c10/util/Exception.h>

namespace peft_ext::cpu {

namespace {

struct Features {
  bool avx2 = false;        // avx2 tier: avx2, fma, f16c and OS ymm state
  bool avx_vnni = false;    // VEX vpdpbusd (needs the avx2 tier)
  bool avx512_vnni = false; // avx512f/bw/vl/vnni and OS zmm state (needs the avx2 tier)
};

#if defined(__x86_64__)
// XCR0: which register state the OS saves on context switches. cpuid alone
// says what the silicon has; using ymm/zmm without OS support faults.
uint64_t xcr0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}
#endif

Features probe() {
  Features f;
#if defined(__x86_64__)
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27), avx = c & (1u << 28), fma = c & (1u << 12),
             f16c = c & (1u << 29);
  if (!osxsave || !avx) return f;
  const uint64_t xcr = xcr0();
  const bool os_ymm = (xcr & 0x6) == 0x6;            // xmm + ymm
  const bool os_zmm = os_ymm && (xcr & 0xE0) == 0xE0;  // opmask, zmm0-15 high, zmm16-31
  unsigned max_leaf = __get_cpuid_max(0, nullptr);
  if (max_leaf < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  const unsigned leaf7_max_sub = a;
  const bool avx2 = b & (1u << 5), avx512f = b & (1u << 16), avx512bw = b & (1u << 30),
             avx512vl = b & (1u << 31), avx512vnni = c & (1u << 11);
  bool avxvnni = false;
  if (leaf7_max_sub >= 1) {
    __cpuid_count(7, 1, a, b, c, d);
    avxvnni = a & (1u << 4);
  }
  f.avx2 = os_ymm && avx2 && fma && f16c;
  f.avx_vnni = f.avx2 && avxvnni;
  f.avx512_vnni = f.avx2 && os_zmm && avx512f && avx512bw && avx512vl && avx512vnni;
#endif
  return f;
}

const Features& features() {
  static const Features f = probe();
  return f;
}

bool supported(Isa isa) {
  const Features& f = features();
  switch (isa) {
    case Isa::Scalar: return true;
    case Isa::Avx2: return f.avx2;
    case Isa::AvxVnni: return f.avx_vnni || f.avx512_vnni;
    case Isa::Avx512Vnni: return f.avx512_vnni;
  }
  return false;
}

constexpr const char* kNames = "'scalar', 'avx2', 'avx_vnni' or 'avx512_vnni'";

Isa parse(const std::string& name, const char* what) {
  Isa wanted;
  if (name == "scalar") {
    wanted = Isa::Scalar;
  } else if (name == "avx2") {
    wanted = Isa::Avx2;
  } else if (name == "avx_vnni") {
    wanted = Isa::AvxVnni;
  } else if (name == "avx512_vnni") {
    wanted = Isa::Avx512Vnni;
  } else {
    TORCH_CHECK_VALUE(false, what, " must be ", kNames, ", got '", name, "'");
  }
  TORCH_CHECK_VALUE(supported(wanted), what, "='", name, "': this CPU does not support it (best: '",
                    isa_name(detected_isa()), "')");
  return wanted;
}

Isa initial_isa() {
  const char* env = std::getenv("PEFT_EXT_CPU_ISA");
  if (env == nullptr || *env == '\0') return detected_isa();
  return parse(env, "PEFT_EXT_CPU_ISA");
}

std::atomic<int>& active() {
  // A bad PEFT_EXT_CPU_ISA throws here, on every use, so no kernel runs on a
  // tier other than the one asked for.
  static std::atomic<int> value{static_cast<int>(initial_isa())};
  return value;
}

}  // namespace

Isa detected_isa() {
  for (Isa isa : {Isa::Avx512Vnni, Isa::AvxVnni, Isa::Avx2})
    if (supported(isa)) return isa;
  return Isa::Scalar;
}

bool has_avx_vnni_vex() { return features().avx_vnni; }

Isa active_isa() { return static_cast<Isa>(active().load(std::memory_order_relaxed)); }

void set_isa(const std::string& name) {
  const Isa wanted = parse(name, "isa");
  active().store(static_cast<int>(wanted), std::memory_order_relaxed);
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx2: return "avx2";
    case Isa::AvxVnni: return "avx_vnni";
    case Isa::Avx512Vnni: return "avx512_vnni";
    default: return "scalar";
  }
}

}  // namespace peft_ext::cpu
