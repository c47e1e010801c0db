// Run-time CPU feature selection. The shipped binary is built for baseline
// x86-64; the faster kernels are compiled with per-function target attributes
// and chosen here at run time, so one wheel runs on every x86-64 machine.
#pragma once
#include <string>

namespace peft_ext::cpu {

// Tiers in increasing order; a CPU that supports a tier supports every lower one.
//   avx2        avx2 + fma + f16c, ymm state saved by the OS (the AVX2 list of avx2.h)
//   avx_vnni    avx2 tier + 256-bit vpdpbusd: AVX-VNNI (VEX), or AVX-512 VNNI + VL
//               (EVEX, which also needs the OS to save zmm/opmask state)
//   avx512_vnni avx2 tier + avx512f/bw/vl/vnni, zmm/opmask state saved by the OS
enum class Isa { Scalar = 0, Avx2 = 1, AvxVnni = 2, Avx512Vnni = 3 };

// The best tier this CPU (and OS) supports, from cpuid and xgetbv.
Isa detected_isa();
// The tier kernels use now: detected_isa(), or PEFT_EXT_CPU_ISA=<tier> (read
// once, on first use; a name that is unknown or beyond the CPU raises), or set_isa().
Isa active_isa();
// Choose the tier in use; an unknown name or a tier the CPU lacks is an error.
void set_isa(const std::string& name);
const char* isa_name(Isa isa);
// True for every tier whose kernels may use the AVX2 list (avx2 and above).
inline bool uses_avx2(Isa isa) { return static_cast<int>(isa) >= static_cast<int>(Isa::Avx2); }
// For the avx_vnni tier: true when the CPU has AVX-VNNI (VEX encoding), false
// when the tier runs on the EVEX (AVX-512 VL) form instead.
bool has_avx_vnni_vex();

}  // namespace peft_ext::cpu
