# brats-cls inference image for the BraTS platforms (Synapse, MedPerf, the BraTS orchestrator).
# Build, tag, push and the platforms' `docker run` lines: container/README.md.
#
# BASE_IMAGE: torch's CUDA wheels on PyPI bring every CUDA user-space library they need (cuDNN, cuBLAS,
# NCCL, ... as nvidia-* wheels), so a -runtime or -cudnn-runtime base would only add gigabytes of
# duplicate libraries. The -base image suffices: it sets the NVIDIA container variables and the
# NVIDIA_REQUIRE_CUDA driver check. torch==2.13.0 on PyPI is built for CUDA 13.0 (driver >= 580).
# container/build-local.sh builds this same file on a Debian base made with debootstrap (CPU torch,
# or with --cuda the same CUDA wheels). The base needs bash, coreutils and util-linux's setpriv
# (both Debian and Ubuntu have them: util-linux is an essential package).
ARG BASE_IMAGE=nvidia/cuda:13.0.0-base-ubuntu22.04

# Python 3.11 from the distribution when the base lacks it (Ubuntu 22.04 has it in universe).
FROM ${BASE_IMAGE} AS python
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN if ! command -v python3.11 >/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3.11 \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin brats

# Dependencies in a virtual environment: this layer changes only with requirements.txt. C++ headers,
# torch's C++ test binaries and the packages' own test suites are removed (about 250 MB): nothing
# imports them at run time.
FROM python AS deps
# TORCH_SPEC: the torch build, e.g. torch==2.13.0+cpu. TORCH_INDEX_URL: an extra index for it, e.g.
# https://download.pytorch.org/whl/cu126 for older drivers. PIP_OFFLINE=1: install only from the
# wheels in container/wheelhouse/ (filled by container/build-local.sh), never from an index.
# NILEARN_SPEC: the wheel whose MNI ICBM152 2009a template (three files, 5 MB) `synth` and `bench`
# build phantoms on; only those files are kept, in /opt/brats-cls/template, not nilearn itself.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=
ARG PIP_OFFLINE=0
ARG NILEARN_SPEC=nilearn==0.14.1
# hadolint ignore=DL3008
RUN if ! python3.11 -c 'import ensurepip' 2>/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3.11-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3.11 -m venv /opt/venv
# The glob makes the wheelhouse optional: requirements.txt always matches.
COPY requirements.txt container/wheelhous[e] /build/
RUN if [ "$PIP_OFFLINE" = 1 ]; then set -- --no-index --find-links /build; \
    elif [ -n "$TORCH_INDEX_URL" ]; then set -- --extra-index-url "$TORCH_INDEX_URL"; \
    else set --; fi \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check "$@" "$TORCH_SPEC" -r /build/requirements.txt \
    && /opt/venv/bin/pip download --no-cache-dir --disable-pip-version-check --no-deps --only-binary=:all: "$@" \
        --dest /tmp/nilearn "$NILEARN_SPEC" \
    && mkdir -p /opt/brats-cls/template \
    && /opt/venv/bin/python -c "import sys, zipfile, pathlib; \
wheel = zipfile.ZipFile(next(pathlib.Path('/tmp/nilearn').glob('nilearn-*.whl'))); \
names = [f'mni_icbm152_{m}_tal_nlin_sym_09a_converted.nii.gz' for m in ('t1', 'gm', 'wm')]; \
[pathlib.Path('/opt/brats-cls/template', n).write_bytes(wheel.read('nilearn/datasets/data/' + n)) for n in names]" \
    && rm -rf /build /tmp/nilearn \
    && site=/opt/venv/lib/python3.11/site-packages \
    && rm -rf "$site"/torch/include "$site"/torch/test "$site"/torch/share/cmake \
    && find "$site" -depth -type d -name tests -path '*/site-packages/*/*' -exec rm -rf {} +

# The package itself, installed beside the dependencies under a separate prefix.
FROM deps AS package
COPY pyproject.toml requirements.txt README.m[d] /src/
COPY src/ /src/src/
RUN /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps --no-build-isolation \
        --prefix /opt/package /src

FROM python
LABEL org.opencontainers.image.title="brats-cls" \
      org.opencontainers.image.description="BraTS glioma segmentation with an additional slice classification network"
COPY --from=deps /opt/venv /opt/venv
COPY --from=deps /opt/brats-cls/template/ /opt/brats-cls/template/
COPY weights/ /opt/brats-cls/weights/
COPY --from=package /opt/package/ /opt/venv/
COPY entrypoint.sh /opt/brats-cls/entrypoint.sh
# Everything a library may write goes to /tmp, so the image runs as any uid with a read-only root.
# No PYTHONPYCACHEPREFIX: Python would then also *read* bytecode only from there, ignoring the
# bytecode compiled at install time, and compile torch on every start.
# BRATS_CLS_DROP_ROOT / BRATS_CLS_RUN_AS: see USER below.
ENV PATH=/opt/venv/bin:$PATH \
    BRATS_CLS_WEIGHTS=/opt/brats-cls/weights \
    BRATS_CLS_TEMPLATE_DIR=/opt/brats-cls/template \
    BRATS_CLS_DROP_ROOT=1 \
    BRATS_CLS_RUN_AS=10001:10001 \
    INPUT_DIR=/input \
    OUTPUT_DIR=/output \
    HOME=/tmp \
    USER=brats \
    LOGNAME=brats \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    MPLCONFIGDIR=/tmp/matplotlib \
    MPLBACKEND=Agg \
    TORCH_HOME=/tmp/torch \
    TRITON_CACHE_DIR=/tmp/triton \
    CUDA_CACHE_PATH=/tmp/nv-compute-cache \
    NILEARN_DATA=/tmp/nilearn_data \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# Root only to launch: Synapse (2021 run_docker.py, the 2025 template) passes no -u and mounts an output
# folder owned by root or by a host user, mode 0755. entrypoint.sh then runs brats-cls as that folder's
# owner (setpriv), or as uid 10001 while a root `python -m brats_cls.container publish` moves each finished
# mask into a root-owned folder; it never runs brats-cls as root. With -u uid:gid (MedPerf, the BraTS
# orchestrator) it runs as that user.
# hadolint ignore=DL3002
USER 0:0
WORKDIR /tmp
ENTRYPOINT ["/bin/bash", "/opt/brats-cls/entrypoint.sh"]
