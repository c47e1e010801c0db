// The attribute every VNNI micro kernel body (int8_gemm_*.inc) carries.
//
// GCC: no inlining, cloning or constant propagation into the micro kernel.
// Seen with GCC 12: a caller that passes a constant kq gets a clone that
// keeps the accumulators on the stack again (half the rate), pragmas or not.
#pragma once

#if defined(__clang__)
#define PEFT_MICRO_NOIPA noinline
#else
#define PEFT_MICRO_NOIPA noipa
#endif
