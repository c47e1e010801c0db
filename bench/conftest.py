"""Shared benchmark setup: fixed threads, collection of bench_*.py, and the
machine facts (bench/harness.py) in every pytest-benchmark JSON."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

# The figures in the README are 2-thread CPU figures.
torch.set_num_threads(int(os.environ.get("PEFT_EXT_BENCH_THREADS", "2")))


def pytest_collect_file(file_path, parent):
    # bench_<concept>.py are benchmark modules (pytest's default pattern is test_*.py),
    # so that `pytest -m cuda bench` finds them too.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        if not parent.session.isinitpath(file_path):
            return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["peft_ext"] = harness.machine_info()
