"""Loads peft_ext._C after checking that it was built for the running torch.

A C++ extension links against torch's C++ symbols, which change between torch
releases: loading a build made for another torch ends in "undefined symbol"
(or worse, a crash). setup.py records the torch it built against in
peft_ext/_build.py; a mismatch of major.minor is reported here, before the
library is loaded, with what to do about it.
"""
import glob
import os

import torch

try:
    from . import _build
except ImportError:  # a library copied in by hand, without its build facts
    _build = None


def _major_minor(version: str) -> tuple:
    parts = version.split("+")[0].split(".")
    return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in parts[:2])


def check_torch(built: str, running: str) -> None:
    """Raise ImportError when the build's torch and the running torch differ in major.minor."""
    if _major_minor(built) != _major_minor(running):
        raise ImportError(
            f"peft_ext was built against torch {built} but torch {running} is running; a C++ extension "
            f"only loads into the torch major.minor it was built for. Rebuild it for this torch: "
            f"`pip install --no-build-isolation --force-reinstall --no-deps .` from the peft_ext source "
            f"(or `make build` in a checkout), or install torch=={built}."
        )


if _build is not None:
    check_torch(_build.TORCH_VERSION, torch.__version__)

try:
    from . import _C  # noqa: F401  (loads the library and registers the ops)
except ImportError as error:
    here = os.path.dirname(os.path.abspath(__file__))
    if not glob.glob(os.path.join(here, "_C*.so")) and not glob.glob(os.path.join(here, "_C*.pyd")):
        raise ImportError(
            f"peft_ext's compiled library (_C*.so) is missing from {here}: build it with "
            "`pip install --no-build-isolation -e .` (or `make build`). To test an installed peft_ext "
            "from a checkout, run pytest from the checkout root: its conftest.py then imports the "
            "installed package."
        ) from error
    raise ImportError(f"peft_ext's compiled library failed to load ({error}); it was built against torch "
                      f"{getattr(_build, 'TORCH_VERSION', 'unknown')} and torch {torch.__version__} is "
                      "running: rebuild it for this torch.") from error
