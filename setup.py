"""Builds peft_ext._C: CPU sources always, CUDA sources when torch has CUDA and
nvcc is found (PEFT_EXT_CUDA=0/1 overrides the detection)."""
import glob
import os

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def want_cuda():
    flag = os.environ.get("PEFT_EXT_CUDA")
    import torch

    available = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if flag is None:
        return available
    if flag == "1" and not available:
        raise RuntimeError(
            "PEFT_EXT_CUDA=1 but torch has no CUDA or nvcc was not found; set CUDA_HOME "
            "to the CUDA toolkit folder"
        )
    return flag == "1"


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extension():
    cpu = [s for s in sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp") if not s.endswith("no_cuda.cpp")]
    # -fopenmp makes at::parallel_for (inline OpenMP in ATen's headers) run in
    # parallel; the OpenMP runtime itself is the one torch already loaded.
    cxx = ["-O3", "-fopenmp", "-fvisibility=hidden"]
    if not want_cuda():
        return cpp_extension.CppExtension(
            "peft_ext._C", cpu + ["csrc/cpu/no_cuda.cpp"], extra_compile_args={"cxx": cxx}
        )
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    nvcc = ["-O3", "-lineinfo", f'-DPEFT_EXT_CUDA_ARCHS="{archs}"']
    return cpp_extension.CUDAExtension(
        "peft_ext._C",
        cpu + sources("csrc/cuda/*.cu"),
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
