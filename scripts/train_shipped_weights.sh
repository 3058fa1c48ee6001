#!/usr/bin/env bash
# Reproduces every file in weights/: phantom training set -> cache -> 5 folds x 2 architectures (demo
# preset) -> weights/*.pt + manifest.json. Resumable: a finished model is skipped, a model in progress
# continues from its last checkpoint. Works on CPU and GPU (--device auto).
#
#   WORK=runs/shipped scripts/train_shipped_weights.sh            # defaults below
#   EPOCHS_BIFPN=200 EPOCHS_UNETPP=200 scripts/train_shipped_weights.sh   # on a GPU machine
#
# The defaults are what the shipped weights were trained with on 2 CPU cores: 50 BiFPN and 30 UNet++
# epochs, UNet++ in bfloat16 autocast on CPU (1.4x faster there; the BiFPN step gains nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-runs/shipped}
CASES=${CASES:-60}
DATA_SEED=${DATA_SEED:-20201}
EPOCHS_BIFPN=${EPOCHS_BIFPN:-50}
EPOCHS_UNETPP=${EPOCHS_UNETPP:-30}
PRECISION_BIFPN=${PRECISION_BIFPN:-auto}
PRECISION_UNETPP=${PRECISION_UNETPP:-bf16}
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

# All BiFPN folds first: on a CPU they cost a quarter of a UNet++ fold, and a complete 5-fold
# ensemble of one architecture is usable while the other is still training.
models=()
for arch in bifpn unetpp; do for fold in 0 1 2 3 4; do models+=("$arch:$fold"); done; done
start=$(date +%s)
done_count=0
trained=0
for item in "${models[@]}"; do
  arch=${item%%:*}
  fold=${item##*:}
  epochs=$EPOCHS_BIFPN
  precision=$PRECISION_BIFPN
  [ "$arch" = unetpp ] && epochs=$EPOCHS_UNETPP && precision=$PRECISION_UNETPP
  run="$WORK/runs/$arch-fold$fold"
  # Finished when weights/ already ships it with a matching checksum (a fresh clone resumes from
  # the committed weights), or when this machine's run finished and its best.pt is intact.
  if python3 - "$WEIGHTS" "${arch}_fold$fold" "$run" <<'PY'
import hashlib, json, sys
from pathlib import Path
weights, name, run = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()
try:
    entries = {e["name"]: e for e in json.loads((weights / "manifest.json").read_text())["models"]}
    if name in entries and sha(weights / entries[name]["file"]) == entries[name]["sha256"]:
        sys.exit(0)
except (OSError, ValueError, KeyError):
    pass
done = run / "done"
sys.exit(0 if done.is_file() and sha(run / "best.pt") == done.read_text().split()[0] else 1)
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
    --epochs "$epochs" --workers "$WORKERS" --val-every "$VAL_EVERY" --device auto --precision "$precision" \
    "${resume[@]}"
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
