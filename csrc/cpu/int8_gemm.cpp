// CPU int8 linear ops: argument checks, portable kernels, the packed-panel
// driver shared by every tier, and dispatch to the tier in use (cpu_features):
// AVX2 (int8_gemm_avx2.cpp), avx_vnni (int8_gemm_vnni256.cpp), avx512_vnni
// (int8_gemm_avx512_vnni.cpp).
#include <algorithm>
#include <cmath>
#include <cstring>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../int8_checks.h"
#include "../linear_common.h"
#include "cpu_features.h"
#include "int8_grad_kernels.h"
#include "int8_kernels.h"

namespace peft_ext::cpu {

void quantize_rows_scalar(const float* x, int64_t ldx, int64_t M, int64_t K, int8_t* q,
                          int64_t ldq, float* scale) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * ldx;
    int8_t* qr = q + m * ldq;
    bool finite = true;
    float absmax = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      finite = finite && std::isfinite(xr[k]);
      absmax = std::max(absmax, std::fabs(xr[k]));
    }
    const float s = absmax / 127.0f;
    // absmax 0, or so small (< ~1.8e-43) that the scale underflows to 0: q 0.
    if (!finite || s == 0.0f) {
      // NaN in, NaN out: the epilogue turns the NaN scale into a NaN row.
      scale[m] = finite ? 0.0f : NAN;
      std::memset(qr, 0, static_cast<size_t>(ldq));
      continue;
    }
    scale[m] = s;
    for (int64_t k = 0; k < ldq; ++k) {
      float r = k < K ? std::nearbyint(xr[k] / s) : 0.0f;
      r = std::min(127.0f, std::max(-127.0f, r));
      qr[k] = static_cast<int8_t>(r);
    }
  }
}

void gemm_s8_scalar(const int8_t* q, int64_t ldq, const int8_t* w, int64_t M, int64_t K,
                    int64_t n0, int64_t n1, const Epilogue& ep) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = n0; n < n1; ++n) {
      int32_t acc = 0;
      for (int64_t k = 0; k < K; ++k)
        acc += static_cast<int32_t>(q[m * ldq + k]) * static_cast<int32_t>(w[n * K + k]);
      ep.store(m, n, static_cast<float>(acc));
    }
  }
}

void pack_panels_scalar(const int8_t* w, int64_t N, int64_t K, int64_t p0, int64_t p1, int8_t* dst) {
  const int64_t kq = k_groups(K);
  for (int64_t p = p0; p < p1; ++p) {
    int8_t* panel = dst + (p - p0) * panel_bytes(K);
    for (int64_t t = 0; t < kq; ++t)
      for (int64_t j = 0; j < kPanelCols; ++j)
        for (int64_t b = 0; b < 4; ++b) {
          const int64_t n = p * kPanelCols + j, k = 4 * t + b;
          panel[64 * t + 4 * j + b] = n < N && k < K ? w[n * K + k] : 0;
        }
  }
}

void column_sums(const int8_t* w, int64_t N, int64_t K, int64_t n0, int64_t n1, int32_t* sums) {
  for (int64_t n = n0; n < n1; ++n) {
    int32_t s = 0;
    if (n < N)
      for (int64_t k = 0; k < K; ++k) s += w[n * K + k];
    sums[n - n0] = s;
  }
}

namespace {

// vpdpbusd, one dword lane at a time: u8 x s8, four products per lane,
// wrapping int32 accumulation (done in uint32 to keep the wrap defined).
void micro_scalar(const uint8_t* x, int64_t ldx, int mr, const int8_t* panel, int64_t ps, int np,
                  int64_t kq, int32_t* out) {
  for (int i = 0; i < mr; ++i)
    for (int p = 0; p < np; ++p)
      for (int64_t j = 0; j < kPanelCols; ++j) {
        uint32_t acc = static_cast<uint32_t>(out[i * kTileLd + 16 * p + j]);
        for (int64_t t = 0; t < kq; ++t)
          for (int64_t b = 0; b < 4; ++b)
            acc += static_cast<uint32_t>(static_cast<int32_t>(x[i * ldx + 4 * t + b]) *
                                         static_cast<int32_t>(panel[p * ps + 64 * t + 4 * j + b]));
        out[i * kTileLd + 16 * p + j] = static_cast<int32_t>(acc);
      }
}

void store_row_scalar(const Epilogue& ep, int64_t m, int64_t n, int64_t nr, const int32_t* acc) {
  for (int64_t j = 0; j < nr; ++j) ep.store(m, n + j, static_cast<float>(acc[j]));
}

}  // namespace

// Four rows by two panels, so the scalar tier also walks the multi-panel and
// row-tail paths of the driver that the AVX-512 tier uses.
PackedKernel packed_kernel_scalar() { return {micro_scalar, store_row_scalar, 4, 2, true}; }

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
  at::Tensor q, scale;
  int64_t ldq;
};

