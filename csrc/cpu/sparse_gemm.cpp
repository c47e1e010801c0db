// CPU sparse-weight linear ops (2:4, CSR, BSR): argument checks, portable
// kernels, and dispatch to the AVX2 kernels (sparse_gemm_avx2.cpp).
#include <algorithm>
#include <atomic>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../sparse_checks.h"
#include "cpu_features.h"
#include "sparse_kernels.h"

namespace peft_ext::cpu {

void sp24_rows_scalar(const float* x, int64_t ldx, int64_t M, const Sp24& w, int64_t n0, int64_t n1,
                      float* y, int64_t ldy) {
  const int64_t half = w.K / 2, ib = (w.K + 7) / 8;
  for (int64_t n = n0; n < n1; ++n) {
    const float* v = w.values + n * half;
    const uint8_t* idx = w.indices + n * ib;
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.0f;
      for (int64_t j = 0; j < half; ++j) acc += v[j] * x[m * ldx + sp24_column(idx, j)];
      y[m * ldy + n] = acc;
    }
  }
}

void csr_rows_scalar(const float* x, int64_t ldx, int64_t M, const Csr& w, int64_t n0, int64_t n1,
                     float* y, int64_t ldy) {
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < M; ++m) {
      // Four partial sums: one running sum would wait on the add latency for
      // every stored value.
      const float* xr = x + m * ldx;
      float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
      int64_t p = w.crow[n];
      const int64_t e = w.crow[n + 1];
      for (; p + 4 <= e; p += 4) {
        a0 += w.values[p] * xr[w.col[p]];
        a1 += w.values[p + 1] * xr[w.col[p + 1]];
        a2 += w.values[p + 2] * xr[w.col[p + 2]];
        a3 += w.values[p + 3] * xr[w.col[p + 3]];
      }
      for (; p < e; ++p) a0 += w.values[p] * xr[w.col[p]];
      y[m * ldy + n] = (a0 + a1) + (a2 + a3);
    }
  }
}

void bsr_rows_scalar(const float* x, int64_t ldx, int64_t M, const Bsr& w, int64_t r0, int64_t r1,
                     float* y, int64_t ldy) {
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t i = 0; i < w.bh; ++i) {
        float acc = 0.0f;
        for (int64_t b = w.crow[r]; b < w.crow[r + 1]; ++b) {
          const float* v = w.values + (b * w.bh + i) * w.bw;
          const float* xb = x + m * ldx + static_cast<int64_t>(w.col[b]) * w.bw;
          for (int64_t c = 0; c < w.bw; ++c) acc += v[c] * xb[c];
        }
        y[m * ldy + r * w.bh + i] = acc;
      }
    }
  }
}

namespace {

// From this many activation rows on, the transposed kernels win: each stored
// weight then feeds whole vectors of rows. For 2:4 the permute-based row
// kernel stays ahead up to 15 rows (K = N = 2048, one Zen 3 core: M = 8 rows
// 3.9 ms vs transposed 6.2 ms; M = 16 6.8 ms vs 5.9 ms).
constexpr int64_t kTransposedMinM = 8;
constexpr int64_t kSp24TransposedMinM = 16;

// at::parallel_for hands each thread one equal slice; when a core is shared
// (a busy machine, a VM), the whole op then waits for the slowest thread.
// Threads here pull small chunks from a shared counter instead, so a thread
// that is running takes over the work of one that is not.
template <typename F>
void parallel_chunks(int64_t units, int64_t grain, const F& body) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunk = std::max<int64_t>(grain, units / (8 * threads));
  const int64_t chunks = (units + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, chunks), 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1))
      body(c * chunk, std::min(units, (c + 1) * chunk));
  });
}

