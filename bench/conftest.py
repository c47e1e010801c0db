"""Shared benchmark setup: fixed threads, and the facts every result JSON carries."""
import datetime
import subprocess

import torch

# The figures in the README are 2-thread CPU figures.
torch.set_num_threads(2)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["cuda_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    machine_info["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    try:
        machine_info["git_commit"] = subprocess.check_output(["git", "rev-parse", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        machine_info["git_commit"] = None
