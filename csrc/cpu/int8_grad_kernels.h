// CPU kernels of the int8 backward op (int8_grad.cpp): grad_x = grad @ dequant(W)
// computed from the int8 weight itself, so no float copy of W is ever made.
#pragma once

#include <cstdint>

namespace peft_ext::cpu {

// out[m, k] = sum_n g[m, n] * w[n, k] for all M rows and the columns
// [k0, k1). g [M, N] float32 holds grad * weight_scale (the scale folded into
// the gradient once), w is row-major int8 [N, K], out is float32 [M, K].
// Every output is summed over n in order 0..N-1.
void grad_input_scalar(const float* g, int64_t M, int64_t N, const int8_t* w, int64_t K,
                       int64_t k0, int64_t k1, float* out);
void grad_input_avx2(const float* g, int64_t M, int64_t N, const int8_t* w, int64_t K,
                     int64_t k0, int64_t k1, float* out);

}  // namespace peft_ext::cpu
