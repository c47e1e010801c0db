// Every op schema of peft_ext, in one place. Backends register their kernels
// with TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp and csrc/cuda/*.cu.
#include <optional>
#include <string>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "cpu/cpu_features.h"
#include "int8_checks.h"

namespace peft_ext {

// The CUDA translation units define this when they are built (cuda/build_info.cu).
std::string cuda_build_info();

static std::string build_info() {
  std::string info = "cpu_isa=";
  info += cpu::isa_name(cpu::active_isa());
  info += ";cpu_isa_detected=";
  info += cpu::isa_name(cpu::detected_isa());
  // Which encoding (and register tile) the avx_vnni tier runs here.
  const bool vnni = static_cast<int>(cpu::detected_isa()) >= static_cast<int>(cpu::Isa::AvxVnni);
  info += ";avx_vnni_form=";
  info += !vnni ? "none" : cpu::has_avx_vnni_vex() ? "vex" : "evex";
  // The exact-int32 bound on in_features (int8_checks.h), for Python and tests.
  info += ";max_exact_k=" + std::to_string(kMaxExactK);
  info += ";";
  info += cuda_build_info();
  return info;
}

static void set_cpu_isa(std::string isa) { cpu::set_isa(isa); }

// csrc/cpu/prefetch_ring.cpp
namespace prefetch {
void register_prefetch_ring(torch::Library& m);
}

TORCH_LIBRARY(peft_ext, m) {
  // Introspection, used by `python -m peft_ext info` and by the tests to run
  // the portable kernels next to the AVX2 ones.
  m.def("build_info() -> str", &build_info);
  m.def("set_cpu_isa(str isa) -> ()", &set_cpu_isa);

  // int8: x[..., K] float -> (q int8 [M, K], scale float32 [M]) with M the
  // product of the leading dimensions; scale = absmax / 127 per row.
  m.def("quantize_per_token(Tensor x) -> (Tensor, Tensor)");
  // W8A8: y = (q_x @ q_w^T) * s_x * s_w + bias, quantizing x per token inside.
  m.def("int8_linear(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias) -> Tensor");
  // The int8 weight [N, K] prepacked once into the panel layout the CPU
  // kernels read (csrc/cpu/int8_kernels.h), with its column sums: a derived
  // int8 tensor of about N * K + 4 * N bytes, the same for every CPU ISA tier.
  m.def("int8_pack_weight(Tensor weight) -> Tensor");
  // int8_linear with the weight also given prepacked (from int8_pack_weight);
  // the plain weight stays the source of truth (shapes, autograd, checks).
  m.def(
      "int8_linear_packed(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias, Tensor packed) "
      "-> Tensor");
  // Weight-only: y = x @ (q_w * s_w)^T + bias, x stays in float.
  m.def(
      "int8_linear_weight_only(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias) -> "
      "Tensor");
  // q_w * s_w as a float tensor of the given dtype (backward, to_linear).
  m.def("int8_dequantize(Tensor weight, Tensor weight_scale, ScalarType dtype) -> Tensor");
  // Backward of both int8 linear ops: grad[..., N] -> grad @ (q_w * s_w), [..., K]
  // in grad's dtype, read from the int8 weight (no float copy of W is made).
  m.def("int8_grad_input(Tensor grad, Tensor weight, Tensor weight_scale) -> Tensor");

  // prefetch: torch.classes.peft_ext.PrefetchRing(str device, int depth, bool pin_memory),
  // a fixed ring of slots filled by a C++ worker thread (and, on CUDA, a side
  // stream); methods put, finish, next, stop, stats and the static pin().
  prefetch::register_prefetch_ring(m);

  // sparse: y = x @ W^T + bias with W stored compressed (layouts in
  // csrc/cpu/sparse_kernels.h). 2:4 keeps two of every four weights of a row:
  // values [N, K/2] and 2-bit positions packed four per byte, [N, ceil(K/8)].
  m.def("sparse24_linear(Tensor x, Tensor values, Tensor indices, Tensor? bias) -> Tensor");
  // Unstructured, CSR: crow int64 [N + 1], col int32 [nnz], values [nnz].
  m.def(
      "csr_linear(Tensor x, Tensor crow, Tensor col, Tensor values, int in_features, Tensor? bias) -> "
      "Tensor");
  // Block sparse, BSR: crow int64 [N / bh + 1], col int32 [nnz_blocks] (block
  // column), values [nnz_blocks, bh, bw].
  m.def(
      "bsr_linear(Tensor x, Tensor crow, Tensor col, Tensor values, int in_features, Tensor? bias) -> "
      "Tensor");
}

// Device check for meta tensors. The backend kernels check that every tensor
// argument is on x's device, but a call that mixes a meta tensor with CPU or
// CUDA ones dispatches to the Meta (fake) kernel, which would return a meta
// result. This BackendSelect kernel runs first for every op of the library;
// when a meta tensor is involved it requires all tensors on one device, then
// redispatches (without meta it only passes the call on).
namespace {

void check_one(const at::Tensor& x, const at::Tensor& t, const c10::FunctionSchema& schema, size_t i) {
  if (t.defined() && t.device() != x.device()) {
    TORCH_CHECK_VALUE(false, schema.arguments()[i].name(), " is on ", t.device(), " but ",
                      schema.arguments()[0].name(), " is on ", x.device());
  }
}
void check_one(const at::Tensor& x, const std::optional<at::Tensor>& t, const c10::FunctionSchema& schema,
               size_t i) {
  if (t.has_value()) check_one(x, *t, schema, i);
}
template <typename T>
void check_one(const at::Tensor&, const T&, const c10::FunctionSchema&, size_t) {}

template <const char* kName, typename Sig>
struct DeviceChecked;

template <const char* kName, typename Ret, typename First, typename... Rest>
struct DeviceChecked<kName, Ret(First, Rest...)> {
  static Ret call(c10::DispatchKeySet ks, First first, Rest... rest) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow(kName, "").template typed<Ret(First, Rest...)>();
    if (ks.has_backend(c10::BackendComponent::MetaBit)) {
      size_t i = 1;
      (check_one(first, rest, op.schema(), i++), ...);
    }
    const auto below = ks & c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, c10::DispatchKey::BackendSelect);
    return op.redispatch(below, first, rest...);
  }
};