QuantizedRows quantize(const at::Tensor& x2d) {
  const int64_t M = x2d.size(0), K = x2d.size(1);
  QuantizedRows r;
  r.ldq = round_up(std::max<int64_t>(K, 1), kPadK);
  r.q = at::empty({M, r.ldq}, x2d.options().dtype(at::kChar));
  r.scale = at::empty({M}, x2d.options().dtype(at::kFloat));
  const bool avx2 = uses_avx2(active_isa());
  const float* xp = x2d.data_ptr<float>();
  int8_t* qp = r.q.data_ptr<int8_t>();
  float* sp = r.scale.data_ptr<float>();
  // Quantizing is ~1 % of the product: threads only for 1M+ elements, as
  // every parallel region is one more barrier (costly on a busy machine).
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(K, 1));
  at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) {
    auto fn = avx2 ? quantize_rows_avx2 : quantize_rows_scalar;
    fn(xp + m0 * K, K, m1 - m0, K, qp + m0 * r.ldq, r.ldq, sp + m0);
  });
  return r;
}

PackedKernel packed_kernel(Isa isa) {
  switch (isa) {
    case Isa::Avx512Vnni: return packed_kernel_avx512_vnni();
    case Isa::AvxVnni: return packed_kernel_avx_vnni();
    case Isa::Avx2: return packed_kernel_avx2();
    default: return packed_kernel_scalar();
  }
}

// The rows the micro kernels read: q itself, or q + 128 (as u8) for the
// shifted (vpdpbusd) kernels. Padding past K stays harmless: the weight is 0 there.
at::Tensor kernel_rows(const PackedKernel& g, const at::Tensor& q) {
  if (!g.shifted) return q;
  at::Tensor u = at::empty_like(q, q.options().dtype(at::kByte));
  const int8_t* src = q.data_ptr<int8_t>();
  uint8_t* dst = u.data_ptr<uint8_t>();
  const int64_t n = q.numel();
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<uint8_t>(src[i]) ^ 0x80;
  return u;
}

}  // namespace

// The shared packed driver (declared in int8_kernels.h, where its contract is).
void gemm_panels(const PackedKernel& g, const uint8_t* x, int64_t ldx, int64_t M, int64_t K,
                 int64_t N, const int8_t* panels, const int32_t* sums, int64_t p0, int64_t p1,
                 const Epilogue& ep) {
  const int64_t kq = k_groups(K), ps = panel_bytes(K);
  // Blocks of kMc rows x kKc groups of 4 k: the panel slice (kKc * 64 bytes
  // per panel) stays in L1 while every row block of the kMc rows passes over it.
  // A single row block needs no k blocking.
  constexpr int64_t kMc = 48, kKc = 64;
  const int64_t mc = kMc / g.mr_max * g.mr_max;
  const int64_t kc = M <= g.mr_max ? kq : kKc;
  alignas(64) int32_t res[kMc * kTileLd];
  for (int64_t p = p0; p < p1; p += g.np_max) {
    const int np = static_cast<int>(std::min<int64_t>(g.np_max, p1 - p));
    const int8_t* panel = panels + (p - p0) * ps;
    for (int64_t mb = 0; mb < M; mb += mc) {
      const int64_t rows = std::min(mc, M - mb);
      std::memset(res, 0, sizeof(int32_t) * kTileLd * rows);
      for (int64_t t0 = 0; t0 < kq; t0 += kc) {
        const int64_t tk = std::min(kc, kq - t0);
        for (int64_t m = mb; m < mb + rows; m += g.mr_max) {
          const int mr = static_cast<int>(std::min<int64_t>(g.mr_max, mb + rows - m));
          g.micro(x + m * ldx + 4 * t0, ldx, mr, panel + 64 * t0, ps, np, tk, res + (m - mb) * kTileLd);
        }
      }
      for (int64_t i = 0; i < rows; ++i) {
        for (int pp = 0; pp < np; ++pp) {
          const int64_t n = (p + pp) * kPanelCols;
          const int64_t nr = std::min<int64_t>(kPanelCols, N - n);
          int32_t* r = res + i * kTileLd + 16 * pp;
          if (g.shifted) {
            // sum (q + 128) w - 128 sum w, modulo 2^32: exact, as the true sum fits.
            const int32_t* cs = sums + (n - p0 * kPanelCols);
            for (int j = 0; j < kPanelCols; ++j)
              r[j] = static_cast<int32_t>(static_cast<uint32_t>(r[j]) -
                                          (static_cast<uint32_t>(cs[j]) << 7));
          }
          g.store_row(ep, mb + i, n, nr, r);
        }
      }
    }
  }
}

