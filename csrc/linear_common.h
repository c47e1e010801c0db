// Host-side helpers shared by the CPU and CUDA linear ops (int8 and sparse).
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include <ATen/ATen.h>

namespace peft_ext {

inline int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

// x[..., K] -> the output shape x[..., N].
inline std::vector<int64_t> out_shape(const at::Tensor& x, int64_t N) {
  auto shape = x.sizes().vec();
  shape.back() = N;
  return shape;
}

// The bias as contiguous float32 (undefined when there is none): the kernels'
// epilogues add it in fp32 whatever the layer's dtype.
inline at::Tensor bias_f32(const std::optional<at::Tensor>& bias) {
  if (!bias.has_value()) return at::Tensor();
  return bias->to(at::kFloat).contiguous();
}

// K == 0: every dot product is empty, y = bias (or 0).
inline void fill_empty_k(at::Tensor& out, const std::optional<at::Tensor>& bias) {
  if (bias.has_value()) {
    out.copy_(bias->expand_as(out));
  } else {
    out.zero_();
  }
}

}  // namespace peft_ext