// dst[c, r] = src[r, c] (+ add[r]) for a rows x cols source with row stride
// lds, in 32 x 32 tiles so that both sides stay in cache; dst columns from
// `rows` up to ldd are zeroed (the padding of xT). at::copy_ of a transposed
// view, and a zero fill of the whole buffer, cost several times more.
void transpose_blocked(const float* src, int64_t rows, int64_t cols, int64_t lds, float* dst, int64_t ldd,
                       const float* add) {
  constexpr int64_t kT = 32;
  at::parallel_for(0, (cols + kT - 1) / kT, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t cb = c0 * kT; cb < std::min(cols, c1 * kT); cb += kT) {
      const int64_t ce = std::min(cols, cb + kT);
      for (int64_t rb = 0; rb < rows; rb += kT) {
        const int64_t re = std::min(rows, rb + kT);
        for (int64_t c = cb; c < ce; ++c)
          for (int64_t r = rb; r < re; ++r) dst[c * ldd + r] = src[r * lds + c] + (add ? add[r] : 0.0f);
      }
      for (int64_t c = cb; c < ce; ++c)
        for (int64_t r = rows; r < ldd; ++r) dst[c * ldd + r] = 0.0f;
    }
  });
}

// Scratch for xT and yT, kept per calling thread: a fresh multi-MiB buffer
// costs a page fault per 4 KiB on every call (~1 ms per 2 MiB here, as much
// as the kernel at high sparsity). Buffers above kMaxCachedScratch bytes are
// not kept.
constexpr int64_t kMaxCachedScratch = int64_t{32} << 20;

float* scratch(int slot, int64_t floats, const at::TensorOptions& opts, at::Tensor& fresh) {
  static thread_local at::Tensor cache[2];
  if (floats * 4 > kMaxCachedScratch) {
    fresh = at::empty({floats}, opts);
    return fresh.data_ptr<float>();
  }
  if (!cache[slot].defined() || cache[slot].numel() < floats) cache[slot] = at::empty({floats}, opts);
  return cache[slot].data_ptr<float>();
}

// Runs `rows_kernel` on [M, K] rows or `transposed_kernel` on x transposed,
// over `units` output units (rows, or block rows of `unit` rows), in parallel.
template <typename Rows, typename Transposed>
at::Tensor run(const at::Tensor& x, int64_t N, int64_t units, int64_t unit_work, bool transposed,
               const c10::optional<at::Tensor>& bias, const Rows& rows_kernel,
               const Transposed& transposed_kernel) {
  const auto shape = out_shape(x, N);
  if (leading_rows(x) == 0 || N == 0) return at::zeros(shape, x.options());
  if (x.size(-1) == 0) {
    // in_features == 0: every dot product is empty, y = bias (or 0).
    at::Tensor out = at::empty(shape, x.options());
    fill_empty_k(out, bias);
    return out;
  }
  const at::Tensor x2d = rows_f32(x);
  const int64_t M = x2d.size(0), K = x2d.size(1);
  const int64_t grain = grain_size(unit_work * M);
  at::Tensor y;
  if (!transposed) {
    y = at::empty({M, N}, x2d.options());
    const float* xp = x2d.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    parallel_chunks(units, grain, [&](int64_t a, int64_t b) { rows_kernel(xp, K, M, a, b, yp, N); });
    if (bias.has_value()) y.add_(bias->to(at::kFloat));
  } else {
    const int64_t ldt = (M + 7) / 8 * 8;
    at::Tensor xT_fresh, yT_fresh;
    float* xT = scratch(0, K * ldt, x2d.options(), xT_fresh);
    float* yT = scratch(1, N * ldt, x2d.options(), yT_fresh);
    transpose_blocked(x2d.data_ptr<float>(), M, K, K, xT, ldt, nullptr);
    std::fill(yT, yT + N * ldt, 0.0f);
    parallel_chunks(units, grain, [&](int64_t a, int64_t b) { transposed_kernel(xT, ldt, a, b, yT); });
    y = at::empty({M, N}, x2d.options());
    const at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
    transpose_blocked(yT, N, M, ldt, y.data_ptr<float>(), N,
                      b.defined() ? b.data_ptr<float>() : nullptr);
  }
  return y.to(x.scalar_type()).reshape(shape);
}

