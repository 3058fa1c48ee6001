# Sourced by the bench scripts: run from the repository root, results into $OUT (default bench/results),
# this checkout's src/ importable, $PYTHON (default python3).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR="${OUT:-bench/results}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python3}"