using Opt = const std::optional<at::Tensor>&;
using T = const at::Tensor&;
constexpr char kInt8Linear[] = "peft_ext::int8_linear";
constexpr char kInt8WeightOnly[] = "peft_ext::int8_linear_weight_only";
constexpr char kInt8Dequantize[] = "peft_ext::int8_dequantize";
constexpr char kSparse24[] = "peft_ext::sparse24_linear";
constexpr char kCsr[] = "peft_ext::csr_linear";
constexpr char kBsr[] = "peft_ext::bsr_linear";
using LinearSig = at::Tensor(T, T, T, Opt);
using CompressedSig = at::Tensor(T, T, T, T, int64_t, Opt);

}  // namespace

TORCH_LIBRARY_IMPL(peft_ext, BackendSelect, m) {
  m.impl("int8_linear", TORCH_FN((DeviceChecked<kInt8Linear, LinearSig>::call)));
  m.impl("int8_linear_weight_only", TORCH_FN((DeviceChecked<kInt8WeightOnly, LinearSig>::call)));
  m.impl("int8_dequantize", TORCH_FN((DeviceChecked<kInt8Dequantize, at::Tensor(T, T, at::ScalarType)>::call)));
  m.impl("sparse24_linear", TORCH_FN((DeviceChecked<kSparse24, LinearSig>::call)));
  m.impl("csr_linear", TORCH_FN((DeviceChecked<kCsr, CompressedSig>::call)));
  m.impl("bsr_linear", TORCH_FN((DeviceChecked<kBsr, CompressedSig>::call)));
}

}  // namespace peft_ext

#ifndef PEFT_EXT_NO_PYTHON
#include <Python.h>

// A plain extension module so that `import peft_ext._C` loads the library and
// runs the registrations above; all functionality lives in torch.ops.peft_ext.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif  // PEFT_EXT_NO_PYTHON
