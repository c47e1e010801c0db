// Build facts reported by `python -m peft_ext info` when the CUDA kernels are built.
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#ifndef PEFT_EXT_CUDA_ARCHS
#define PEFT_EXT_CUDA_ARCHS "unknown"
#endif

namespace peft_ext {

std::string cuda_build_info() {
  // ';' separates the fields of build_info(): list the archs with ','.
  std::string archs = PEFT_EXT_CUDA_ARCHS;
  std::replace(archs.begin(), archs.end(), ';', ',');
  return "cuda=1;cuda_archs=" + archs + ";cuda_runtime=" + std::to_string(CUDART_VERSION);
}

}  // namespace peft_ext
