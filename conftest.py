"""Makes `import peft_ext` in the tests unambiguous.

`python -m pytest tests` puts the checkout first on sys.path. After a plain
`pip install .` the checkout's peft_ext/ has no compiled library, so the
tests would import that half-built copy instead of the installed package and
fail with "cannot import name '_C' from partially initialized module". When
the checkout holds no _C*.so, the checkout is taken off the path while
peft_ext is imported, so the tests run against the installed package. An
editable install or an in-place build keeps the checkout's copy.
"""
import glob
import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))


def _has_library(package_dir):
    return bool(glob.glob(os.path.join(package_dir, "_C*.so")) or glob.glob(os.path.join(package_dir, "_C*.pyd")))


if "peft_ext" not in sys.modules and not _has_library(os.path.join(ROOT, "peft_ext")):
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT]
    try:
        import peft_ext  # noqa: F401  (the installed package, cached for every test)
    except ImportError as error:
        raise ImportError(
            f"peft_ext is neither built in this checkout ({ROOT}/peft_ext has no _C*.so) nor installed: "
            "run `pip install --no-build-isolation -e .` (or `make build`), or `pip install .`"
        ) from error
    finally:
        sys.path[:] = saved
