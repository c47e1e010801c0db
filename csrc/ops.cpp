// Every op schema of peft_ext, in one place. Backends register their kernels
// with TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp and csrc/cuda/*.cu.
#include <string>

#include <torch/library.h>

#include "cpu/cpu_features.h"

namespace peft_ext {

// The CUDA translation units define this when they are built (cuda/build_info.cu).
std::string cuda_build_info();

static std::string build_info() {
  std::string info = "cpu_isa=";
  info += cpu::isa_name(cpu::active_isa());
  info += ";cpu_isa_detected=";
  info += cpu::isa_name(cpu::detected_isa());
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
