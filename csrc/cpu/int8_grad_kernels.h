// CPU kernels of the int8 backward op (int8_grad.cpp): grad_x = grad @ dequant(W)
// computed from the int8 weight itself, so no float copy of W is ever made.
#pragma once

#include <algorithm>
#include <cstdint>

namespace peft_ext::cpu {

// Rows of a [N, K] int8 weight converted to float per block on the BLAS paths
// (weight-only forward, backward): about 4 MiB of floats, at least 16 rows.
inline int64_t float_tile_rows(int64_t K) {
  return std::max<int64_t>(16, (int64_t{1} << 20) / std::max<int64_t>(K, 1));
}

// out[m, k] = sum_n g[m, n] * w[n, k] for all M rows and the columns
// [k0, k1). g [M, N] float32 holds grad * weight_scale (the scale folded into
// the gradient once), w is row-major int8 [N, K], out is float32 [M, K].
// Every output is summed over n in order 0..N-1.
void grad_input_scalar(const float* g, int64_t M, int64_t N, const int8_t* w, int64_t K,
                       int64_t k0, int64_t k1, float* out);
void grad_input_avx2(const float* g, int64_t M, int64_t N, const int8_t* w, int64_t K,
                     int64_t k0, int64_t k1, float* out);

}  // namespace peft_ext::cpu
