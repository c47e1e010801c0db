#!/usr/bin/env bash
# One run on a GPU machine (see ../shared/GPU.md), from the repository root:
#   1. builds the extension in place against this machine's torch (sm_90 by default);
#   2. runs the CUDA tests (every test marked `cuda` under tests/: int8, sparse,
#      the prefetch ring, offload) and prints how many passed / failed /
#      skipped in each file, so a silent gap shows;
#   3. runs the GPU benchmarks: the `cuda`-marked cases of every
#      bench/bench_<concept>.py through bench/run.sh, which writes
#      $OUT/<concept>_cuda.json (one schema, with a "table" field) and a plot;
#   4. when compute-sanitizer exists, runs the int8 and sparse CUDA tests under
#      its memcheck and racecheck tools (last: they are slow, and must not cost
#      the benchmark figures; GPU_CHECK_SANITIZER=0 skips them);
#   5. writes the full log, gpu_check.json (step status, GPU, torch, commit,
#      date, tests per file) and the benchmark JSON under $OUT (or
#      bench/results/ when unset), and prints a short table last.
# Every step runs even when an earlier one failed (a failing test must not cost
# the benchmark figures); the exit status is non-zero if any step failed. The
# steps share a time budget (GPU_CHECK_BUDGET_S, default 540 s) so the whole
# run stays under 10 minutes. Keep what lands in $OUT to 8 files or fewer.
#
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default 9.0),
# MAX_JOBS (default 16), CUDA_HOME (found from nvcc when unset). Wheels in
# .whl/ (if present) are installed to a temporary target first, for packages
# the machine lacks (for example sentence-transformers for the MiniLM test).
set -euo pipefail

cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-bench/results}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
BUDGET="${GPU_CHECK_BUDGET_S:-540}"
START=$SECONDS
STATUS_FILE="$(mktemp)"
trap 'rm -f "$STATUS_FILE"' EXIT

say() { echo "$*" | tee -a "$LOG"; }

# run_step NAME MAX_SECONDS CMD...: runs CMD with its output in the log, within
# both MAX_SECONDS and what is left of the budget; records NAME's exit status.
run_step() {
  local name=$1 max=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START)))
  local limit=$((max < left ? max : left))
  local rc=0
  if ((limit < 10)); then
    say "== $name: skipped, time budget spent"
    echo "$name 124" >>"$STATUS_FILE"
    return 0
  fi
  say "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG" || rc=${PIPESTATUS[0]}
  say "== $name: exit $rc after $((SECONDS - START))s total"
  echo "$name $rc" >>"$STATUS_FILE"
}

if [[ -z "${CUDA_HOME:-}" ]]; then
  if [[ -x /usr/local/cuda/bin/nvcc ]]; then
    CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null 2>&1; then
    CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
  fi
fi
export CUDA_HOME="${CUDA_HOME:-}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
export PEFT_EXT_CUDA=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

