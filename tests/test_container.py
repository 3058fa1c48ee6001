"""The Docker image, run the way the BraTS platforms run it (shared/BRATS_CONTRACT.md).

The image is ``$BRATS_CLS_IMAGE`` (default ``brats-cls:local``, which ``container/build-local.sh``
builds; ``.ci/run`` builds and exports it). Without an engine or image these tests skip, except
when ``CI`` is set: then they fail with the reason, so CI can never pass without running them.

Every inference run uses the platforms' hardening: ``--network none -u 4321:4321 --read-only
--tmpfs /tmp --cap-drop ALL`` with the input mounted read-only, so a write anywhere but the output
folder and /tmp fails the run. Models are tiny random-weight models mounted as the weights folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from click.testing import CliRunner

from brats_cls.cases import find_cases
from brats_cls.cli import main
from brats_cls.models.registry import build_model, load_model, save_model
from brats_cls.weights import write_manifest
from helpers import assert_masks_match_inputs, labels_of

pytestmark = pytest.mark.container

REPO = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("BRATS_CLS_IMAGE", "brats-cls:local")
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")
HARDENED = ["--network", "none", "-u", "4321:4321", "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL"]


def unavailable(reason: str):
    if IN_CI:
        pytest.fail(f"{reason}; CI is set, so the container tests must run", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def image() -> str:
    if shutil.which("docker") is None:
        unavailable("no docker command")
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        unavailable(f"no Docker engine: {info.stderr.strip()[:300]}")
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True, timeout=60).returncode != 0:
        unavailable(f"image {IMAGE} not found: build it with container/build-local.sh or set BRATS_CLS_IMAGE")
    return IMAGE


def docker_run(image: str, *args, mounts=(), env=None, options=HARDENED, entrypoint=None):
    """``docker run --rm`` with ``mounts`` as (host, container, mode) and ``env`` as a dict."""
    command = ["docker", "run", "--rm", *options]
    for host, target, mode in mounts:
        command += ["-v", f"{host}:{target}:{mode}"]
    for key, value in (env or {}).items():
        command += ["-e", f"{key}={value}"]
    if entrypoint:
        command += ["--entrypoint", entrypoint]
    return subprocess.run([*command, image, *map(str, args)], capture_output=True, text=True, timeout=900)


def shared(source: Path, target: Path) -> Path:
    """Copy ``source`` to ``target``, readable by any uid (the container runs as 4321)."""
    shutil.copytree(source, target)
    for path in [target, *target.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


def output_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    path.chmod(0o777)  # writable by the container's uid, as the platforms' output folders are
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """Tiny random-weight BiFPN and UNet++ with a manifest, readable by any uid."""
    folder = tmp_path_factory.mktemp("container_weights_src")
    entries = []
    for seed, arch in enumerate(("bifpn", "unetpp")):
        torch.manual_seed(100 + seed)
        save_model(build_model(arch, "tiny"), folder / f"{arch}.pt", {"fold": 0})
        entries.append({"name": arch, "file": f"{arch}.pt", "arch": arch, "fold": 0, "size": "tiny"})
    write_manifest(folder, entries)
    return shared(folder, tmp_path_factory.mktemp("container_weights") / "weights")


WEIGHTS_MOUNT = "/weights"


def weights_mount(weights: Path):
    return [(weights, WEIGHTS_MOUNT, "ro")]


@pytest.fixture(scope="module")
def synapse_2023_run(image, phantom_cases, weights, tmp_path_factory):
    """The 2025 Synapse call: case folders at /input, masks to /output, no command, default options."""
    root = tmp_path_factory.mktemp("synapse_2023")
    cases = shared(phantom_cases, root / "cases")
    out = output_folder(root / "out")
    result = docker_run(image, mounts=[(cases, "/input", "ro"), (out, "/output", "rw"), *weights_mount(weights)],
                        env={"BRATS_CLS_WEIGHTS": WEIGHTS_MOUNT})
    return cases, out, result


def test_hadolint_is_clean():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        unavailable("no hadolint: pip install -r requirements-dev.txt")
    result = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_runs_as_non_root_with_the_entrypoint_and_writable_paths_under_tmp(image):
    config = json.loads(subprocess.run(["docker", "image", "inspect", image], capture_output=True, text=True,
                                       check=True).stdout)[0]["Config"]
    assert config["Entrypoint"][-1].endswith("/entrypoint.sh")
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["BRATS_CLS_WEIGHTS"] == "/opt/brats-cls/weights"
    for key in ("HOME", "TMPDIR", "MPLCONFIGDIR", "TORCH_HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME"):
        assert env[key].startswith("/tmp"), key
    result = docker_run(image, "-u", options=[], entrypoint="id")
    assert result.returncode == 0 and result.stdout.strip() != "0", result.stdout + result.stderr


def test_synapse_2023_case_folders(synapse_2023_run):
    cases, out, result = synapse_2023_run
    assert result.returncode == 0, result.stdout + result.stderr
    assert_masks_match_inputs(out, find_cases(cases).cases, {0, 1, 2, 3})


def test_image_mask_equals_host_cli_mask(synapse_2023_run, weights, tmp_path):
    cases, out, result = synapse_2023_run
    assert result.returncode == 0, result.stdout + result.stderr
    host_out = tmp_path / "host"
    host_out.mkdir()
    host = CliRunner().invoke(main, ["infer", "--input", str(cases), "--output", str(host_out), "--weights",
                                     str(weights), "--quiet"], catch_exceptions=False)
    assert host.exit_code == 0, host.output
    for case in find_cases(cases).cases:
        np.testing.assert_array_equal(labels_of(out / case.output_name), labels_of(host_out / case.output_name))


def test_synapse_2021_one_case_lying_flat_in_input(image, phantom_cases_2021, weights, tmp_path):
    case = find_cases(phantom_cases_2021).cases[0]
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in case.paths:
        shutil.copy(path, flat / path.name)
    flat = shared(flat, tmp_path / "input")
    out = output_folder(tmp_path / "out")
    result = docker_run(image, mounts=[(flat, "/input", "ro"), (out, "/output", "rw"), *weights_mount(weights)],
                        env={"BRATS_CLS_WEIGHTS": WEIGHTS_MOUNT})
    assert result.returncode == 0, result.stdout + result.stderr
    assert_masks_match_inputs(out, [find_cases(flat).cases[0]], {0, 1, 2, 4})
    assert [p.name for p in out.iterdir()] == ["BraTS2021_00001.nii.gz"]


def test_mlcube_infer_call_with_parameters_file(image, phantom_cases, weights, tmp_path):
    cases = shared(phantom_cases, tmp_path / "data")
    params = tmp_path / "params"
    params.mkdir()
    (params / "parameters.yaml").write_text("tta: false\ndevice: cpu\nmodels: unetpp\nlabel_scheme: 2021\n")
    params = shared(params, tmp_path / "params_shared")
    out = output_folder(tmp_path / "predictions")
    mounts = [(cases, "/mlcube_io0", "ro"), (params, "/mlcube_io1", "ro"), (out, "/mlcube_io2", "rw"),
              *weights_mount(weights)]
    result = docker_run(image, "infer", "--data_path=/mlcube_io0", "--parameters_file=/mlcube_io1/parameters.yaml",
                        "--output_path=/mlcube_io2", mounts=mounts, env={"BRATS_CLS_WEIGHTS": WEIGHTS_MOUNT})
    assert result.returncode == 0, result.stdout + result.stderr
    assert_masks_match_inputs(out, find_cases(cases).cases, {0, 1, 2, 4})  # label_scheme 2021 took effect
    assert "1 model(s) x 1 flip(s)" in result.stdout  # so did models and tta


def test_mlcube_unknown_parameter_exits_2_naming_it(image, tmp_path):
    params = tmp_path / "params"
    params.mkdir()
    (params / "parameters.yaml").write_text("tta: true\nbatch: 4\n")
    params = shared(params, tmp_path / "params_shared")
    out = output_folder(tmp_path / "out")
    result = docker_run(image, "infer", "--data_path", "/mlcube_io0", "--parameters_file", "/mlcube_io1/parameters.yaml",
                        "--output_path", "/mlcube_io2", mounts=[(params, "/mlcube_io0", "ro"), (params, "/mlcube_io1", "ro"),
                                                                (out, "/mlcube_io2", "rw")])
    assert result.returncode == 2 and "'batch'" in result.stderr, result.stdout + result.stderr


def test_malformed_case_beside_a_good_one(image, phantom_cases_2021, weights, tmp_path):
    cases = shared(phantom_cases_2021, tmp_path / "cases")
    broken, good = find_cases(cases).cases
    broken.modalities["t1ce"].write_bytes(broken.modalities["t1ce"].read_bytes()[:400])  # truncated NIfTI
    params = tmp_path / "params"
    params.mkdir()
    (params / "parameters.yaml").write_text("tta: false\n")  # the slow default is run by the other tests
    params = shared(params, tmp_path / "params_shared")
    out = output_folder(tmp_path / "out")
    result = docker_run(image, "infer", "--data_path=/in", "--parameters_file=/p/parameters.yaml", "--output_path=/out",
                        mounts=[(cases, "/in", "ro"), (params, "/p", "ro"), (out, "/out", "rw"), *weights_mount(weights)],
                        env={"BRATS_CLS_WEIGHTS": WEIGHTS_MOUNT})
    assert result.returncode == 1, result.stdout + result.stderr
    assert [p.name for p in out.iterdir()] == [good.output_name]
    assert broken.case_id in result.stdout + result.stderr


def test_train_writes_a_checkpoint_into_the_mounted_output(image, phantom_cases, phantom_cases_2021, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for source in (phantom_cases, phantom_cases_2021):
        for case_dir in source.iterdir():
            shutil.copytree(case_dir, data / case_dir.name)
    data = shared(data, tmp_path / "data_shared")
    out = output_folder(tmp_path / "out")
    result = docker_run(image, "train", "--data", "/data", "--out", "/output", "--arch", "bifpn", "--size", "tiny",
                        "--fold", "0", "--epochs", "1", "--steps-per-epoch", "1", "--workers", "0", "--device", "cpu",
                        "-q", mounts=[(data, "/data", "ro"), (out, "/output", "rw")])
    assert result.returncode == 0, result.stdout + result.stderr
    run = out / "bifpn-fold0"
    assert (run / "last.pt").is_file()  # the resumable training state
    model, _ = load_model(run / "best.pt")
    assert model.config == build_model("bifpn", "tiny").config


def _sha256s(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_shipped_weights_are_in_the_image_and_used_by_default(image, phantom_cases, tmp_path):
    script = ("import hashlib, json, pathlib; f = pathlib.Path('/opt/brats-cls/weights'); print(json.dumps("
              "{p.relative_to(f).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(f.rglob('*')) if p.is_file()}))")
    result = docker_run(image, "-c", script, entrypoint="python3")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == _sha256s(REPO / "weights")
    manifest = REPO / "weights" / "manifest.json"
    if not manifest.is_file():
        return  # no shipped weights yet: the image holds exactly the (empty) weights folder
    first = json.loads(manifest.read_text())["models"][0]["name"]
    cases = shared(phantom_cases, tmp_path / "data")
    params = tmp_path / "params"
    params.mkdir()
    (params / "parameters.yaml").write_text(f"tta: false\nmodels: {first}\n")
    params = shared(params, tmp_path / "params_shared")
    out = output_folder(tmp_path / "out")
    result = docker_run(image, "infer", "--data_path=/in", "--parameters_file=/p/parameters.yaml", "--output_path=/out",
                        mounts=[(cases, "/in", "ro"), (params, "/p", "ro"), (out, "/out", "rw")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert_masks_match_inputs(out, find_cases(cases).cases, {0, 1, 2, 3})
