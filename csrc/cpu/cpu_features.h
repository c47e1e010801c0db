// Runtime CPU feature selection. The shipped binary is built for baseline
// x86-64; AVX2/FMA kernels are compiled with per-function target attributes and
// chosen here at run time, so one wheel runs on every x86-64 machine.
#pragma once
#include <string>

namespace peft_ext::cpu {

enum class Isa { Scalar = 0, Avx2 = 1 };

// The best ISA this CPU supports ("avx2" needs avx2, fma and f16c).
Isa detected_isa();
// The ISA kernels use now: detected_isa() unless lowered by set_isa() or by the
// environment variable PEFT_EXT_CPU_ISA=scalar (read once at load time).
Isa active_isa();
// Lower (or restore) the ISA in use; asking for more than the CPU has is an error.
void set_isa(const std::string& name);
const char* isa_name(Isa isa);

}  // namespace peft_ext::cpu
