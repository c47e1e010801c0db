#include "cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#include <c10/util/Exception.h>

namespace peft_ext::cpu {

Isa detected_isa() {
#if defined(__x86_64__) || defined(_M_X64)
  static const Isa isa = (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c"))
                             ? Isa::Avx2
                             : Isa::Scalar;
  return isa;
#else
  return Isa::Scalar;
#endif
}

static Isa initial_isa() {
  const char* env = std::getenv("PEFT_EXT_CPU_ISA");
  if (env != nullptr && std::strcmp(env, "scalar") == 0) return Isa::Scalar;
  return detected_isa();
}

static std::atomic<int>& active() {
  static std::atomic<int> value{static_cast<int>(initial_isa())};
  return value;
}

Isa active_isa() { return static_cast<Isa>(active().load(std::memory_order_relaxed)); }

void set_isa(const std::string& name) {
  Isa wanted;
  if (name == "scalar") {
    wanted = Isa::Scalar;
  } else if (name == "avx2") {
    wanted = Isa::Avx2;
  } else {
    TORCH_CHECK_VALUE(false, "isa must be 'scalar' or 'avx2', got '", name, "'");
  }
  TORCH_CHECK_VALUE(static_cast<int>(wanted) <= static_cast<int>(detected_isa()),
                    "this CPU does not support isa '", name, "'");
  active().store(static_cast<int>(wanted), std::memory_order_relaxed);
}

const char* isa_name(Isa isa) { return isa == Isa::Avx2 ? "avx2" : "scalar"; }

}  // namespace peft_ext::cpu