at::Tensor sparse24_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
                               const c10::optional<at::Tensor>& bias) {
  const auto nk = check_sparse24_args(x, values, indices, bias);
  const int64_t N = nk.first, K = nk.second;
  const at::Tensor v = values.to(at::kFloat).contiguous();
  const Sp24 w{v.data_ptr<float>(), indices.data_ptr<uint8_t>(), K};
  const bool avx2 = uses_avx2(active_isa());
  const int64_t M = x.numel() / std::max<int64_t>(1, K);
  return run(
      x, N, N, K / 2, avx2 && M >= kSp24TransposedMinM, bias,
      [&](const float* xp, int64_t ldx, int64_t M_, int64_t a, int64_t b, float* y, int64_t ldy) {
        (avx2 ? sp24_rows_avx2 : sp24_rows_scalar)(xp, ldx, M_, w, a, b, y, ldy);
      },
      [&](const float* xT, int64_t ldt, int64_t a, int64_t b, float* yT) {
        sp24_transposed_avx2(xT, ldt, w, a, b, yT);
      });
}

at::Tensor csr_linear_cpu(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                          const at::Tensor& values, int64_t in_features,
                          const c10::optional<at::Tensor>& bias) {
  const int64_t N = check_csr_args(x, crow, col, values, in_features, bias);
  check_rows(crow, col, in_features, "values");
  const at::Tensor v = values.to(at::kFloat).contiguous();
  const Csr w{crow.data_ptr<int64_t>(), col.data_ptr<int32_t>(), v.data_ptr<float>()};
  const bool avx2 = uses_avx2(active_isa());
  const int64_t M = x.numel() / std::max<int64_t>(1, in_features);
  const int64_t per_row = std::max<int64_t>(1, values.numel() / std::max<int64_t>(1, N));
  return run(
      x, N, N, per_row, avx2 && M >= kTransposedMinM, bias,
      [&](const float* xp, int64_t ldx, int64_t M_, int64_t a, int64_t b, float* y, int64_t ldy) {
        csr_rows_scalar(xp, ldx, M_, w, a, b, y, ldy);
      },
      [&](const float* xT, int64_t ldt, int64_t a, int64_t b, float* yT) {
        csr_transposed_avx2(xT, ldt, w, a, b, yT);
      });
}

at::Tensor bsr_linear_cpu(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                          const at::Tensor& values, int64_t in_features,
                          const c10::optional<at::Tensor>& bias) {
  const int64_t N = check_bsr_args(x, crow, col, values, in_features, bias);
  const int64_t bh = values.size(1), bw = values.size(2), R = crow.numel() - 1;
  check_rows(crow, col, in_features / bw, "blocks");
  const at::Tensor v = values.to(at::kFloat).contiguous();
  const Bsr w{crow.data_ptr<int64_t>(), col.data_ptr<int32_t>(), v.data_ptr<float>(), bh, bw};
  const bool avx2 = uses_avx2(active_isa());
  const int64_t M = x.numel() / std::max<int64_t>(1, in_features);
  const int64_t per_unit = std::max<int64_t>(1, values.numel() / std::max<int64_t>(1, R));
  return run(
      x, N, R, per_unit, avx2 && M >= kTransposedMinM, bias,
      [&](const float* xp, int64_t ldx, int64_t M_, int64_t a, int64_t b, float* y, int64_t ldy) {
        (avx2 && bw % 8 == 0 ? bsr_rows_avx2 : bsr_rows_scalar)(xp, ldx, M_, w, a, b, y, ldy);
      },
      [&](const float* xT, int64_t ldt, int64_t a, int64_t b, float* yT) {
        bsr_transposed_avx2(xT, ldt, w, a, b, yT);
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(peft_ext, CPU, m) {
  m.impl("sparse24_linear", &sparse24_linear_cpu);
  m.impl("csr_linear", &csr_linear_cpu);
  m.impl("bsr_linear", &bsr_linear_cpu);
}

}  // namespace peft_ext::cpu
