// Host-side helpers shared by the CPU and CUDA linear ops (int8 and sparse):
// argument checks every linear op makes, shapes, the bias, the K == 0 case and
// the parallel grain. TORCH_CHECK_TYPE / TORCH_CHECK_VALUE surface in Python as
// TypeError / ValueError naming the argument.
#pragma once

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include <ATen/ATen.h>

namespace peft_ext {

inline int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

// Activations: float32, bfloat16 or float16, at least 1-D.
inline void check_float_input(const at::Tensor& x, const char* name) {
  const auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, name,
                   " must be float32, bfloat16 or float16, got ", t);
  TORCH_CHECK_VALUE(x.dim() >= 1, name, " must have at least one dimension");
}

// Every tensor argument of an op on x's device. A meta-device x with CPU
// weights reaches the Meta (fake) kernel, not these checks: see
// peft_ext/ops for the fakes' own device check.
inline void check_same_device(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " is on ", t.device(), " but x is on ",
                    x.device());
}

// bias: floating point [N] on x's device, or none.
inline void check_bias(const std::optional<at::Tensor>& bias, const at::Tensor& x, int64_t N) {
  if (!bias.has_value()) return;
  const at::Tensor& b = *bias;
  TORCH_CHECK_TYPE(at::isFloatingType(b.scalar_type()), "bias must be floating point, got ",
                   b.scalar_type());
  TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == N, "bias must have shape [", N, "], got ",
                    b.sizes());
  check_same_device(b, x, "bias");
}

// Product of x's leading dimensions: the M of x[..., K] seen as [M, K], also
// when K == 0 (where reshape({-1, 0}) cannot infer M).
inline int64_t leading_rows(const at::Tensor& x) {
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) m *= x.size(d);
  return m;
}

// x[..., K] -> the output shape x[..., N].
inline std::vector<int64_t> out_shape(const at::Tensor& x, int64_t N) {
  auto shape = x.sizes().vec();
  shape.back() = N;
  return shape;
}

// x[..., K] as a contiguous float32 [M, K] matrix (a copy only when needed).
// K must be > 0 (callers handle K == 0 first: fill_empty_k).
inline at::Tensor rows_f32(const at::Tensor& x) {
  return x.reshape({-1, x.size(-1)}).to(at::kFloat).contiguous();
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

// Below about this many multiply-adds a thread costs more than it saves.
constexpr int64_t kMinWorkPerThread = int64_t{1} << 16;

// at::parallel_for grain (in units) when each unit costs `work` multiply-adds.
inline int64_t grain_size(int64_t work) {
  return std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(1, work));
}

}  // namespace peft_ext
