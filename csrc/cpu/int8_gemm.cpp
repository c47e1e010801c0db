// CPU int8 linear ops: argument checks, portable kernels, and dispatch to the
// AVX2 kernels (int8_gemm_avx2.cpp) by run-time CPU detection.
#include <algorithm>
#include <cmath>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../int8_checks.h"
#include "../linear_common.h"
#include "cpu_features.h"
#include "int8_kernels.h"

namespace peft_ext::cpu {

void quantize_rows_scalar(const float* x, int64_t ldx, int64_t M, int64_t K, int8_t* q,
                          uint8_t* aq, int64_t ldq, float* scale) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * ldx;
    float absmax = 0.0f;
    for (int64_t k = 0; k < K; ++k) absmax = std::max(absmax, std::fabs(xr[k]));
    const float s = absmax / 127.0f;
    const float inv = absmax > 0.0f ? 1.0f / s : 0.0f;
    scale[m] = s;
    for (int64_t k = 0; k < ldq; ++k) {
      float r = k < K ? std::nearbyint(xr[k] * inv) : 0.0f;
      r = std::min(127.0f, std::max(-127.0f, r));
      q[m * ldq + k] = static_cast<int8_t>(r);
      aq[m * ldq + k] = static_cast<uint8_t>(std::abs(static_cast<int>(r)));
    }
  }
}

void gemm_s8_scalar(const int8_t* q, const uint8_t* /*aq*/, int64_t ldq, const int8_t* w,
                    int64_t M, int64_t K, int64_t n0, int64_t n1, const Epilogue& ep) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = n0; n < n1; ++n) {
      int32_t acc = 0;
      for (int64_t k = 0; k < K; ++k)
        acc += static_cast<int32_t>(q[m * ldq + k]) * static_cast<int32_t>(w[n * K + k]);
      ep.store(m, n, static_cast<float>(acc));
    }
  }
}

void gemm_wo_scalar(const float* x, int64_t ldx, const int8_t* w, int64_t M, int64_t K,
                    int64_t n0, int64_t n1, const Epilogue& ep) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = n0; n < n1; ++n) {
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k) acc += x[m * ldx + k] * static_cast<float>(w[n * K + k]);
      ep.store(m, n, acc);
    }
  }
}

namespace {

constexpr int64_t kPadK = 32;

// x as a contiguous float32 [M, K] matrix (a copy only when needed).
at::Tensor rows_f32(const at::Tensor& x) {
  const int64_t K = x.size(-1);
  return x.reshape({-1, K}).to(at::kFloat).contiguous();
}

// Output columns are split across threads in multiples of `align` so each
// thread streams its own slice of the weight exactly once.
template <typename F>
void parallel_columns(int64_t N, int64_t K, int64_t M, int64_t align, const F& body) {
  const int64_t blocks = (N + align - 1) / align;
  // Below ~64k multiply-adds a thread costs more than it saves.
  const int64_t work_per_block = std::max<int64_t>(1, align * K * M);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / work_per_block);
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    body(b0 * align, std::min(N, b1 * align));
  });
}

struct QuantizedRows {
  at::Tensor q, aq, scale;
  int64_t ldq;
};

QuantizedRows quantize(const at::Tensor& x2d) {
  const int64_t M = x2d.size(0), K = x2d.size(1);
  QuantizedRows r;
  r.ldq = round_up(std::max<int64_t>(K, 1), kPadK);
  r.q = at::empty({M, r.ldq}, x2d.options().dtype(at::kChar));
  r.aq = at::empty({M, r.ldq}, x2d.options().dtype(at::kByte));
  r.scale = at::empty({M}, x2d.options().dtype(at::kFloat));
  const bool avx2 = active_isa() == Isa::Avx2;
  const float* xp = x2d.data_ptr<float>();
  int8_t* qp = r.q.data_ptr<int8_t>();
  uint8_t* ap = r.aq.data_ptr<uint8_t>();
  float* sp = r.scale.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
  at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) {
    auto fn = avx2 ? quantize_rows_avx2 : quantize_rows_scalar;
    fn(xp + m0 * K, K, m1 - m0, K, qp + m0 * r.ldq, ap + m0 * r.ldq, r.ldq, sp + m0);
  });
  return r;
}

// From this many activation rows on, packing weight panels (one extra pass over
// the weight per call) pays for itself; below, the dot-product kernel streams
// the row-major int8 weight directly.
constexpr int64_t kPackedMinM = 8;

std::tuple<at::Tensor, at::Tensor> quantize_per_token_cpu(const at::Tensor& x) {
  check_float_input(x, "x");
  const at::Tensor x2d = rows_f32(x);
  const QuantizedRows r = quantize(x2d);
  return {r.q.narrow(1, 0, x2d.size(1)).contiguous(), r.scale};
}

