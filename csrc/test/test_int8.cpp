// C++ test for libtorch users: calls the int8 ops through the dispatcher and
// checks them against a plain reference, on every CPU tier this machine has.
#include <cstdio>
#include <string>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include "cpu/cpu_features.h"

namespace {

at::Tensor call_linear(const char* name, const at::Tensor& x, const at::Tensor& w,
                       const at::Tensor& s, const at::Tensor& b) {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow(name, "")
                .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const std::optional<at::Tensor>&)>();
  return op.call(x, w, s, b);
}

at::Tensor call_pack(const at::Tensor& w) {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("peft_ext::int8_pack_weight", "")
                .typed<at::Tensor(const at::Tensor&)>();
  return op.call(w);
}

at::Tensor call_linear_packed(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s,
                              const at::Tensor& b, const at::Tensor& packed) {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("peft_ext::int8_linear_packed", "")
                .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const std::optional<at::Tensor>&, const at::Tensor&)>();
  return op.call(x, w, s, b, packed);
}

int check(bool ok, const char* what) {
  std::printf("%s: %s\n", ok ? "ok  " : "FAIL", what);
  return ok ? 0 : 1;
}

}  // namespace

int main() {
  torch::manual_seed(0);
  int failures = 0;
  using peft_ext::cpu::Isa;
  const Isa tiers[] = {Isa::Scalar, Isa::Avx2, Isa::AvxVnni, Isa::Avx512Vnni};
  for (const Isa tier : tiers) {
    const char* isa = peft_ext::cpu::isa_name(tier);
    if (static_cast<int>(tier) > static_cast<int>(peft_ext::cpu::detected_isa())) {
      std::printf("skip: %s (not supported by this CPU; best: %s)\n", isa,
                  peft_ext::cpu::isa_name(peft_ext::cpu::detected_isa()));
      continue;
    }
    peft_ext::cpu::set_isa(isa);
    // 5 rows take the dot-product kernels, 37 the packed register tiles; 100
    // columns span several panels (the AVX-512 tile takes 4) and K = 300 more
    // than one k block of the driver.
    const int64_t shapes[][3] = {{5, 77, 9}, {37, 77, 9}, {37, 300, 100}};
    for (const auto& shape : shapes) {
      const int64_t rows = shape[0], K = shape[1], N = shape[2];
      // Integer inputs with a 127 in every row: scales of 1, so the exact
      // result is the integer product.
      at::Tensor x = torch::randint(-127, 128, {rows, K}).to(torch::kFloat);
      x.select(1, 0).fill_(127);
      at::Tensor w = torch::randint(-127, 128, {N, K}).to(torch::kChar);
      at::Tensor s = torch::ones({N});
      at::Tensor b = torch::randn({N});
      at::Tensor exact = x.to(torch::kDouble).mm(w.to(torch::kDouble).t()) + b.to(torch::kDouble);
      const std::string what = std::string(isa) + ", " + std::to_string(rows) + " x " +
                               std::to_string(K) + " x " + std::to_string(N);
      at::Tensor dyn = call_linear("peft_ext::int8_linear", x, w, s, b);
      failures += check(torch::allclose(dyn.to(torch::kDouble), exact, 1e-6, 1e-4), (what + ", W8A8").c_str());
      at::Tensor packed = call_pack(w);
      at::Tensor pre = call_linear_packed(x, w, s, b, packed);
      failures += check(torch::allclose(pre.to(torch::kDouble), exact, 1e-6, 1e-4),
                        (what + ", W8A8 prepacked").c_str());
      at::Tensor wo = call_linear("peft_ext::int8_linear_weight_only", x, w, s, b);
      failures += check(torch::allclose(wo.to(torch::kDouble), exact, 1e-6, 1e-2),
                        (what + ", weight-only").c_str());
    }
  }
  return failures == 0 ? 0 : 1;
}