namespace {

void pack_panels(const int8_t* w, int64_t N, int64_t K, int64_t p0, int64_t p1, int8_t* dst) {
  auto fn = uses_avx2(active_isa()) ? pack_panels_avx2 : pack_panels_scalar;
  fn(w, N, K, p0, p1, dst);
}

// Packed weight tensor: int8 [kPackedHeader + P * panel_bytes + 4 * 16 * P]:
// a header (magic, N, K), the panels, the column sums. The same bytes serve
// every ISA tier, so a tier change never invalidates it.
constexpr int64_t kPackedHeader = 64;
constexpr int64_t kPackedMagic = 0x3150384954464550;  // "PEFTI8P1"

int64_t packed_numel(int64_t N, int64_t K) {
  const int64_t P = panel_count(N);
  return kPackedHeader + P * panel_bytes(K) + 4 * kPanelCols * P;
}

at::Tensor int8_pack_weight_cpu(const at::Tensor& weight) {
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kChar, "weight must be int8, got ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight must be 2-D [out_features, in_features], got ",
                    weight.dim(), "-D");
  TORCH_CHECK_VALUE(weight.is_contiguous(), "weight must be contiguous");
  const int64_t N = weight.size(0), K = weight.size(1), P = panel_count(N);
  at::Tensor packed = at::zeros({packed_numel(N, K)}, weight.options());
  int8_t* base = packed.data_ptr<int8_t>();
  const int64_t header[4] = {kPackedMagic, N, K, P};
  std::memcpy(base, header, sizeof(header));
  int8_t* panels = base + kPackedHeader;
  auto* sums = reinterpret_cast<int32_t*>(panels + P * panel_bytes(K));
  const int8_t* w = weight.data_ptr<int8_t>();
  if (K > 0) {
    at::parallel_for(0, P, 1, [&](int64_t a, int64_t b) {
      pack_panels(w, N, K, a, b, panels + a * panel_bytes(K));
      column_sums(w, N, K, a * kPanelCols, b * kPanelCols, sums + a * kPanelCols);
    });
  }
  return packed;
}

// The panels of a packed tensor made for this weight, or an error. A stale
// copy (the weight changed after packing) is caught by comparing 64 sampled
// bytes; Int8Linear itself repacks whenever the weight changes.
const int8_t* checked_panels(const at::Tensor& packed, const at::Tensor& weight) {
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kChar, "packed must be int8 (from int8_pack_weight), got ",
                   packed.scalar_type());
  TORCH_CHECK_VALUE(packed.device() == weight.device(), "packed is on ", packed.device(),
                    " but weight is on ", weight.device());
  TORCH_CHECK_VALUE(packed.dim() == 1 && packed.is_contiguous() && packed.numel() == packed_numel(N, K),
                    "packed was not made by int8_pack_weight for a [", N, ", ", K, "] weight");
  const int8_t* base = packed.data_ptr<int8_t>();
  int64_t header[4];
  std::memcpy(header, base, sizeof(header));
  TORCH_CHECK_VALUE(header[0] == kPackedMagic && header[1] == N && header[2] == K,
                    "packed was not made by int8_pack_weight for a [", N, ", ", K, "] weight");
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(base) % 64 == 0,
                    "packed must be 64-byte aligned (a fresh tensor, not a view)");
  const int8_t* panels = base + kPackedHeader;
  const int8_t* w = weight.data_ptr<int8_t>();
  if (N > 0 && K > 0) {
    for (uint64_t s = 0; s < 64; ++s) {
      const int64_t n = static_cast<int64_t>((s * 2654435761u) % static_cast<uint64_t>(N));
      const int64_t k = static_cast<int64_t>((s * 40503u + 7) % static_cast<uint64_t>(K));
      const int64_t at = (n / kPanelCols) * panel_bytes(K) + 64 * (k / 4) + 4 * (n % kPanelCols) + k % 4;
      TORCH_CHECK_VALUE(panels[at] == w[n * K + k],
                        "packed does not match weight (the weight changed after packing): "
                        "repack it with int8_pack_weight");
    }
  }
  return panels;
}

// From this many activation rows on, the plain-weight op packs panels per
// call (one extra pass over the weight) for the register-blocked kernel;
// below, the dot-product kernel streams the row-major weight directly.
constexpr int64_t kPackedMinM = 8;

std::tuple<at::Tensor, at::Tensor> quantize_per_token_cpu(const at::Tensor& x) {
  check_float_input(x, "x");
  if (x.size(-1) == 0) {
    // Empty rows: absmax 0, scale 0 (rows_f32 cannot reshape 0 elements to [-1, 0]).
    const int64_t M = leading_rows(x);
    return {at::empty({M, 0}, x.options().dtype(at::kChar)), at::zeros({M}, x.options().dtype(at::kFloat))};
  }
  const at::Tensor x2d = rows_f32(x);
  const QuantizedRows r = quantize(x2d);
  return {r.q.narrow(1, 0, x2d.size(1)).contiguous(), r.scale};
}