at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                           const at::Tensor& weight_scale, const c10::optional<at::Tensor>& bias) {
  check_int8_linear_args(x, weight, weight_scale, bias, /*check_k_overflow=*/true);
  const int64_t N = weight.size(0), K = weight.size(1);
  at::Tensor out = at::empty(out_shape(x, N), x.options());
  if (K == 0) {
    fill_empty_k(out, bias);
    return out;
  }
  const at::Tensor x2d = rows_f32(x);
  const int64_t M = x2d.size(0);
  if (M == 0 || N == 0) return out;
  const QuantizedRows r = quantize(x2d);
  const at::Tensor b = bias_f32(bias);
  const Epilogue ep{r.scale.data_ptr<float>(), weight_scale.data_ptr<float>(),
                    b.defined() ? b.data_ptr<float>() : nullptr, out.data_ptr(), N,
                    x.scalar_type()};
  const bool avx2 = active_isa() == Isa::Avx2;
  const int8_t* qp = r.q.data_ptr<int8_t>();
  const uint8_t* ap = r.aq.data_ptr<uint8_t>();
  const int8_t* wp = weight.data_ptr<int8_t>();
  const bool packed = avx2 && M >= kPackedMinM;
  parallel_columns(N, K, M, packed ? 16 : 4, [&](int64_t n0, int64_t n1) {
    auto fn = packed ? gemm_s8_packed_avx2 : avx2 ? gemm_s8_avx2 : gemm_s8_scalar;
    fn(qp, ap, r.ldq, wp, M, K, n0, n1, ep);
  });
  return out;
}

// Above this many rows the weight-only product is compute bound: dequantize a
// tile of weight rows at a time and let the BLAS multiply it, instead of
// converting every int8 weight again for every activation row.
constexpr int64_t kWeightOnlyDirectMaxM = 48;

at::Tensor int8_linear_weight_only_cpu(const at::Tensor& x, const at::Tensor& weight,
                                       const at::Tensor& weight_scale,
                                       const c10::optional<at::Tensor>& bias) {
  check_int8_linear_args(x, weight, weight_scale, bias, /*check_k_overflow=*/false);
  const int64_t N = weight.size(0), K = weight.size(1);
  at::Tensor out = at::empty(out_shape(x, N), x.options());
  if (K == 0) {
    fill_empty_k(out, bias);
    return out;
  }
  const at::Tensor x2d = rows_f32(x);
  const int64_t M = x2d.size(0);
  if (M == 0 || N == 0) return out;
  const at::Tensor b = bias_f32(bias);
  if (M > kWeightOnlyDirectMaxM) {
    // Tiles of about 4 MiB of float weights bound the extra memory; a float32
    // output is written in place, others go through one float32 buffer.
    const int64_t tile = std::max<int64_t>(16, (int64_t{1} << 20) / std::max<int64_t>(K, 1));
    const bool in_place = x.scalar_type() == at::kFloat;
    at::Tensor y = in_place ? out.view({M, N}) : at::empty({M, N}, x2d.options());
    for (int64_t n0 = 0; n0 < N; n0 += tile) {
      const int64_t nt = std::min(tile, N - n0);
      const at::Tensor wt = weight.narrow(0, n0, nt).to(at::kFloat).mul_(
          weight_scale.narrow(0, n0, nt).unsqueeze(1));
      at::Tensor yt = y.narrow(1, n0, nt);
      if (b.defined()) {
        at::addmm_out(yt, b.narrow(0, n0, nt), x2d, wt.t());
      } else {
        at::mm_out(yt, x2d, wt.t());
      }
    }
    if (!in_place) out.view({M, N}).copy_(y);
    return out;
  }
  const Epilogue ep{nullptr, weight_scale.data_ptr<float>(),
                    b.defined() ? b.data_ptr<float>() : nullptr, out.data_ptr(), N,
                    x.scalar_type()};
  const bool avx2 = active_isa() == Isa::Avx2;
  const float* xp = x2d.data_ptr<float>();
  const int8_t* wp = weight.data_ptr<int8_t>();
  parallel_columns(N, K, M, 8, [&](int64_t n0, int64_t n1) {
    auto fn = avx2 ? gemm_wo_avx2 : gemm_wo_scalar;
    fn(xp, K, wp, M, K, n0, n1, ep);
  });
  return out;
}

at::Tensor int8_dequantize_cpu(const at::Tensor& weight, const at::Tensor& weight_scale,
                               at::ScalarType dtype) {
  check_int8_weight(weight, weight_scale);
  TORCH_CHECK_TYPE(at::isFloatingType(dtype), "int8_dequantize: dtype must be floating point, got ",
                   dtype);
  return weight.to(at::kFloat).mul_(weight_scale.unsqueeze(1)).to(dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(peft_ext, CPU, m) {
  m.impl("quantize_per_token", &quantize_per_token_cpu);
  m.impl("int8_linear", &int8_linear_cpu);
  m.impl("int8_linear_weight_only", &int8_linear_weight_only_cpu);
  m.impl("int8_dequantize", &int8_dequantize_cpu);
}

}  // namespace peft_ext::cpu
