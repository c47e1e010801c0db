#!/usr/bin/env bash
# Runs the benchmarks of each concept and summarizes them (bench/summarize.py):
#   bench/run.sh [--device cpu|cuda] [--out DIR] [--no-md] [CONCEPT ...]
# CONCEPT: int8, sparse, prefetch (default: every bench/bench_<concept>.py).
# --device cpu (default) runs the benchmarks not marked cuda; cuda runs those marked
# cuda (they skip without a GPU). Writes DIR/<concept>_<device>.{json,md,png}
# (DIR default bench/results); pytest-benchmark's raw JSON goes to bench/results/raw/
# (not committed). PEFT_EXT_BENCH_QUICK=1: small shapes, a smoke run.
# Environment: PYTHON (default python3). Runs every concept even when one fails;
# the exit status is non-zero if any failed.
set -uo pipefail

cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
DEVICE=cpu
OUT_DIR=bench/results
MD=()
CONCEPTS=()
while (($#)); do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --out) OUT_DIR=$2; shift 2 ;;
    --no-md) MD=(--no-md); shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) CONCEPTS+=("$1"); shift ;;
  esac
done
case "$DEVICE" in
  cpu) MARK="not cuda" ;;
  cuda) MARK="cuda" ;;
  *) echo "--device must be cpu or cuda, got $DEVICE" >&2; exit 2 ;;
esac
if ((${#CONCEPTS[@]} == 0)); then
  for f in bench/bench_*.py; do
    CONCEPTS+=("$(basename "$f" .py | sed 's/^bench_//')")
  done
fi
RAW=bench/results/raw
mkdir -p "$RAW" "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

failed=0
for c in "${CONCEPTS[@]}"; do
  f="bench/bench_$c.py"
  if [[ ! -e "$f" ]]; then
    echo "no benchmark $f" >&2
    failed=1
    continue
  fi
  raw="$RAW/${c}_${DEVICE}.json"
  rm -f "$raw"
  echo "== $c ($DEVICE)"
  "$PY" -m pytest -q "$f" -m "$MARK" --benchmark-only --benchmark-json="$raw" -p no:cacheprovider
  rc=$?
  if ((rc == 5)); then  # nothing selected for this device
    echo "== $c ($DEVICE): no benchmarks for this device"
    continue
  fi
  ((rc == 0)) || { echo "== $c ($DEVICE): pytest exit $rc" >&2; failed=1; }
  if [[ -s "$raw" ]]; then
    "$PY" bench/summarize.py "$raw" --out "$OUT_DIR" "${MD[@]}" || failed=1
  fi
done
exit $failed
