"""`python -m peft_ext info | demo [train]`."""
import argparse
import logging

import torch

import peft_ext
from peft_ext import demo, demo_train, ops


def info():
    facts = ops.build_info()
    archs = facts.get("cuda_archs", "")
    lines = [
        f"peft_ext {peft_ext.__version__}",
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"CUDA kernels built: {'yes, for sm ' + archs if facts.get('cuda') == '1' else 'no'}",
        f"CUDA device available: {torch.cuda.is_available()}",
        f"CPU kernel ISA in use: {facts['cpu_isa']} (detected: {facts['cpu_isa_detected']})",
        f"CPU threads: {torch.get_num_threads()}",
    ]
    print("\n".join(lines))


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
        demo_train.main()
    else:
        demo.main()


if __name__ == "__main__":
    main()
