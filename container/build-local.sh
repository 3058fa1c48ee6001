#!/usr/bin/env bash
# Build the brats-cls image from ../Dockerfile on a machine that can pull no image and whose builds
# cannot reach the package index:
#   1. a base image with Debian bookworm's Python 3.11, made with debootstrap + `docker import`
#      (reused when the tag exists; BASE_TAG overrides it);
#   2. a wheelhouse filled on the host with `pip download` (CPU torch: found through the pip
#      config's find-links, else from download.pytorch.org; Linux x86_64, CPython 3.11);
#   3. `docker build --build-arg BASE_IMAGE=... --build-arg PIP_OFFLINE=1`.
# Usage: container/build-local.sh [TAG]     (default TAG: brats-cls:local). Needs root for debootstrap.
# Environment: BASE_TAG, DEBIAN_MIRROR, TORCH_SPEC (torch==2.13.0+cpu).
set -euo pipefail

tag=${1:-brats-cls:local}
base_tag=${BASE_TAG:-brats-cls-base:bookworm-py311}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
torch_spec=${TORCH_SPEC:-torch==2.13.0+cpu}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
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
mkdir -p "$wheelhouse"
platforms=()
for platform in manylinux_2_36 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 \
    manylinux2010 manylinux1 linux; do
    platforms+=(--platform "${platform}_x86_64")
done
download() {
    "$python" -m pip download --quiet --disable-pip-version-check --dest "$wheelhouse" --only-binary=:all: \
        "${platforms[@]}" --implementation cp --python-version 3.11 "$@" "$torch_spec" -r "$repo/requirements.txt"
}
if ! download 2>"$wheelhouse.log"; then
    echo "no $torch_spec through the pip config; trying download.pytorch.org/whl/cpu" >&2
    download --extra-index-url https://download.pytorch.org/whl/cpu 2>"$wheelhouse.log" || {
        cat "$wheelhouse.log" >&2
        exit 1
    }
fi
rm -f "$wheelhouse.log"
echo "wheelhouse filled in $(($(seconds) - start)) s ($(du -sh "$wheelhouse" | cut -f1))"

# The shipped weights are copied into the image; a checkout without them still builds.
[[ -d $repo/weights ]] || { echo "warning: no weights/ folder: the image ships none" >&2; mkdir "$repo/weights"; }

start=$(seconds)
build_log=$(mktemp /tmp/brats-cls-build.XXXXXX.log)
docker build --tag "$tag" \
    --build-arg BASE_IMAGE="$base_tag" --build-arg PIP_OFFLINE=1 --build-arg TORCH_SPEC="$torch_spec" \
    "$repo" >"$build_log" 2>&1 || {
    tail -40 "$build_log" >&2
    echo "error: docker build failed (log: $build_log)" >&2
    exit 1
}
rm -f "$build_log"
echo "image $tag built in $(($(seconds) - start)) s ($(docker image inspect --format '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1 / 1e6}'))"
