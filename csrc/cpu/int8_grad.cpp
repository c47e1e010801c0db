// CPU int8 backward op: grad_x[M, K] = sum_n grad[M, n] * w[n, K] * scale[n].
// Up to kGradDirectMaxM rows it reads straight from the int8 weight (the
// forward's weight with the transposed access); above, blocks of weight rows
// (at most 4 MiB and half the weight each) go through the BLAS. The float copy
// of W that grad @ int8_dequantize(W) would allocate never exists.
#include <algorithm>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../int8_checks.h"
#include "cpu_features.h"
#include "int8_grad_kernels.h"

namespace peft_ext::cpu {

void grad_input_scalar(const float* g, int64_t M, int64_t N, const int8_t* w, int64_t K,
                       int64_t k0, int64_t k1, float* out) {
  for (int64_t m = 0; m < M; ++m) {
    float* o = out + m * K;
    for (int64_t k = k0; k < k1; ++k) o[k] = 0.0f;
    for (int64_t n = 0; n < N; ++n) {
      const float gv = g[m * N + n];
      const int8_t* wr = w + n * K;
      for (int64_t k = k0; k < k1; ++k) o[k] += gv * static_cast<float>(wr[k]);
    }
  }
}

namespace {

// Columns per parallel task: a multiple of the AVX2 tile width (16), wide
// enough that a task's slice of every weight row is a whole cache line.
constexpr int64_t kColumnBlock = 64;

// Above this many gradient rows the product is compute bound, and the BLAS on
// a float tile beats converting every int8 weight again for each 6 rows.
// Measured here (AVX2, 2 threads; direct against tiled, ms): [N, K] = 384 x 384
// at M = 64: 0.55 / 0.37, M = 1024: 7.2 / 5.5; 1536 x 384: 1.9 / 1.3 and 23.5 /
// 12.1; 384 x 1536: 1.5 / 2.1 and 25.2 / 12.8; 4096 x 4096 at M = 128: 257 / 78.
// At M = 16 the direct kernel wins on the small layers (0.14 / 0.20 ms).
constexpr int64_t kGradDirectMaxM = 64;

// out = g @ w with w converted to float one block of rows at a time (the scale
// is already in g). A block holds at most 4 MiB and at most half the weight,
// so the weight as a whole is never copied to float.
void grad_input_tiled(const at::Tensor& g, const at::Tensor& weight, at::Tensor& out) {
  const int64_t N = weight.size(0), K = weight.size(1);
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>((N + 1) / 2, float_tile_rows(K)));
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t nt = std::min(rows, N - n0);
    const at::Tensor wt = weight.narrow(0, n0, nt).to(at::kFloat);
    const at::Tensor gt = g.narrow(1, n0, nt);
    if (n0 == 0) {
      at::mm_out(out, gt, wt);
    } else {
      out.addmm_(gt, wt);
    }
  }
}

// out = g @ w straight from the int8 weight, threads over column blocks.
void grad_input_direct(const at::Tensor& g, const at::Tensor& weight, at::Tensor& out) {
  const int64_t M = g.size(0), N = weight.size(0), K = weight.size(1);
  // Every tier from AVX2 up (the VNNI tiers have AVX2 too) runs the AVX2 kernel.
  const bool avx2 = uses_avx2(active_isa());
  const float* gp = g.data_ptr<float>();
  const int8_t* wp = weight.data_ptr<int8_t>();
  float* op = out.data_ptr<float>();
  const int64_t blocks = (K + kColumnBlock - 1) / kColumnBlock;
  // Below ~64k multiply-adds a thread costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (kColumnBlock * M * N));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    auto fn = avx2 ? grad_input_avx2 : grad_input_scalar;
    fn(gp, M, N, wp, K, b0 * kColumnBlock, std::min(K, b1 * kColumnBlock), op);
  });
}

at::Tensor int8_grad_input_cpu(const at::Tensor& grad, const at::Tensor& weight,
                               const at::Tensor& weight_scale) {
  check_int8_grad_args(grad, weight, weight_scale);
  const int64_t N = weight.size(0), K = weight.size(1);
  auto shape = grad.sizes().vec();
  shape.back() = K;
  const int64_t M = grad.numel() / std::max<int64_t>(N, 1);
  if (N == 0 || M == 0 || K == 0) return at::zeros(shape, grad.options());
  // Folding the per-channel scale into the gradient costs M * N multiplies
  // once instead of one per weight element and output row.
  const at::Tensor g = grad.reshape({M, N}).to(at::kFloat).mul(weight_scale).contiguous();
  const bool f32 = grad.scalar_type() == at::kFloat;
  at::Tensor out = at::empty({M, K}, grad.options().dtype(at::kFloat));
  if (M > kGradDirectMaxM) {
    grad_input_tiled(g, weight, out);
  } else {
    grad_input_direct(g, weight, out);
  }
  if (f32) return out.view(shape);
  return out.to(grad.scalar_type()).view(shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(peft_ext, CPU, m) { m.impl("int8_grad_input", &int8_grad_input_cpu); }

}  // namespace peft_ext::cpu
