"""The Docker image, run the way the BraTS platforms run it (shared/BRATS_CONTRACT.md), one test per call form.

The image is ``$BRATS_CLS_IMAGE`` (default ``brats-cls:local``, which ``container/build-local.sh``
builds; ``.ci/run`` builds and exports it). Without an engine or image these tests skip, except
when ``CI`` is set: then they fail with the reason, so CI can never pass without running them.

Folders are made as the platforms make them, never ``chmod 0777``: inputs 0755/0644 and mounted
read-only; output folders mode 0755, owned by root (a folder that Docker or a root workflow created)
or by a host user (uid:gid 4321:4321 here). Every run has the BraTS 2025 template's limits
(``--network none --memory 16G --shm-size 4G``; its ``--gpus all`` needs a GPU) and a read-only root
with ``--tmpfs /tmp`` (MedPerf mounts its own folder at /tmp instead), so a write anywhere but the
output folder and /tmp fails the run. The calls with ``-u`` (MedPerf, the BraTS orchestrator) also
drop every capability; the calls without ``-u`` (Synapse) keep Docker's default capabilities or only
SETUID and SETGID. Models are tiny random-weight models mounted as the weights folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
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
USER = (4321, 4321)  # the host user who owns a folder, or whom -u names
ROOT = (0, 0)
RUN_AS = (10001, 10001)  # the image's unprivileged user
#: The BraTS 2025 submission template's limits (its `--gpus all` aside).
TEMPLATE_2025 = ["--network", "none", "--memory", "16G", "--shm-size", "4G"]
BASE = [*TEMPLATE_2025, "--read-only", "--tmpfs", "/tmp", "--security-opt", "no-new-privileges"]
#: MedPerf (MLCube era) and the BraTS orchestrator: -u uid:gid; hardened further: no capability at all.
WITH_U = [*BASE, "-u", f"{USER[0]}:{USER[1]}", "--cap-drop", "ALL"]
#: Synapse 2021 run_docker.py and the 2025 template: no -u, Docker's default capabilities.
NO_U = BASE
#: No -u, and only the two capabilities that switching users needs.
NO_U_MINIMAL = [*BASE, "--cap-drop", "ALL", "--cap-add", "SETUID", "--cap-add", "SETGID"]


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


def docker_run(image: str, *args, mounts=(), env=None, options=WITH_U, entrypoint=None):
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
    """Copy ``source`` to ``target`` as a host user's files are: folders 0755, files 0644."""
    shutil.copytree(source, target)
    for path in [target, *target.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


def set_owner(path: Path, owner: tuple[int, int], mode: int) -> Path:
    """Give ``path`` (not its contents) ``owner`` and ``mode``. That needs root: when pytest is not root,
    a root container of the image does it."""
    if owner == (os.getuid(), os.getgid()) or os.geteuid() == 0:
        if owner != (os.getuid(), os.getgid()):
            os.chown(path, *owner)
        path.chmod(mode)
        return path
    done = subprocess.run(["docker", "run", "--rm", "--network", "none", "-u", "0:0", "--entrypoint", "sh",
                           "-v", f"{path.parent}:/host", IMAGE, "-c",
                           f"chown {owner[0]}:{owner[1]} /host/{path.name} && chmod {mode:o} /host/{path.name}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return path


def owned_folder(path: Path, owner: tuple[int, int], mode: int = 0o755) -> Path:
    """A new folder owned by ``owner`` with ``mode``, as a platform (root) or a host user creates it."""
    path.mkdir(parents=True)
    return set_owner(path, owner, mode)


def assert_owned(folder: Path, owner: tuple[int, int], mode: int = 0o644) -> None:
    """Every file under ``folder`` belongs to ``owner``; masks and other files have ``mode``."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files
    for path in files:
        info = path.lstat()
        assert (info.st_uid, info.st_gid) == owner, f"{path} owned by {info.st_uid}:{info.st_gid}, not {owner}"
        assert stat.S_IMODE(info.st_mode) == mode, f"{path} has mode {stat.S_IMODE(info.st_mode):o}"


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
WEIGHTS_ENV = {"BRATS_CLS_WEIGHTS": WEIGHTS_MOUNT}


def weights_mount(weights: Path):
    return [(weights, WEIGHTS_MOUNT, "ro")]


def parameters_folder(tmp_path: Path, text: str) -> Path:
    params = tmp_path / "params_src"
    params.mkdir()
    (params / "parameters.yaml").write_text(text)
    return shared(params, tmp_path / "params")


@pytest.fixture(scope="module")
def synapse_2023_run(image, phantom_cases, weights, tmp_path_factory):
    """The 2025 Synapse call: case folders at /input, no command, no -u, default options, and an output
    folder that the host user made (mode 0755)."""
    root = tmp_path_factory.mktemp("synapse_2023")
    cases = shared(phantom_cases, root / "cases")
    out = owned_folder(root / "out", USER)
    result = docker_run(image, mounts=[(cases, "/input", "ro"), (out, "/output", "rw"), *weights_mount(weights)],
                        env=WEIGHTS_ENV, options=NO_U)
    return cases, out, result


# ------------------------------------------------------------------------------ the image


def test_hadolint_is_clean():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        unavailable("no hadolint: pip install -r requirements-dev.txt")
    result = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_starts_as_root_only_to_launch_and_writes_only_under_tmp(image):
    config = json.loads(subprocess.run(["docker", "image", "inspect", image], capture_output=True, text=True,
                                       check=True).stdout)[0]["Config"]
    assert config["Entrypoint"][-1].endswith("/entrypoint.sh")
    assert config["User"] in ("0:0", "0", "root")  # entrypoint.sh switches to an unprivileged user
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["BRATS_CLS_WEIGHTS"] == "/opt/brats-cls/weights"
    assert env["BRATS_CLS_DROP_ROOT"] == "1" and env["BRATS_CLS_RUN_AS"] == f"{RUN_AS[0]}:{RUN_AS[1]}"
    for key in ("HOME", "TMPDIR", "MPLCONFIGDIR", "TORCH_HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME"):
        assert env[key].startswith("/tmp"), key
    result = docker_run(image, "--reuid", str(RUN_AS[0]), "--regid", str(RUN_AS[1]), "--clear-groups", "id", "-u",
                        options=NO_U_MINIMAL, entrypoint="setpriv")
    assert result.returncode == 0 and result.stdout.strip() == str(RUN_AS[0]), result.stderr


# ------------------------------------------------------------------------------ Synapse: no -u


def test_synapse_2023_no_u_output_owned_by_the_host_user(synapse_2023_run):
    cases, out, result = synapse_2023_run
    assert result.returncode == 0, result.stdout + result.stderr
    assert_masks_match_inputs(out, find_cases(cases).cases, {0, 1, 2, 3})
    assert_owned(out, USER)  # the folder's owner, mode 0644: no root-owned file in a user's folder


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


@pytest.mark.parametrize("options", [NO_U, NO_U_MINIMAL], ids=["default-capabilities", "setuid-setgid-only"])
def test_synapse_no_u_output_owned_by_root(image, phantom_cases, weights, tmp_path, options):
    cases = shared(phantom_cases, tmp_path / "cases")
    out = owned_folder(tmp_path / "out", ROOT)
    params = parameters_folder(tmp_path, "tta: false\n")
    result = docker_run(image, "infer", "--data_path=/input", "--parameters_file=/p/parameters.yaml",
                        "--output_path=/output", options=options, env=WEIGHTS_ENV,
                        mounts=[(cases, "/input", "ro"), (out, "/output", "rw"), (params, "/p", "ro"),
                                *weights_mount(weights)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert_masks_match_inputs(out, find_cases(cases).cases, {0, 1, 2, 3})  # only <ID>.nii.gz, no temporary
    assert_owned(out, ROOT)
    assert f"brats-cls runs as uid {RUN_AS[0]}:{RUN_AS[1]}" in result.stderr


def test_the_models_never_run_as_root(image, phantom_cases, weights, tmp_path):
    """Cases only root may read, a root-owned output folder: root could segment them; the image must not."""
    cases = set_owner(shared(phantom_cases, tmp_path / "cases"), ROOT, 0o700)
    out = owned_folder(tmp_path / "out", ROOT)
    result = docker_run(image, mounts=[(cases, "/input", "ro"), (out, "/output", "rw"), *weights_mount(weights)],
                        env=WEIGHTS_ENV, options=NO_U)
    assert result.returncode != 0 and list(out.iterdir()) == [], result.stdout + result.stderr
    assert "/input" in result.stdout + result.stderr


def test_synapse_2021_one_case_lying_flat_in_input(image, phantom_cases_2021, weights, tmp_path):
    case = find_cases(phantom_cases_2021).cases[0]
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in case.paths:
        shutil.copy(path, flat / path.name)
    flat = shared(flat, tmp_path / "input")
    out = owned_folder(tmp_path / "out", ROOT)  # made by run_docker.py's own root process
    result = docker_run(image, mounts=[(flat, "/input", "ro"), (out, "/output", "rw"), *weights_mount(weights)],
                        env=WEIGHTS_ENV, options=NO_U)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_masks_match_inputs(out, [find_cases(flat).cases[0]], {0, 1, 2, 4})
    assert [p.name for p in out.iterdir()] == ["BraTS2021_00001.nii.gz"]
    assert_owned(out, ROOT)


def test_synapse_2021_case_that_cannot_be_segmented_exits_1(image, phantom_cases_2021, weights, tmp_path):
    case = find_cases(phantom_cases_2021).cases[0]
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in case.paths:
        shutil.copy(path, flat / path.name)
    (flat / case.modalities["t1ce"].name).write_bytes(case.modalities["t1ce"].read_bytes()[:400])  # truncated
    flat = shared(flat, tmp_path / "input")
    out = owned_folder(tmp_path / "out", USER)
    result = docker_run(image, mounts=[(flat, "/input", "ro"), (out, "/output", "rw"), *weights_mount(weights)],
                        env=WEIGHTS_ENV, options=NO_U)
    assert result.returncode == 1 and list(out.iterdir()) == [], result.stdout + result.stderr
    assert case.case_id in result.stderr and "no case could be segmented" in result.stderr


@pytest.mark.parametrize("owner, advice", [(USER, f"-u {USER[0]}:{USER[1]}"), (ROOT, "--cap-add SETUID")],
                         ids=["user-owned", "root-owned"])
def test_cap_drop_all_without_u_fails_naming_the_flag_to_add(image, phantom_cases, tmp_path, owner, advice):
    cases = shared(phantom_cases, tmp_path / "cases")
    out = owned_folder(tmp_path / "out", owner)
    result = docker_run(image, mounts=[(cases, "/input", "ro"), (out, "/output", "rw")],
                        options=[*BASE, "--cap-drop", "ALL"])
    assert result.returncode == 2 and list(out.iterdir()) == [], result.stdout + result.stderr
    assert advice in result.stderr and "--cap-add SETUID --cap-add SETGID" in result.stderr


# ------------------------------------------------------------------------------ -u uid:gid


def test_u_uid_gid_works_as_before(image, phantom_cases, weights, tmp_path):
    cases = shared(phantom_cases, tmp_path / "cases")
    out = owned_folder(tmp_path / "out", USER)
    params = parameters_folder(tmp_path, "tta: false\n")
    result = docker_run(image, "infer", "--data_path=/in", "--parameters_file=/p/parameters.yaml", "--output_path=/out",
                        mounts=[(cases, "/in", "ro"), (params, "/p", "ro"), (out, "/out", "rw"), *weights_mount(weights)],
                        env=WEIGHTS_ENV, options=WITH_U)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_masks_match_inputs(out, find_cases(cases).cases, {0, 1, 2, 3})
    assert_owned(out, USER)


def test_u_with_an_output_folder_it_cannot_write_says_what_to_change(image, phantom_cases, tmp_path):
    cases = shared(phantom_cases, tmp_path / "cases")
    out = owned_folder(tmp_path / "out", ROOT)
    result = docker_run(image, mounts=[(cases, "/input", "ro"), (out, "/output", "rw")], options=WITH_U)
    assert result.returncode == 2 and list(out.iterdir()) == [], result.stdout + result.stderr
    assert "output folder /output (owner 0:0, mode 755) is not writable by uid 4321:4321" in result.stderr
    assert "without -u" in result.stderr


# ------------------------------------------------------------------------------ MLCube / orchestrator


def test_mlcube_infer_call_with_parameters_file(image, phantom_cases, weights, tmp_path):
    cases = shared(phantom_cases, tmp_path / "data")
    params = parameters_folder(tmp_path, "tta: false\ndevice: cpu\nmodels: unetpp\nlabel_scheme: 2021\n")
    out = owned_folder(tmp_path / "predictions", USER)
    mounts = [(cases, "/mlcube_io0", "ro"), (params, "/mlcube_io1", "ro"), (out, "/mlcube_io2", "rw"),
              *weights_mount(weights)]
    result = docker_run(image, "infer", "--data_path=/mlcube_io0", "--parameters_file=/mlcube_io1/parameters.yaml",
                        "--output_path=/mlcube_io2", mounts=mounts, env=WEIGHTS_ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_masks_match_inputs(out, find_cases(cases).cases, {0, 1, 2, 4})  # label_scheme 2021 took effect
    assert "1 model(s) x 1 flip(s)" in result.stdout  # so did models and tta
    assert_owned(out, USER)


def test_mlcube_unknown_parameter_exits_2_naming_it(image, tmp_path):
    params = parameters_folder(tmp_path, "tta: true\nbatch: 4\n")
    out = owned_folder(tmp_path / "out", USER)
    result = docker_run(image, "infer", "--data_path", "/mlcube_io0", "--parameters_file", "/mlcube_io1/parameters.yaml",
                        "--output_path", "/mlcube_io2", mounts=[(params, "/mlcube_io0", "ro"), (params, "/mlcube_io1", "ro"),
                                                                (out, "/mlcube_io2", "rw")])
    assert result.returncode == 2 and "'batch'" in result.stderr, result.stdout + result.stderr


def test_malformed_case_beside_a_good_one_completes_with_status_0(image, phantom_cases_2021, weights, tmp_path):
    """The platforms fail a whole run on any non-zero status: a run that wrote the other cases exits 0
    and names the failed case on stderr and in the failures file (here in a mounted log folder)."""
    cases = shared(phantom_cases_2021, tmp_path / "cases")
    broken, good = find_cases(cases).cases
    broken.modalities["t1ce"].write_bytes(broken.modalities["t1ce"].read_bytes()[:400])  # truncated NIfTI
    params = parameters_folder(tmp_path, "tta: false\n")
    out = owned_folder(tmp_path / "out", USER)
    logs = owned_folder(tmp_path / "logs", USER)
    result = docker_run(image, "infer", "--data_path=/in", "--parameters_file=/p/parameters.yaml", "--output_path=/out",
                        mounts=[(cases, "/in", "ro"), (params, "/p", "ro"), (out, "/out", "rw"), (logs, "/logs", "rw"),
                                *weights_mount(weights)],
                        env={**WEIGHTS_ENV, "BRATS_CLS_FAILURES": "/logs/failures.json"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert [p.name for p in out.iterdir()] == [good.output_name]
    assert f"{broken.case_id}: " in result.stderr and "1 of 2 case(s) failed" in result.stderr
    record = json.loads((logs / "failures.json").read_text())
    assert record["written"] == [good.case_id] and list(record["failed"]) == [broken.case_id]


# ------------------------------------------------------------------------------ MedPerf container config


def test_medperf_container_config_layout(image, phantom_cases, weights, tmp_path):
    """MedPerf without MLCube: no command, -u, its volumes under /mlcommons/volumes, its own folder at /tmp,
    the parameters file mounted as a file and the weights given as additional files."""
    cases = shared(phantom_cases, tmp_path / "data")
    params = parameters_folder(tmp_path, "tta: false\nlabel_scheme: 2021\n")
    out = owned_folder(tmp_path / "predictions", USER)
    medperf_tmp = owned_folder(tmp_path / "medperf_tmp", USER)
    volumes = "/mlcommons/volumes"
    result = docker_run(image, options=[*TEMPLATE_2025, "-u", f"{USER[0]}:{USER[1]}"],
                        mounts=[(cases, f"{volumes}/data", "ro"),
                                (params / "parameters.yaml", f"{volumes}/parameters/parameters_file.yaml", "ro"),
                                (weights, f"{volumes}/additional_files", "ro"),
                                (out, f"{volumes}/predictions", "rw"), (medperf_tmp, "/tmp", "rw")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert_masks_match_inputs(out, find_cases(cases).cases, {0, 1, 2, 4})  # the parameters file took effect
    assert "2 model(s) x 1 flip(s)" in result.stdout  # the two tiny models of additional_files, no TTA
    assert_owned(out, USER)
    record = json.loads((medperf_tmp / "brats-cls-failures.json").read_text())  # outside the predictions
    assert sorted(record["written"]) == sorted(c.case_id for c in find_cases(cases).cases)


# ------------------------------------------------------------------------------ scale: shards, workers, memory


def test_brats_cls_shard_splits_the_cases_between_containers_sharing_an_output_folder(image, synapse_2023_run, weights,
                                                                                      tmp_path):
    """Two containers of the 2025 form, BRATS_CLS_SHARD=1/2 and 2/2, one output folder: each takes its
    part (round robin over the sorted IDs), lists only its cases in its failures file, and together
    they write what one container writes."""
    cases, whole, result = synapse_2023_run
    assert result.returncode == 0, result.stdout + result.stderr
    out = owned_folder(tmp_path / "out", USER)
    logs = owned_folder(tmp_path / "logs", USER)
    ids = [case.case_id for case in find_cases(cases).cases]
    for index in (1, 2):
        run = docker_run(image, mounts=[(cases, "/input", "ro"), (out, "/output", "rw"), (logs, "/logs", "rw"),
                                               *weights_mount(weights)],
                         env={**WEIGHTS_ENV, "BRATS_CLS_SHARD": f"{index}/2", "BRATS_CLS_FAILURES": f"/logs/{index}.json"},
                         options=NO_U)
        assert run.returncode == 0, run.stdout + run.stderr
        mine = ids[index - 1::2]
        assert f"shard {index}/2: {len(mine)} case(s) written" in run.stdout
        assert json.loads((logs / f"{index}.json").read_text()) == {"written": mine, "skipped": [], "failed": {}}
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in whole.iterdir())
    for mask in whole.iterdir():
        assert (out / mask.name).read_bytes() == mask.read_bytes(), mask.name
    bad = docker_run(image, mounts=[(cases, "/input", "ro"), (out, "/output", "rw")],
                     env={"BRATS_CLS_SHARD": "0/2"}, options=NO_U)
    assert bad.returncode == 2 and "BRATS_CLS_SHARD: '0/2'" in bad.stderr, bad.stdout + bad.stderr


def test_two_workers_in_the_image_need_no_shared_memory(image, synapse_2023_run, weights, tmp_path):
    """BRATS_CLS_DEVICES=cpu,cpu under the 2025 limits but a 1 MiB /dev/shm: the workers pass nothing
    through it (brats_cls.parallel, "Shared memory"), and write what one process writes."""
    cases, whole, result = synapse_2023_run
    assert result.returncode == 0, result.stdout + result.stderr
    out = owned_folder(tmp_path / "out", ROOT)  # root-owned: the workers run as uid 10001, a root process publishes
    run = docker_run(image, mounts=[(cases, "/input", "ro"), (out, "/output", "rw"), *weights_mount(weights)],
                     env={**WEIGHTS_ENV, "BRATS_CLS_DEVICES": "cpu,cpu"}, options=[*NO_U, "--shm-size", "1m"])
    assert run.returncode == 0, run.stdout + run.stderr
    assert "on 2 workers (cpu, cpu)" in run.stdout
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in whole.iterdir()}
    assert_owned(out, ROOT)


@pytest.mark.parametrize("engine", ["", "onnxruntime", "openvino"])
def test_the_export_engines_run_in_the_read_only_image(image, synapse_2023_run, weights, tmp_path, engine):
    """BRATS_CLS_ENGINE in the MLCube call (-u, no capability, read-only root, the 2025 limits), float32 by
    the parameters file: the engine's package is in the image, its graphs go to /tmp (the only writable
    place), and its masks are those of eager float32 on the host. Unset (""): the default, ``auto``,
    is OpenVINO for this float32 CPU run."""
    cases, whole, result = synapse_2023_run
    assert result.returncode == 0, result.stdout + result.stderr
    reference = tmp_path / "host"
    reference.mkdir()
    host = CliRunner().invoke(main, ["infer", "--input", str(cases), "--output", str(reference), "--weights",
                                     str(weights), "--precision", "fp32", "--engine", "eager", "--quiet"],
                        catch_exceptions=False)
    assert host.exit_code == 0, host.output
    out = owned_folder(tmp_path / "out", USER)
    params = parameters_folder(tmp_path, "precision: fp32\n")  # eager's and the engine's arithmetic alike
    run = docker_run(image, "infer", "--data_path=/in", "--parameters_file=/p/parameters.yaml", "--output_path=/out",
                     mounts=[(cases, "/in", "ro"), (params, "/p", "ro"), (out, "/out", "rw"), *weights_mount(weights)],
                     env={**WEIGHTS_ENV, **({"BRATS_CLS_ENGINE": engine} if engine else {})})
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"fp32 on cpu with {engine or 'openvino'}" in run.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    for path in reference.iterdir():
        assert np.mean(labels_of(out / path.name) == labels_of(path)) >= 0.999, path.name


def test_a_memory_limit_below_the_ensembles_need_stops_before_any_work_naming_it(image, phantom_cases, tmp_path):
    """The shipped ensemble needs about 2.5 GiB per worker (brats_cls.parallel.WORKER_PEAK_RSS): under
    --memory 1g the call exits 2 naming the limit and the need, instead of being killed (137)."""
    cases = shared(phantom_cases, tmp_path / "cases")
    out = owned_folder(tmp_path / "out", USER)
    result = docker_run(image, mounts=[(cases, "/input", "ro"), (out, "/output", "rw")],
                        options=[*NO_U, "--memory", "1g"])
    assert result.returncode == 2 and list(out.iterdir()) == [], result.stdout + result.stderr
    assert "the memory limit is 1.00 GiB (/sys/fs/cgroup/memory" in result.stderr, result.stderr
    assert "1 worker(s) need about 2.50 GiB" in result.stderr and "docker run --memory" in result.stderr


# ------------------------------------------------------------------------------ train, synth, bench


def test_train_fold_without_arch_trains_both_networks_as_the_folder_owner(image, phantom_cases, phantom_cases_2021,
                                                                          tmp_path):
    """`docker run ... -v data:/data:ro -v runs:/output IMAGE train --fold N`: no -u, no --arch, Docker's
    small /dev/shm (here 1 MiB, less than one tiny batch): both networks, data-loader workers off."""
    data = tmp_path / "data"
    data.mkdir()
    for source in (phantom_cases, phantom_cases_2021):
        for case_dir in source.iterdir():
            shutil.copytree(case_dir, data / case_dir.name)
    data = shared(data, tmp_path / "data_shared")
    out = owned_folder(tmp_path / "out", USER)
    result = docker_run(image, "train", "--fold", "2", "--size", "tiny", "--epochs", "1", "--steps-per-epoch", "1",
                        "--device", "cpu", "-q", mounts=[(data, "/data", "ro"), (out, "/output", "rw")],
                        options=[*NO_U, "--shm-size", "1m"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.index("training bifpn fold 2") < result.stdout.index("training unetpp fold 2")
    for arch in ("bifpn", "unetpp"):
        run = out / f"{arch}-fold2"
        assert (run / "last.pt").is_file()  # the resumable training state
        model, _ = load_model(run / "best.pt")
        assert model.config == build_model(arch, "tiny").config
    assert "/dev/shm has 1.0 MiB free" in result.stderr and "--workers 0" in result.stderr
    for path in out.rglob("*"):
        assert (path.stat().st_uid, path.stat().st_gid) == USER, path


def test_train_with_u_writes_a_checkpoint_into_the_mounted_output(image, phantom_cases, phantom_cases_2021, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for source in (phantom_cases, phantom_cases_2021):
        for case_dir in source.iterdir():
            shutil.copytree(case_dir, data / case_dir.name)
    data = shared(data, tmp_path / "data_shared")
    out = owned_folder(tmp_path / "out", USER)
    result = docker_run(image, "train", "--data", "/data", "--out", "/output", "--arch", "bifpn", "--size", "tiny",
                        "--fold", "0", "--epochs", "1", "--steps-per-epoch", "1", "--workers", "0", "--device", "cpu",
                        "-q", mounts=[(data, "/data", "ro"), (out, "/output", "rw")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert (out / "bifpn-fold0" / "last.pt").is_file() and not (out / "unetpp-fold0").exists()


def test_train_into_a_root_owned_folder_without_u_is_refused_saying_what_to_do(image, tmp_path):
    out = owned_folder(tmp_path / "out", ROOT)  # as Docker makes a missing bind-mount folder
    result = docker_run(image, "train", "--fold", "0", mounts=[(out, "/output", "rw")], options=NO_U)
    assert result.returncode == 2 and list(out.iterdir()) == [], result.stdout + result.stderr
    assert "root owns /output" in result.stderr and "Mount a folder that you own" in result.stderr


def test_synth_and_bench_run_in_the_image(image, tmp_path):
    out = owned_folder(tmp_path / "out", USER)
    result = docker_run(image, "synth", "--out", "/output/cases", "--cases", "1", "--seed", "3", "--shape", "48,64,64",
                        mounts=[(out, "/output", "rw")], options=NO_U)
    assert result.returncode == 0, result.stdout + result.stderr
    (case,) = find_cases(out / "cases").cases
    assert len(case.paths) == 4 and (out / "cases" / case.case_id / f"{case.case_id}-seg.nii.gz").is_file()
    result = docker_run(image, "bench", "--quick", "--device", "cpu", "--json", "/output/bench.json",
                        mounts=[(out, "/output", "rw")], options=NO_U)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((out / "bench.json").read_text())
    for path in out.rglob("*"):
        assert (path.stat().st_uid, path.stat().st_gid) == USER, path


# ------------------------------------------------------------------------------ shipped weights


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
    assert manifest.is_file(), "the repository ships no weights/manifest.json: the image would have no models"
    first = json.loads(manifest.read_text())["models"][0]["name"]
    cases = shared(phantom_cases, tmp_path / "data")
    params = parameters_folder(tmp_path, f"tta: false\nmodels: {first}\n")
    out = owned_folder(tmp_path / "out", USER)
    result = docker_run(image, "infer", "--data_path=/in", "--parameters_file=/p/parameters.yaml", "--output_path=/out",
                        mounts=[(cases, "/in", "ro"), (params, "/p", "ro"), (out, "/out", "rw")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert_masks_match_inputs(out, find_cases(cases).cases, {0, 1, 2, 3})
