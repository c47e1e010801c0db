// Linked only when the extension is built without CUDA (setup.py picks either
// this file or cuda/build_info.cu).
#include <string>

namespace peft_ext {
std::string cuda_build_info() { return "cuda=0"; }
}  // namespace peft_ext
