#!/usr/bin/env bash
# Reproduces every file in weights/: phantom training set -> cache -> 5 folds x 2 architectures (demo
# preset) -> weights/*.pt + manifest.json. Resumable: a finished model is skipped, a model in progress
# continues from its last checkpoint. Works on CPU and GPU (--device auto).
#
#   WORK=runs/shipped scripts/train_shipped_weights.sh            # defaults below
#   EPOCHS_BIFPN=200 EPOCHS_UNETPP=200 scripts/train_shipped_weights.sh   # on a GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-runs/shipped}
CASES=${CASES:-60}
DATA_SEED=${DATA_SEED:-20201}
EPOCHS_BIFPN=${EPOCHS_BIFPN:-20}
EPOCHS_UNETPP=${EPOCHS_UNETPP:-10}
SIZE=${SIZE:-demo}
WORKERS=${WORKERS:-0}
VAL_EVERY=${VAL_EVERY:-3}
WEIGHTS=${WEIGHTS:-weights}
mkdir -p "$WORK"

if [ ! -f "$WORK/phantom-train/.complete" ]; then
  echo "== synthesising $CASES training phantoms (seed $DATA_SEED)"
  brats-cls synth --out "$WORK/phantom-train" --cases "$CASES" --seed "$DATA_SEED" --naming 2021 --healthy-fraction 0.1
  touch "$WORK/phantom-train/.complete"
fi
echo "== preprocessing (intact cached cases are skipped)"
brats-cls preprocess --data "$WORK/phantom-train" --cache "$WORK/cache"

models=()
for fold in 0 1 2 3 4; do models+=("bifpn:$fold" "unetpp:$fold"); done
start=$(date +%s)
done_count=0
trained=0
for item in "${models[@]}"; do
  arch=${item%%:*}
  fold=${item##*:}
  epochs=$EPOCHS_BIFPN
  [ "$arch" = unetpp ] && epochs=$EPOCHS_UNETPP
  run="$WORK/runs/$arch-fold$fold"
  if [ -f "$run/done" ] && python3 - "$run" <<'PY'
import hashlib, sys
from pathlib import Path
run = Path(sys.argv[1])
expected = (run / "done").read_text().split()[0]
sys.exit(0 if hashlib.sha256((run / "best.pt").read_bytes()).hexdigest() == expected else 1)
PY
  then
    echo "== $arch fold $fold: finished earlier, checksum verified, skipped"
    done_count=$((done_count + 1))
    continue
  fi
  resume=()
  [ -f "$run/last.pt" ] && resume=(--resume) && echo "== $arch fold $fold: resuming from its last checkpoint"
  echo "== $arch fold $fold: training $epochs epochs ($SIZE)"
  brats-cls train --cache "$WORK/cache" --out "$WORK/runs" --arch "$arch" --fold "$fold" --size "$SIZE" \
    --epochs "$epochs" --workers "$WORKERS" --val-every "$VAL_EVERY" --device auto "${resume[@]}"
  sha256sum "$run/best.pt" > "$run/done"
  done_count=$((done_count + 1))
  trained=$((trained + 1))
  python3 scripts/make_manifest.py "$WORK/runs" "$WEIGHTS" --cases "$CASES" --data-seed "$DATA_SEED"
  elapsed=$(( $(date +%s) - start ))
  left=$(( ${#models[@]} - done_count ))
  echo "== $done_count/${#models[@]} models done; ${elapsed}s this sitting; about $(( elapsed / trained * left / 60 )) min left"
done
python3 scripts/make_manifest.py "$WORK/runs" "$WEIGHTS" --cases "$CASES" --data-seed "$DATA_SEED"
echo "== all ${#models[@]} models in $WEIGHTS"
