"""Install story: the toolkit search in setup.py, the torch version check at
import, the root conftest.py that keeps `pytest tests` from importing a
half-built checkout, the GPU arch coverage report and the demo's extras hint.
The wheel and sdist builds themselves run in .ci/install_check.sh (make test)."""
import importlib.util
import os
import subprocess
import sys

import pytest

import peft_ext
from peft_ext import _library
from peft_ext.__main__ import arch_coverage, missing_for_demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_setup_py():
    path = os.path.join(ROOT, "setup.py")
    if not os.path.exists(path):
        pytest.skip("setup.py is not beside tests/ (tests copied without the source tree)")
    spec = importlib.util.spec_from_file_location("peft_ext_setup", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines the helpers, builds nothing
    return module


def _toolkit(folder, cudart=True):
    os.makedirs(folder / "bin")
    (folder / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (folder / "bin" / "nvcc").chmod(0o755)
    if cudart:
        os.makedirs(folder / "lib64")
        (folder / "lib64" / "libcudart.so.13").write_text("")
    return folder


@pytest.fixture
def setup_py(monkeypatch, tmp_path):
    module = _load_setup_py()
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(module, "SYSTEM_CUDA", str(tmp_path / "no-such-cuda"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    return module


def test_toolkit_behind_a_wrapper_script_is_found(setup_py, tmp_path, monkeypatch):
    real = _toolkit(tmp_path / "cuda-13.0")
    wrappers = tmp_path / "wrappers"
    os.makedirs(wrappers)
    (wrappers / "nvcc").write_text(f'#!/bin/sh\nexec {real}/bin/nvcc "$@"\n')
    (wrappers / "nvcc").chmod(0o755)
    monkeypatch.setenv("PATH", str(wrappers))
    home, why = setup_py.find_cuda_home()
    assert home == str(real), why


def test_system_toolkit_comes_before_path(setup_py, tmp_path, monkeypatch):
    system = _toolkit(tmp_path / "system")
    monkeypatch.setattr(setup_py, "SYSTEM_CUDA", str(system))
    other = _toolkit(tmp_path / "other")
    monkeypatch.setenv("PATH", str(other / "bin"))
    assert setup_py.find_cuda_home()[0] == str(system)


def test_folder_without_libcudart_is_refused(setup_py, tmp_path, monkeypatch):
    bare = _toolkit(tmp_path / "wrapper-only", cudart=False)
    monkeypatch.setenv("PATH", str(bare / "bin"))
    home, why = setup_py.find_cuda_home()
    assert home is None and str(bare) in why


def test_explicit_cuda_home_wins_and_is_checked(setup_py, tmp_path, monkeypatch):
    system = _toolkit(tmp_path / "system")
    monkeypatch.setattr(setup_py, "SYSTEM_CUDA", str(system))
    explicit = _toolkit(tmp_path / "explicit")
    monkeypatch.setenv("CUDA_HOME", str(explicit))
    assert setup_py.find_cuda_home()[0] == str(explicit)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nothing-here"))
    home, why = setup_py.find_cuda_home()
    assert home is None and "nothing-here" in why


def test_no_toolkit_builds_cpu_only_with_one_warning_or_fails_fast(setup_py, monkeypatch):
    if setup_py.torch.version.cuda is None:
        pytest.skip("this torch has no CUDA: a CPU-only build is the only build")
    monkeypatch.delenv("PEFT_EXT_CUDA", raising=False)
    with pytest.warns(UserWarning, match="CPU kernels only") as caught:
        assert setup_py.cuda_home_for_build() is None
    assert len(caught) == 1
    monkeypatch.setenv("PEFT_EXT_CUDA", "1")
    with pytest.raises(SystemExit, match="PEFT_EXT_CUDA=1 but no CUDA toolkit"):
        setup_py.cuda_home_for_build()
    monkeypatch.setenv("PEFT_EXT_CUDA", "yes")
    with pytest.raises(SystemExit, match="must be 0 or 1"):
        setup_py.cuda_home_for_build()
    monkeypatch.setenv("PEFT_EXT_CUDA", "0")
    assert setup_py.cuda_home_for_build() is None


def test_default_archs_embed_ptx_for_the_newest():
    archs = _load_setup_py().DEFAULT_CUDA_ARCHS
    assert archs.split(";")[-1].endswith("+PTX")


@pytest.mark.parametrize("archs, capability, expected", [
    ("8.0,9.0+PTX", (8, 0), "sm_80 machine code"),
    ("8.0,9.0+PTX", (8, 6), "sm_80 machine code"),
    ("8.0,9.0+PTX", (9, 0), "sm_90 machine code"),
    ("8.0,9.0+PTX", (10, 0), "PTX of sm_90"),
    ("8.0,9.0+PTX", (12, 0), "PTX of sm_90"),
    ("8.0,9.0", (10, 0), "not covered"),
    ("8.0;9.0", (7, 5), "not covered"),
    ("9.0", (8, 9), "not covered"),
])
def test_arch_coverage(archs, capability, expected):
    assert arch_coverage(archs, capability).startswith(expected)


def test_torch_version_check():
    _library.check_torch("2.14.1", "2.14.0+cu130")
    with pytest.raises(ImportError, match=r"built against torch 2\.13\.0 but torch 2\.14\.1"):
        _library.check_torch("2.13.0", "2.14.1")
    with pytest.raises(ImportError, match="Rebuild"):
        _library.check_torch("2.14.1", "3.0.0")


def test_build_facts_match_the_running_torch():
    import torch

    if _library._build is None:
        pytest.skip("library copied without peft_ext/_build.py")
    assert _library._build.TORCH_VERSION == torch.__version__.split("+")[0]


def test_demo_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    assert ("transformers", "demo") in missing_for_demo()
    with pytest.raises(SystemExit, match=r"peft_ext\[demo\]"):
        from peft_ext.__main__ import main

        main(["demo"])


def test_installed_package_is_tested_when_asked():
    """.ci/install_check.sh runs this file from a checkout copy without _C*.so."""
    if not os.environ.get("PEFT_EXT_EXPECT_INSTALLED"):
        pytest.skip("run by .ci/install_check.sh")
    assert not os.path.abspath(peft_ext.__file__).startswith(ROOT + os.sep), peft_ext.__file__


def _fake_package(folder, where, built):
    os.makedirs(folder / "peft_ext")
    (folder / "peft_ext" / "__init__.py").write_text(
        f"WHERE = {where!r}\n" + ("" if built else "from . import _C\n"))
    if built:
        (folder / "peft_ext" / "_C.abi3.so").write_text("")


@pytest.mark.parametrize("checkout_built", [False, True])
def test_root_conftest_picks_the_built_package(tmp_path, checkout_built):
    """A checkout without a compiled library tests the installed package; a
    built (editable) checkout tests itself. Fake packages stand in for both."""
    site, checkout = tmp_path / "site", tmp_path / "checkout"
    _fake_package(site, "installed", built=True)
    _fake_package(checkout, "checkout", built=checkout_built)
    with open(os.path.join(ROOT, "conftest.py")) as f:
        (checkout / "conftest.py").write_text(f.read())
    (checkout / "pyproject.toml").write_text("[tool.pytest.ini_options]\n")  # rootdir: loads conftest.py
    os.makedirs(checkout / "tests")
    expected = "checkout" if checkout_built else "installed"
    (checkout / "tests" / "test_where.py").write_text(
        f"import peft_ext\n\ndef test_where():\n    assert peft_ext.WHERE == {expected!r}\n")
    env = dict(os.environ, PYTHONPATH=str(site))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                            cwd=checkout, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