at::Tensor int8_linear_impl(const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& weight_scale, const c10::optional<at::Tensor>& bias,
                            const at::Tensor* packed) {
  check_int8_linear_args(x, weight, weight_scale, bias, /*check_k_overflow=*/true);
  const int8_t* pre = packed != nullptr ? checked_panels(*packed, weight) : nullptr;
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
  const Isa isa = active_isa();
  const int8_t* qp = r.q.data_ptr<int8_t>();
  const int8_t* wp = weight.data_ptr<int8_t>();
  if (pre == nullptr && M < kPackedMinM) {
    const bool avx2 = uses_avx2(isa);
    parallel_columns(N, K, M, 4, [&](int64_t n0, int64_t n1) {
      (avx2 ? gemm_s8_avx2 : gemm_s8_scalar)(qp, r.ldq, wp, M, K, n0, n1, ep);
    });
    return out;
  }
  const PackedKernel g = packed_kernel(isa);
  const at::Tensor xk = kernel_rows(g, r.q);
  const auto* xp = static_cast<const uint8_t*>(xk.data_ptr());
  const int64_t P = panel_count(N), align = g.np_max * kPanelCols;
  if (pre != nullptr) {
    const auto* sums = reinterpret_cast<const int32_t*>(pre + P * panel_bytes(K));
    parallel_columns(N, K, M, align, [&](int64_t n0, int64_t n1) {
      const int64_t p0 = n0 / kPanelCols, p1 = panel_count(n1);
      gemm_panels(g, xp, r.ldq, M, K, N, pre + p0 * panel_bytes(K), sums + p0 * kPanelCols, p0, p1, ep);
    });
    return out;
  }
  // Plain weight, many rows: each thread packs np_max panels at a time into
  // a small L2-resident buffer and runs every row over them.
  parallel_columns(N, K, M, align, [&](int64_t n0, int64_t n1) {
    const int64_t p0 = n0 / kPanelCols, p1 = panel_count(n1);
    at::Tensor buf = at::empty({g.np_max * panel_bytes(K) + 64}, weight.options());
    auto* panel = reinterpret_cast<int8_t*>(round_up(reinterpret_cast<uintptr_t>(buf.data_ptr()), 64));
    int32_t sums[4 * kPanelCols];
    for (int64_t p = p0; p < p1; p += g.np_max) {
      const int64_t pe = std::min<int64_t>(p + g.np_max, p1);
      pack_panels(wp, N, K, p, pe, panel);
      if (g.shifted) column_sums(wp, N, K, p * kPanelCols, pe * kPanelCols, sums);
      gemm_panels(g, xp, r.ldq, M, K, N, panel, sums, p, pe, ep);
    }
  });
  return out;
}

at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                           const at::Tensor& weight_scale, const c10::optional<at::Tensor>& bias) {
  return int8_linear_impl(x, weight, weight_scale, bias, nullptr);
}

at::Tensor int8_linear_packed_cpu(const at::Tensor& x, const at::Tensor& weight,
                                  const at::Tensor& weight_scale,
                                  const c10::optional<at::Tensor>& bias, const at::Tensor& packed) {
  return int8_linear_impl(x, weight, weight_scale, bias, &packed);
}
// Above this many rows the weight-only product is compute bound: dequantize a
// tile of weight rows at a time and let the BLAS multiply it, instead of
// converting every int8 weight again for every 4 activation rows. Measured on
// a 2-core Zen 3 (AVX2, K = N = 4096, 2 threads, busy machine, medians): the
// direct kernel took 223 / 348 / 422 / 629 / 905 / 963 ms at M = 49 / 64 / 96 /
// 128 / 192 / 256 against 1579 / 1524 / 1604 / 1728 / 2500 / 2376 ms for the
// dequantize + BLAS path, so the direct kernel runs up to M = 256. On a Zen 4
// (AVX-512 BLAS) the two are even there: 0.279 ms per row at M = 256 against
// 0.249 ms at M = 257 separately, the direct kernel 1.05x faster alternating.
constexpr int64_t kWeightOnlyDirectMaxM = 256;

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
    const int64_t tile = float_tile_rows(K);
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
  const bool avx2 = uses_avx2(active_isa());
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
  m.impl("int8_pack_weight", &int8_pack_weight_cpu);
  m.impl("int8_linear_packed", &int8_linear_packed_cpu);
  m.impl("int8_linear_weight_only", &int8_linear_weight_only_cpu);
  m.impl("int8_dequantize", &int8_dequantize_cpu);
}

}  // namespace peft_ext::cpu
