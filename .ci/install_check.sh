#!/bin/sh
# Builds the sdist of this checkout, the wheel from that sdist (so a file
# missing from MANIFEST.in fails here), installs the wheel into a fresh venv
# and imports it; then runs tests/test_install.py from a copy of the checkout
# without a compiled library, as a user does after `pip install .`.
# CPU-only (PEFT_EXT_CUDA=0) to keep CI time in check.
# Usage: .ci/install_check.sh [python] [torch spec] [venv to borrow torch from]
# With a third argument (make test passes its .venv), the fresh venv sees that
# venv's packages through a .pth file instead of downloading torch (~3 GB)
# again; peft_ext itself is still only the wheel built here (the borrowed
# venv's editable install is not activated: its finder runs only from a .pth
# in a site dir).
set -eu
PYTHON=${1:-python3}
TORCH_SPEC=${2:-torch==2.14.1}
BORROW=${3:-}
root=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d /tmp/peft_ext_install.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
export PEFT_EXT_CUDA=0 HF_HUB_OFFLINE=1
t0=$(date +%s)
"$PYTHON" -m venv "$tmp/venv"
py="$tmp/venv/bin/python"
deps='ninja setuptools>=77.0.3 wheel build tqdm pytest numpy hypothesis'
if [ -n "$BORROW" ]; then
  site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$BORROW/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$site/borrowed.pth"
  # A fresh venv of Python <= 3.11 carries its own setuptools (65.5), which
  # sits before the .pth entry on sys.path and fails the build's
  # setuptools>=70.1 requirement (torch itself wants >=77.0.3): drop it so the
  # borrowed venv's setuptools is the one found.
  "$py" -m pip uninstall -q -y setuptools 2>/dev/null || true
  # from $tmp: a build/ folder in the current directory would pass for the `build` package
  (cd "$tmp" && "$py" -c "
import torch, setuptools, wheel, build.__main__, ninja, pytest, numpy, hypothesis
assert int(setuptools.__version__.split('.')[0]) >= 77, setuptools.__version__
" 2>/dev/null) ||
    "$py" -m pip install -q $deps
else
  "$py" -m pip install -q "$TORCH_SPEC" $deps
fi
t1=$(date +%s)
# The sdist from a copy, so that the build leaves nothing in the checkout.
mkdir "$tmp/src"
(cd "$root" && tar --exclude=./.venv --exclude=./build --exclude=./cmake-build --exclude=./dist --exclude='*.so' \
  --exclude=./.git --exclude='*.egg-info' -cf - .) | (cd "$tmp/src" && tar -xf -)
(cd "$tmp/src" && "$py" -m build -q --sdist --no-isolation --outdir "$tmp/dist" >/dev/null)
sdist=$(ls "$tmp"/dist/peft_ext-*.tar.gz)
for f in csrc/cpu/cpu_features.h csrc/linear_common.h csrc/cuda/ptx.cuh csrc/test/test_int8.cpp; do
  tar -tzf "$sdist" | grep -q "/$f\$" || { echo "install_check: $f missing from the sdist" >&2; exit 1; }
done
"$py" -m pip wheel -q --no-build-isolation --no-deps "$sdist" -w "$tmp/wheels"
wheel=$(ls "$tmp"/wheels/peft_ext-*.whl)
case "$wheel" in *-cp310-abi3-*) ;; *) echo "install_check: $wheel is not an abi3 wheel" >&2; exit 1 ;; esac
t2=$(date +%s)
"$py" -m pip install -q --no-deps --ignore-installed "$wheel"
(cd "$tmp" && "$py" -m peft_ext info && "$py" -c '
import torch, peft_ext
lin = torch.nn.Linear(64, 32)
q = peft_ext.nn.Int8Linear.from_linear(lin)
x = torch.randn(5, 64)
err = (q(x) - lin(x)).abs().max().item()
assert err < 0.05, err
print("install_check: wheel imports and runs, max error", round(err, 5))
')
# A checkout without _C*.so: the root conftest.py must pick the installed package.
mkdir "$tmp/checkout"
cp -r "$tmp/src/peft_ext" "$tmp/src/tests" "$tmp/src/conftest.py" "$tmp/src/pyproject.toml" "$tmp/checkout/"
(cd "$tmp/checkout" && PEFT_EXT_EXPECT_INSTALLED=1 "$py" -m pytest -q -p no:cacheprovider tests/test_install.py)
t3=$(date +%s)
echo "install_check: venv+deps $((t1 - t0)) s, sdist+wheel build $((t2 - t1)) s, install+import+tests $((t3 - t2)) s"