say "== gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse HEAD 2>/dev/null || echo unknown)"
{ nvidia-smi -L || true; "$PY" --version; "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())' || true; "${CUDA_HOME:-/nonexistent}/bin/nvcc" --version | tail -n 2 || true; echo "CUDA_HOME=$CUDA_HOME"; } 2>&1 | tee -a "$LOG"

if compgen -G ".whl/*.whl" >/dev/null; then
  run_step wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_check_site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site"
fi

run_step build 300 "$PY" setup.py build_ext --inplace
run_step info 30 "$PY" -m peft_ext info
# Without this the CUDA tests would all skip and the step would still pass.
run_step cuda_ready 30 "$PY" -c 'import torch; from peft_ext import ops
assert torch.cuda.is_available(), "torch sees no GPU"
assert ops.build_info().get("cuda") == "1", "extension built without CUDA: %s" % ops.build_info()
print("CUDA kernels built for", ops.build_info()["cuda_archs"], "on", torch.cuda.get_device_name(0))'
JUNIT="$(mktemp --suffix=.xml)"
trap 'rm -f "$STATUS_FILE" "$JUNIT"' EXIT
run_step tests 240 "$PY" -m pytest -q -ra -m cuda tests -p no:cacheprovider --junitxml="$JUNIT"
# Tests per file and outcome: a file whose CUDA tests all skipped, or that has
# none, shows here (and in gpu_check.json) instead of passing silently.
"$PY" - "$JUNIT" "$OUT_DIR/cuda_tests_per_file.json" <<'PYEOF' 2>&1 | tee -a "$LOG" || true
import collections, glob, json, os, sys
import xml.etree.ElementTree as ET

counts = collections.defaultdict(collections.Counter)
try:
    for case in ET.parse(sys.argv[1]).iter("testcase"):
        name = case.get("classname", "").split(".")
        path = next((p for p in name if p.startswith("test_")), "?") + ".py"
        kind = "passed"
        for child in case:
            if child.tag in ("skipped", "failure", "error"):
                kind = {"failure": "failed", "error": "errors"}.get(child.tag, "skipped")
        counts[path][kind] += 1
except (OSError, ET.ParseError) as exc:
    print("no test report:", exc)
for path in sorted(os.path.basename(p) for p in glob.glob("tests/test_*.py")):
    counts.setdefault(path, collections.Counter())
print("CUDA tests per file".ljust(28), "passed failed errors skipped")
for path, c in sorted(counts.items()):
    flag = "" if c["passed"] else "   <- none ran"
    print(path.ljust(28), str(c["passed"]).rjust(6), str(c["failed"]).rjust(6),
          str(c["errors"]).rjust(6), str(c["skipped"]).rjust(7), flag)
json.dump({k: dict(v) for k, v in counts.items()}, open(sys.argv[2], "w"), indent=1)
PYEOF

# The GPU benchmarks: every bench/bench_<concept>.py's `cuda`-marked cases on the
# one harness, summarized into $OUT/<concept>_cuda.json (+ .md table, .png plot).
run_step bench_cuda 300 env PYTHON="$PY" bash bench/run.sh --device cuda --out "$OUT_DIR" --no-md

# compute-sanitizer over the kernel tests (memory errors, shared-memory races).
SANITIZER="${CUDA_HOME:+$CUDA_HOME/bin/}compute-sanitizer"
[[ -x "$SANITIZER" ]] || SANITIZER="$(command -v compute-sanitizer || true)"
if [[ "${GPU_CHECK_SANITIZER:-1}" != 0 && -n "$SANITIZER" && -x "$SANITIZER" ]]; then
  for tool in memcheck racecheck; do
    run_step "sanitizer_$tool" 150 "$SANITIZER" --tool "$tool" --error-exitcode 1 --print-limit 20 \
      "$PY" -m pytest -q -x -m "cuda and not slow" tests/test_int8.py tests/test_sparse.py \
      -p no:cacheprovider
  done
else
  say "== compute-sanitizer: not run (${SANITIZER:-not found}, GPU_CHECK_SANITIZER=${GPU_CHECK_SANITIZER:-1})"
fi

# Status JSON and the short table: last in the output.
"$PY" - "$STATUS_FILE" "$OUT_DIR" <<'EOF' 2>&1 | tee -a "$LOG"
import datetime, glob, json, os, subprocess, sys

status_file, out_dir = sys.argv[1], sys.argv[2]
steps = dict(line.split() for line in open(status_file) if line.strip())
steps = {k: int(v) for k, v in steps.items()}
try:
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    torch_version = torch.__version__
except Exception as exc:  # the summary must be written whatever broke
    gpu, torch_version = f"unknown ({exc})", "unknown"
try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:
    commit = "unknown"
try:
    tests_per_file = json.load(open(os.path.join(out_dir, "cuda_tests_per_file.json")))
except (OSError, ValueError):
    tests_per_file = None
summary = {"gpu": gpu, "torch": torch_version, "git_commit": commit or "unknown",
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "steps": steps, "ok": all(rc == 0 for rc in steps.values()),
           "cuda_tests_per_file": tests_per_file}
with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
    json.dump(summary, f, indent=1)
print()
for path in sorted(glob.glob(os.path.join(out_dir, "*_cuda.json"))):
    try:
        table = json.load(open(path)).get("table")
    except (OSError, ValueError):
        table = None
    if table:
        print("\n".join(table) if isinstance(table, list) else table)
        print()
print(f"gpu_check on {gpu}, torch {torch_version}, commit {summary['git_commit'][:12]}")
print("step".ljust(28), "exit")
for name, rc in steps.items():
    print(name.ljust(28), rc, "" if rc == 0 else "<- FAILED" if rc != 124 else "<- TIMED OUT")
EOF

grep -qv " 0$" "$STATUS_FILE" && exit 1
exit 0
