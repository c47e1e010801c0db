// C++ test for libtorch users: calls the int8 ops through the dispatcher and
// checks them against a plain reference, on both CPU ISAs.
#include <cstdio>

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

int check(bool ok, const char* what) {
  std::printf("%s: %s\n", ok ? "ok  " : "FAIL", what);
  return ok ? 0 : 1;
}

}  // namespace

int main() {
  torch::manual_seed(0);
  int failures = 0;
  for (const char* isa : {"scalar", "avx2"}) {
    if (std::string(isa) == "avx2" && peft_ext::cpu::detected_isa() != peft_ext::cpu::Isa::Avx2)
      continue;
    peft_ext::cpu::set_isa(isa);
    // Integer inputs with a 127 in every row: scales of 1, so the exact
    // result is the integer product.
    at::Tensor x = torch::randint(-127, 128, {5, 77}).to(torch::kFloat);
    x.select(1, 0).fill_(127);
    at::Tensor w = torch::randint(-127, 128, {9, 77}).to(torch::kChar);
    at::Tensor s = torch::ones({9});
    at::Tensor b = torch::randn({9});
    at::Tensor exact = x.to(torch::kDouble).mm(w.to(torch::kDouble).t()) + b.to(torch::kDouble);
    at::Tensor dyn = call_linear("peft_ext::int8_linear", x, w, s, b);
    failures += check(torch::allclose(dyn.to(torch::kDouble), exact, 1e-6, 1e-4), isa);
    at::Tensor wo = call_linear("peft_ext::int8_linear_weight_only", x, w, s, b);
    failures += check(torch::allclose(wo.to(torch::kDouble), exact, 1e-6, 1e-2), isa);
  }
  return failures == 0 ? 0 : 1;
}
