#!/usr/bin/env bash
# Build the brats-cls image from ../Dockerfile on a machine that can pull no image and whose builds
# cannot reach the package index:
#   1. a base image with Debian bookworm's Python 3.11, made with debootstrap + `docker import`
#      (reused when the tag exists; BASE_TAG overrides it);
#   2. a wheelhouse filled on the host with `pip download` (Linux x86_64, CPython 3.11), kept in a cache
#      outside the repository and linked into container/wheelhouse/ for the build:
#      CPU image: torch==2.13.0+cpu, found through the pip config's find-links, else on
#      download.pytorch.org; --cuda: torch==2.13.0 from PyPI, the CUDA 13.0 build, with its nvidia-* and
#      cuda-* wheels (2.7 GB), fetched by an isolated pip call that names the index, because the local
#      CPU wheel (pip config find-links) also satisfies torch==2.13.0;
#   3. `docker build --build-arg BASE_IMAGE=... --build-arg PIP_OFFLINE=1`.
# Usage: container/build-local.sh [--cuda] [TAG]   (TAG: brats-cls:local, with --cuda brats-cls:local-cuda)
# Needs root for debootstrap. Environment: BASE_TAG, DEBIAN_MIRROR, TORCH_SPEC, WHEEL_CACHE
# (~/.cache/brats-cls), PIP_INDEX (https://pypi.org/simple), PIP_CA_FILE (the machine's CA bundle).
set -euo pipefail

cuda=0
if [[ ${1:-} == --cuda ]]; then
    cuda=1
    shift
fi
if ((cuda)); then
    tag=${1:-brats-cls:local-cuda}
    torch_spec=${TORCH_SPEC:-torch==2.13.0}
    flavour=cuda
else
    tag=${1:-brats-cls:local}
    torch_spec=${TORCH_SPEC:-torch==2.13.0+cpu}
    flavour=cpu
fi
base_tag=${BASE_TAG:-brats-cls-base:bookworm-py311}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
nilearn_spec=nilearn==0.14.1  # the MNI template's wheel; keep in step with NILEARN_SPEC in the Dockerfile
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/brats-cls}/wheels-$flavour
wheelhouse=$repo/container/wheelhouse
python=${PYTHON:-python3}

seconds() { date +%s; }

if docker image inspect "$base_tag" >/dev/null 2>&1; then
    echo "base image $base_tag exists: reused"
else
    command -v debootstrap >/dev/null || { echo "error: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
    start=$(seconds)
    rootfs=$(mktemp -d /tmp/brats-cls-rootfs.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    # python3-distutils is named because debootstrap does not resolve python3.11-venv's virtual dependency.
    # minbase holds every essential package, util-linux (setpriv, used by entrypoint.sh) among them.
    debootstrap --variant=minbase --include=python3,python3-venv,python3-distutils \
        bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || {
        tail -20 "$rootfs.log" >&2
        echo "error: debootstrap failed (log: $rootfs.log)" >&2
        exit 1
    }
    rm -rf "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/{doc,man,info,locale}
    tar -C "$rootfs" -c . | docker import -c 'CMD ["/bin/bash"]' - "$base_tag" >/dev/null
    rm -rf "$rootfs" "$rootfs.log"
    trap - EXIT
    echo "base image $base_tag made in $(($(seconds) - start)) s"
fi

start=$(seconds)
mkdir -p "$cache"
# pip matches each --platform tag exactly: name every manylinux_2_N (nvidia-nccl-cu13 2.29.7 is
# manylinux_2_18, torch manylinux_2_28, ...) and the legacy aliases.
platforms=()
for n in $(seq 5 39); do
    platforms+=(--platform "manylinux_2_${n}_x86_64")
done
for platform in manylinux2014 manylinux2010 manylinux1 linux; do
    platforms+=(--platform "${platform}_x86_64")
done
pip_download() {
    "$python" -m pip download --quiet --disable-pip-version-check --dest "$cache" --only-binary=:all: \
        --implementation cp --python-version 3.11 "$@"
}
log=$(mktemp /tmp/brats-cls-wheels.XXXXXX.log)
if ((cuda)); then
    index=${PIP_INDEX:-https://pypi.org/simple}
    ca=${PIP_CA_FILE:-$(for f in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt; do [[ -f $f ]] && echo "$f" && break; done; true)}
    isolated=(--isolated --index-url "$index" ${ca:+--cert "$ca"})
    if ! { pip_download "${isolated[@]}" "${platforms[@]}" "$torch_spec" -r "$repo/requirements.txt" &&
        pip_download "${isolated[@]}" --no-deps "$nilearn_spec"; } 2>"$log"; then
        cat "$log" >&2
        echo "error: could not download the CUDA wheels from $index" >&2
        exit 1
    fi
else
    download() {
        pip_download "${platforms[@]}" "$@" "$torch_spec" -r "$repo/requirements.txt" &&
            pip_download --no-deps "$@" "$nilearn_spec"
    }
    if ! download 2>"$log"; then
        echo "no $torch_spec through the pip config; trying download.pytorch.org/whl/cpu" >&2
        download --extra-index-url https://download.pytorch.org/whl/cpu 2>"$log" || {
            cat "$log" >&2
            exit 1
        }
    fi
fi
rm -f "$log"
# The build context gets exactly this flavour's wheels (hard links when the cache shares the file system).
rm -rf "$wheelhouse"
mkdir -p "$wheelhouse"
cp -al "$cache"/. "$wheelhouse"/ 2>/dev/null || cp -a "$cache"/. "$wheelhouse"/
echo "wheelhouse ($flavour) filled in $(($(seconds) - start)) s ($(du -sh "$cache" | cut -f1))"

# The shipped weights are copied into the image; a checkout without them still builds.
[[ -d $repo/weights ]] || { echo "warning: no weights/ folder: the image ships none" >&2; mkdir "$repo/weights"; }

start=$(seconds)
build_log=$(mktemp /tmp/brats-cls-build.XXXXXX.log)
docker build --tag "$tag" \
    --build-arg BASE_IMAGE="$base_tag" --build-arg PIP_OFFLINE=1 --build-arg TORCH_SPEC="$torch_spec" \
    --build-arg NILEARN_SPEC="$nilearn_spec" \
    "$repo" >"$build_log" 2>&1 || {
    tail -40 "$build_log" >&2
    echo "error: docker build failed (log: $build_log)" >&2
    exit 1
}
rm -f "$build_log"
echo "image $tag built in $(($(seconds) - start)) s ($(docker image inspect --format '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1 / 1e6}'))"
