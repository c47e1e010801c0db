"""Builds peft_ext._C: CPU sources always, CUDA sources when torch has CUDA and
a real CUDA toolkit is found (PEFT_EXT_CUDA=0/1 overrides the detection).

The toolkit is found the way the Makefile finds it, before anything compiles:
an explicit CUDA_HOME (or CUDA_PATH), then /usr/local/cuda, then the folder an
`nvcc` on PATH belongs to, following a wrapper script's `exec` line. A folder
counts only if it has bin/nvcc and libcudart: torch's own guess takes the
parent of whatever `nvcc` is on PATH, which for a wrapper script is a folder
without libcudart, and the link fails after minutes of compiling.

The extension uses only CPython's limited API (it is a plain module whose ops
live in torch.ops.peft_ext), so the wheel is tagged abi3 and serves every
Python >= 3.10. It still depends on the torch it was compiled against: the
version is written to peft_ext/_build.py and checked at import.
"""
import glob
import os
import re
import shutil
import warnings

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
# Machine code for Ampere and Hopper, plus PTX of the highest arch so that
# newer GPUs (sm_100, sm_120) JIT-compile it instead of failing with
# "no kernel image is available".
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
SYSTEM_CUDA = "/usr/local/cuda"


def _has_cudart(home):
    patterns = ("lib64/libcudart.so*", "lib/libcudart.so*", "targets/*/lib/libcudart.so*", "lib/x64/cudart*.lib")
    return any(glob.glob(os.path.join(home, p)) for p in patterns)


def _wrapper_target(nvcc):
    """The toolkit folder a wrapper script execs (`exec /opt/cuda-13.0/bin/nvcc "$@"`), else None."""
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    match = re.search(rb"exec\s+['\"]?(\S+?)/bin/nvcc\b", head)
    return match.group(1).decode() if match else None


def cuda_candidates():
    """(where it came from, folder) in the Makefile's order of preference."""
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        return [("CUDA_HOME", explicit)]
    found = [(SYSTEM_CUDA, SYSTEM_CUDA)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        target = _wrapper_target(nvcc)
        if target:
            found.append((f"the folder {nvcc} execs", target))
        found.append((f"nvcc on PATH ({nvcc})", os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))))
    return found


def find_cuda_home():
    """(folder or None, why not): a folder with bin/nvcc and libcudart."""
    tried = []
    for origin, home in cuda_candidates():
        if os.path.isfile(os.path.join(home, "bin", "nvcc")) and _has_cudart(home):
            return home, ""
        tried.append(f"{home} (from {origin})")
    why = "no CUDA toolkit with bin/nvcc and libcudart found; tried: " + (", ".join(tried) or "nothing")
    return None, why


def cuda_home_for_build():
    """The toolkit to build against, or None for a CPU-only build. Decided before compiling."""
    flag = os.environ.get("PEFT_EXT_CUDA")
    if flag not in (None, "", "0", "1"):
        raise SystemExit(f"PEFT_EXT_CUDA must be 0 or 1, got {flag!r}")
    if flag == "0":
        return None
    if torch.version.cuda is None:
        if flag == "1":
            raise SystemExit(f"PEFT_EXT_CUDA=1 but the torch used for the build ({torch.__version__}) has no CUDA; "
                             "install a CUDA build of torch (with --no-build-isolation, the one in your venv)")
        return None
    home, why = find_cuda_home()
    if home is None:
        if flag == "1":
            raise SystemExit(f"PEFT_EXT_CUDA=1 but {why}. Set CUDA_HOME to the CUDA toolkit folder "
                             "(the one holding bin/nvcc and lib64/libcudart.so)")
        warnings.warn(f"peft_ext: building the CPU kernels only: {why}. Set CUDA_HOME to the toolkit folder "
                      "for the CUDA kernels, or PEFT_EXT_CUDA=0 to silence this warning", stacklevel=1)
        return None
    # torch.utils.cpp_extension computed its own CUDA_HOME when imported; its
    # helpers read the module global, so correcting it here is enough.
    os.environ["CUDA_HOME"] = home
    cpp_extension.CUDA_HOME = home
    return home


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def write_build_facts(cuda_home, archs):
    """peft_ext/_build.py: the torch this build is for, checked at import (peft_ext/_library.py)."""
    text = ('"""Written by setup.py at build time; read by peft_ext/_library.py."""\n'
            f"TORCH_VERSION = {torch.__version__.split('+')[0]!r}\n"
            f"TORCH_CUDA = {torch.version.cuda if cuda_home else None!r}\n"
            f"CUDA_ARCHS = {archs!r}\n")
    path = os.path.join(ROOT, "peft_ext", "_build.py")
    old = open(path).read() if os.path.exists(path) else None
    if old != text:  # leave the mtime alone so rebuilds stay no-ops
        with open(path, "w") as f:
            f.write(text)


def extension():
    cuda_home = cuda_home_for_build()
    cpu = [s for s in sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp") if not s.endswith("no_cuda.cpp")]
    # -fopenmp makes at::parallel_for (inline OpenMP in ATen's headers) run in
    # parallel; the OpenMP runtime itself is the one torch already loaded.
    cxx = ["-O3", "-fopenmp", "-fvisibility=hidden"]
    if cuda_home is None:
        write_build_facts(None, "")
        return cpp_extension.CppExtension(
            "peft_ext._C", cpu + ["csrc/cpu/no_cuda.cpp"], extra_compile_args={"cxx": cxx}, py_limited_api=True
        )
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    write_build_facts(cuda_home, archs)
    nvcc = ["-O3", "-lineinfo", f'-DPEFT_EXT_CUDA_ARCHS="{archs}"']
    return cpp_extension.CUDAExtension(
        "peft_ext._C",
        cpu + sources("csrc/cuda/*.cu"),
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        py_limited_api=True,
    )


class BuildExtension(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    def finalize_options(self):
        super().finalize_options()
        if getattr(self, "editable_mode", False):
            # `pip install -e .` compiles in a new temporary folder each time;
            # keeping the objects and ninja's log in build/ makes the next
            # editable install recompile only what changed.
            self.build_temp = os.path.join(ROOT, "build", "editable")


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import its helpers
    setup(
        ext_modules=[extension()],
        cmdclass={"build_ext": BuildExtension},
        # torch adds -DPy_LIMITED_API=0x030A0000 to py_limited_api extensions.
        options={"bdist_wheel": {"py_limited_api": "cp310"}},
    )
