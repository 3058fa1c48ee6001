#!/usr/bin/env bash
# Check the CUDA image (container/build-local.sh --cuda) without a GPU:
#   1. torch's version and CUDA version;
#   2. the cuDNN version: torch.backends.cudnn.version() where it answers without a GPU, and the
#      version of the nvidia-cudnn wheel and of the library file it installs;
#   3. NCCL: the libnccl.so.* of the nvidia-nccl wheel loads (ctypes.CDLL) and ncclGetVersion answers;
#   4. `brats-cls infer --device cpu` on one full-size phantom case (two shipped models, BiFPN and UNet++
#      of fold 0, no TTA: MODELS overrides) writes the same mask bytes in the CUDA image as in the CPU one.
# Usage: container/check-cuda-image.sh [CUDA_IMAGE] [CPU_IMAGE]   (brats-cls:local-cuda, brats-cls:local)
# Runs the images as Synapse does (no -u, --network none); needs root only to remove the work folder.
set -euo pipefail

cuda_image=${1:-brats-cls:local-cuda}
cpu_image=${2:-brats-cls:local}
work=$(mktemp -d /tmp/brats-cls-check-cuda.XXXXXX)
trap 'rm -rf "$work"' EXIT
failed=0

size() { docker image inspect --format '{{.Size}}' "$1" | awk '{printf "%.2f GB", $1 / 1e9}'; }
echo "== images: $cuda_image $(size "$cuda_image"), $cpu_image $(size "$cpu_image")"

echo "== torch, CUDA, cuDNN and NCCL inside $cuda_image"
docker run --rm -i --network none --entrypoint python3 "$cuda_image" - <<'PY' || failed=1
import ctypes, glob, importlib.metadata as metadata, os, sys
import torch

ok = True
print(f"torch {torch.__version__}, built for CUDA {torch.version.cuda}; GPU visible: {torch.cuda.is_available()}")
ok &= torch.version.cuda is not None
try:
    print(f"torch.backends.cudnn.version(): {torch.backends.cudnn.version()}")
except Exception as error:  # some builds need a GPU for this
    print(f"torch.backends.cudnn.version(): unavailable without a GPU ({error})")
site = os.path.dirname(os.path.dirname(torch.__file__))
wheels = sorted(d.metadata["Name"] for d in metadata.distributions() if d.metadata["Name"].startswith(("nvidia-", "cuda-")))
print("CUDA wheels:", ", ".join(f"{name} {metadata.version(name)}" for name in wheels))
cudnn = [name for name in wheels if name.startswith("nvidia-cudnn")]
ok &= bool(cudnn)
for name in cudnn:
    libraries = sorted(glob.glob(os.path.join(site, "nvidia", "cudnn", "lib", "libcudnn.so.*")))
    print(f"cuDNN: {name} {metadata.version(name)}; libraries: {[os.path.basename(p) for p in libraries]}")
    for path in libraries:
        try:
            library = ctypes.CDLL(path)
            library.cudnnGetVersion.restype = ctypes.c_size_t
            print(f"cudnnGetVersion() from {os.path.basename(path)}: {library.cudnnGetVersion()}")
        except OSError as error:
            print(f"cannot load {path}: {error}")
            ok = False
nccl = sorted(glob.glob(os.path.join(site, "nvidia", "nccl", "lib", "libnccl.so*")))
ok &= bool(nccl)
for path in nccl:
    try:
        library = ctypes.CDLL(path)
        code = ctypes.c_int()
        status = library.ncclGetVersion(ctypes.byref(code))
        major, rest = divmod(code.value, 10000)
        print(f"NCCL: {os.path.basename(path)} loads; ncclGetVersion -> status {status}, {code.value} "
              f"(= {major}.{rest // 100}.{rest % 100})")
        ok &= status == 0
    except OSError as error:
        print(f"NCCL: cannot load {path}: {error}")
        ok = False
try:
    print(f"torch.cuda.nccl.version(): {torch.cuda.nccl.version()}")
except Exception as error:
    print(f"torch.cuda.nccl.version(): {error}")
sys.exit(0 if ok else 1)
PY

models=${MODELS:-bifpn:0,unetpp:0}
echo "== one full-size phantom case, models $models on the CPU (no TTA), in both images"
mkdir -p "$work/cases"
# The image writes as the folder's owner, never as root: as root, hand the folder to its user 10001.
[[ $(id -u) != 0 ]] || chown 10001:10001 "$work/cases"
if ! docker run --rm --network none -v "$work/cases:/output" "$cpu_image" \
    synth --out /output/in --cases 1 --seed 11 >"$work/synth.log" 2>&1; then
    echo "(synth in $cpu_image failed: $(tail -1 "$work/synth.log"); making the case on the host)"
    python3 -m brats_cls synth --out "$work/cases/in" --cases 1 --seed 11 >/dev/null
fi
printf 'tta: false\ndevice: cpu\nmodels: %s\n' "$models" >"$work/params.yaml"
chmod -R a+rX "$work/cases" "$work/params.yaml"
for flavour in cpu cuda; do
    image=$cpu_image
    [[ $flavour == cpu ]] || image=$cuda_image
    mkdir -m 0755 "$work/$flavour"
    start=$(date +%s)
    docker run --rm --network none --read-only --tmpfs /tmp -v "$work/cases/in:/input:ro" \
        -v "$work/params.yaml:/params.yaml:ro" -v "$work/$flavour:/output" "$image" \
        infer --data_path=/input --parameters_file=/params.yaml --output_path=/output >"$work/$flavour.log" 2>&1 || {
        tail -20 "$work/$flavour.log"
        failed=1
    }
    echo "$flavour image: $(grep -ao '[0-9]* case(s) written.*' "$work/$flavour.log" | tail -1) ($(($(date +%s) - start)) s)"
done
for mask in "$work"/cpu/*.nii.gz; do
    name=${mask##*/}
    if cmp -s "$mask" "$work/cuda/$name"; then
        echo "mask $name: identical bytes ($(sha256sum <"$mask" | cut -c1-16)...)"
    else
        echo "mask $name: DIFFERENT bytes"
        failed=1
    fi
done
[[ -n $(ls "$work"/cpu/*.nii.gz 2>/dev/null) ]] || { echo "no mask written"; failed=1; }
if ((failed)); then
    echo "== check FAILED"
    exit 1
fi
echo "== check passed"
