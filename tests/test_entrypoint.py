"""entrypoint.sh outside the image, brats_cls.container (what it hands a call over to), the
parameters-file helper, the train command's loader workers, and the MedPerf files (mlcube.yaml,
container_config.yaml).

Most entrypoint.sh tests point ``BRATS_CLS`` at a small recorder script that prints the arguments it
receives, writes the failures file it is given (``$RECORD_FAILURES``) and exits with ``$RECORD_EXIT``:
that pins exactly what each platform call turns into and which exit status each form gives. The others
run the real ``brats-cls`` through the entry point on phantom cases with tiny models. Outside the image
the entry point never switches users (``BRATS_CLS_DROP_ROOT`` is unset); ``tests/test_container.py`` runs
that part. The ``brats_cls.container`` tests run ``python -m brats_cls.container`` directly: the failure
summary on real failures files, ``segment --staging`` and ``publish`` on phantom cases with the real
brats-cls (as the root-owned output folder's run does, without the user switch), and the folder each
other command writes into.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml

from brats_cls.cases import find_cases
from brats_cls.container import (Publisher, failures_verdict, nearest_existing_folder, segmentation_verdict,
                                 writes_into)
from brats_cls.models.registry import build_model, save_model
from brats_cls.params import KNOWN_KEYS, ParametersError, parameters_to_flags, read_parameters
from brats_cls.training.cli import batch_bytes, loader_workers, shm_needed
from brats_cls.training.recipe import recipe_for
from brats_cls.weights import write_manifest

REPO = Path(__file__).resolve().parents[1]
ENTRYPOINT = REPO / "entrypoint.sh"
RECORDER = """import json, os, sys
print(json.dumps(sys.argv[1:]))
if "RECORD_FAILURES" in os.environ and "--failures" in sys.argv:
    with open(sys.argv[sys.argv.index("--failures") + 1], "w") as handle:
        handle.write(os.environ["RECORD_FAILURES"])
sys.exit(int(os.environ.get("RECORD_EXIT", "0")))
"""
MIB = 1024 * 1024


@pytest.fixture
def recorder(tmp_path):
    script = tmp_path / "record.py"
    script.write_text(RECORDER)
    return f"{shlex.quote(sys.executable)} {script}"


@pytest.fixture
def folders(tmp_path):
    """An input and an output folder (names with spaces) and the failures file path, outside both."""
    inputs, output = tmp_path / "in put", tmp_path / "out put"
    inputs.mkdir()
    output.mkdir()
    return inputs, output, tmp_path / "failures.json"


def entry(*args, brats_cls: str | None = None, failures: Path | None = None, **env):
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("INPUT_DIR", "OUTPUT_DIR", "BRATS_CLS_DROP_ROOT", "BRATS_CLS_FAILURES", "BRATS_CLS_SHARD",
                                "BRATS_CLS_DEVICES", "BRATS_CLS_ENGINE")}
    environment["BRATS_CLS_PYTHON"] = sys.executable
    environment["BRATS_CLS"] = brats_cls or f"{sys.executable} -m brats_cls"
    environment["BRATS_CLS_MEDPERF"] = "/nonexistent/mlcommons/volumes"
    if failures is not None:
        environment["BRATS_CLS_FAILURES"] = str(failures)
    environment.update({k: str(v) for k, v in env.items()})
    return subprocess.run(["bash", str(ENTRYPOINT), *map(str, args)], capture_output=True, text=True,
                          env=environment, timeout=300)


def recorded(result) -> list[str]:
    return json.loads(result.stdout)


def medperf_volumes(root: Path, parameters: str | None = None, weights: Path | None = None) -> Path:
    """The MedPerf container-config layout under ``root``: data/, predictions/, optionally a parameters
    file (``parameters/<name>``) and a weights folder as additional_files/."""
    (root / "data").mkdir(parents=True)
    (root / "predictions").mkdir()
    (root / "additional_files").mkdir()
    if parameters:
        (root / "parameters").mkdir()
        (root / "parameters" / parameters).write_text("tta: false\ndevice: cpu\n")
    if weights is not None:
        shutil.rmtree(root / "additional_files")
        shutil.copytree(weights, root / "additional_files")
    return root


# ------------------------------------------------------------------------------ argument mapping


def test_no_arguments_is_synapse_infer_on_input_dir_and_output_dir(recorder, folders):
    inputs, output, failures = folders
    result = entry(brats_cls=recorder, failures=failures, INPUT_DIR=inputs, OUTPUT_DIR=output)
    assert result.returncode == 0, result.stderr
    assert recorded(result) == ["infer", "--input", str(inputs), "--output", str(output), "--failures", str(failures)]


@pytest.mark.parametrize("spelling", ["equals", "spaces"])
def test_mlcube_infer_with_parameters_file(tmp_path, recorder, folders, spelling):
    inputs, output, failures = folders
    parameters = tmp_path / "parameters.yaml"
    parameters.write_text("tta: false\ncls_suppression: false\nlabel_scheme: 2023\net_min_voxels: 200\n"
                          "device: cpu\nmodels: [bifpn, 'unetpp:0']\n")
    values = {"--data_path": inputs, "--parameters_file": parameters, "--output_path": output}
    if spelling == "equals":
        args = [f"{k}={v}" for k, v in values.items()]
    else:
        args = [word for item in values.items() for word in item]
    result = entry("infer", *args, brats_cls=recorder, failures=failures)
    assert result.returncode == 0, result.stderr
    assert recorded(result) == ["infer", "--input", str(inputs), "--output", str(output), "--failures", str(failures),
                                "--no-tta", "--no-cls-suppression", "--label-scheme", "2023", "--et-min-voxels", "200",
                                "--device", "cpu", "--models", "bifpn,unetpp:0"]


def test_mlcube_infer_without_parameters_file_as_the_orchestrator_calls_it(recorder, folders):
    inputs, output, failures = folders
    result = entry("infer", f"--output_path={output}", f"--data_path={inputs}", brats_cls=recorder, failures=failures)
    assert result.returncode == 0, result.stderr
    assert recorded(result) == ["infer", "--input", str(inputs), "--output", str(output), "--failures", str(failures)]


def test_empty_parameters_file_adds_no_flag(tmp_path, recorder, folders):
    inputs, output, failures = folders
    parameters = tmp_path / "p.yaml"
    parameters.write_text("# nothing set\n")
    result = entry("infer", f"--data_path={inputs}", f"--parameters_file={parameters}", f"--output_path={output}",
                   brats_cls=recorder, failures=failures)
    assert recorded(result) == ["infer", "--input", str(inputs), "--output", str(output), "--failures", str(failures)]


def test_unknown_parameter_keys_are_named_and_exit_2(tmp_path, recorder, folders):
    inputs, output, _ = folders
    parameters = tmp_path / "parameters.yaml"
    parameters.write_text("tta: true\nthreshold: 0.4\npostprocess: yes\n")
    result = entry("infer", f"--data_path={inputs}", f"--parameters_file={parameters}", f"--output_path={output}",
                   brats_cls=recorder)
    assert result.returncode == 2
    assert result.stdout == ""  # brats-cls was never called
    assert "'threshold'" in result.stderr and "'postprocess'" in result.stderr and str(parameters) in result.stderr


@pytest.mark.parametrize("parameters_name", ["parameters_file.yaml", "parameters.yaml"])
def test_medperf_container_config_layout(tmp_path, recorder, parameters_name):
    volumes = medperf_volumes(tmp_path / "volumes", parameters=parameters_name)
    failures = tmp_path / "failures.json"
    result = entry(brats_cls=recorder, failures=failures, BRATS_CLS_MEDPERF=volumes,
                   INPUT_DIR=tmp_path / "unused", OUTPUT_DIR=tmp_path / "unused")
    assert result.returncode == 0, result.stderr
    assert recorded(result) == ["infer", "--input", str(volumes / "data"), "--output", str(volumes / "predictions"),
                                "--failures", str(failures), "--no-tta", "--device", "cpu"]


def test_medperf_parameters_file_is_optional_and_additional_files_may_hold_the_weights(tmp_path, recorder, tiny_weights):
    volumes = medperf_volumes(tmp_path / "volumes", parameters=None, weights=tiny_weights)
    failures = tmp_path / "failures.json"
    result = entry(brats_cls=recorder, failures=failures, BRATS_CLS_MEDPERF=volumes)
    assert result.returncode == 0, result.stderr
    assert recorded(result) == ["infer", "--input", str(volumes / "data"), "--output", str(volumes / "predictions"),
                                "--failures", str(failures), "--weights", str(volumes / "additional_files")]
    shutil.rmtree(volumes / "additional_files")  # MedPerf's empty folder: the shipped weights
    (volumes / "additional_files").mkdir()
    assert "--weights" not in recorded(entry(brats_cls=recorder, failures=failures, BRATS_CLS_MEDPERF=volumes))


def test_medperf_layout_only_when_its_data_folder_exists(tmp_path, recorder, folders):
    inputs, output, failures = folders
    volumes = tmp_path / "volumes"
    (volumes / "predictions").mkdir(parents=True)  # no data/: the Synapse folders
    result = entry(brats_cls=recorder, failures=failures, BRATS_CLS_MEDPERF=volumes, INPUT_DIR=inputs, OUTPUT_DIR=output)
    assert recorded(result)[:5] == ["infer", "--input", str(inputs), "--output", str(output)]


def test_failures_file_defaults_to_tmp_outside_the_output_folder(recorder, folders):
    inputs, output, _ = folders
    result = entry(brats_cls=recorder, INPUT_DIR=inputs, OUTPUT_DIR=output)
    assert recorded(result)[-2:] == ["--failures", "/tmp/brats-cls-failures.json"]


@pytest.mark.parametrize("args, message", [
    (["infer", "--output_path=/o"], "--data_path is required"),
    (["infer", "--data_path=/d"], "--output_path is required"),
    (["infer", "--data_path=/d", "--output_path=/o", "--threads=4"], "unknown argument '--threads=4'"),
    (["infer", "--data_path"], "--data_path needs a value"),
    (["infer", "--data_path=/d", "--output_path=/o", "--parameters_file=/no/such.yaml"], "/no/such.yaml does not exist"),
    (["predict"], "unknown command 'predict'"),
    (["--input", "/x"], "unknown command '--input'"),
])
def test_usage_errors_exit_2_with_usage(recorder, args, message):
    result = entry(*args, brats_cls=recorder)
    assert result.returncode == 2
    assert result.stdout == ""
    assert message in result.stderr and "usage:" in result.stderr


def test_missing_output_folder_exits_2_naming_it_before_brats_cls_runs(recorder, folders):
    inputs, output, failures = folders
    result = entry("infer", f"--data_path={inputs}", f"--output_path={output / 'missing'}", brats_cls=recorder)
    assert result.returncode == 2 and result.stdout == ""
    assert f"output folder {output / 'missing'} does not exist" in result.stderr


def test_hotfix_is_a_no_op(recorder):
    result = entry("hotfix", "--anything=1", brats_cls=recorder)
    assert result.returncode == 0 and result.stdout == ""


@pytest.mark.parametrize("command", ["train", "preprocess", "evaluate", "synth", "bench", "models"])
def test_other_commands_pass_through_unchanged(recorder, command):
    result = entry(command, "--fold", "0", "--out", "/a folder/with spaces", "--flag=x", brats_cls=recorder)
    assert result.returncode == 0, result.stderr
    assert recorded(result) == [command, "--fold", "0", "--out", "/a folder/with spaces", "--flag=x"]


def test_help_prints_usage_and_exits_0(recorder):
    for flag in ("--help", "-h"):
        result = entry(flag, brats_cls=recorder)
        assert result.returncode == 0
        assert result.stdout.startswith("usage:") and "--parameters_file" in result.stdout and "hotfix" in result.stdout
        assert all(key in result.stdout for key in KNOWN_KEYS)
        assert "/mlcommons/volumes/data" in result.stdout and "Exit status" in result.stdout


# ------------------------------------------------------------------------------ exit status per call form

SOME_FAILED = {"written": ["BraTS-GLI-00001-000"], "skipped": [],
               "failed": {"BraTS-GLI-00002-000": "BraTS-GLI-00002-000-t1c.nii.gz: not a NIfTI file"}}
ALL_FAILED = {"written": [], "skipped": [], "failed": {"A": "A-t1c.nii.gz: truncated", "B": "B-t2w.nii.gz: missing"}}


def _segmentation_call(form: str, tmp_path: Path, folders) -> tuple[list[str], dict]:
    inputs, output, _ = folders
    if form == "synapse":
        return [], {"INPUT_DIR": inputs, "OUTPUT_DIR": output}
    if form == "mlcube":
        return ["infer", f"--data_path={inputs}", f"--output_path={output}"], {}
    return [], {"BRATS_CLS_MEDPERF": medperf_volumes(tmp_path / "volumes")}


@pytest.mark.parametrize("form", ["synapse", "mlcube", "medperf"])
@pytest.mark.parametrize("brats_cls_status, failures_file, expected", [
    (0, None, 0),
    (1, SOME_FAILED, 0),  # the run completed: the platforms fail a whole run on any other status
    (1, ALL_FAILED, 1),   # nothing written: the run failed
    (1, None, 1),         # no failures file: brats-cls crashed
    (2, None, 2),         # usage error before any work
])
def test_exit_status_of_each_segmentation_call(tmp_path, recorder, folders, form, brats_cls_status, failures_file,
                                               expected):
    args, env = _segmentation_call(form, tmp_path, folders)
    failures = folders[2]
    if failures_file is not None:
        env["RECORD_FAILURES"] = json.dumps(failures_file)
    result = entry(*args, brats_cls=recorder, failures=failures, RECORD_EXIT=brats_cls_status, **env)
    assert result.returncode == expected, result.stderr
    if failures_file is not None:
        for case_id, message in failures_file["failed"].items():
            assert f"{case_id}: {message}" in result.stderr  # every failed case named, with its reason
        assert str(failures) in result.stderr


@pytest.mark.parametrize("form", ["synapse", "mlcube", "medperf"])
def test_shard_devices_and_engine_come_from_the_environment_in_each_segmentation_call(tmp_path, recorder, folders,
                                                                                      form):
    args, env = _segmentation_call(form, tmp_path, folders)
    result = entry(*args, brats_cls=recorder, failures=folders[2], BRATS_CLS_SHARD=" 2/3 ", BRATS_CLS_DEVICES="cpu,cpu",
                   BRATS_CLS_ENGINE="openvino", **env)
    assert result.returncode == 0, result.stderr
    assert recorded(result)[-6:] == ["--shard", "2/3", "--devices", "cpu,cpu", "--engine", "openvino"]
    unset = entry(*args, brats_cls=recorder, failures=folders[2], BRATS_CLS_SHARD="", BRATS_CLS_ENGINE="", **env)
    assert not {"--shard", "--devices", "--engine"} & set(recorded(unset))


def test_a_bad_brats_cls_engine_exits_2_naming_it_before_brats_cls_runs(recorder, folders):
    inputs, output, failures = folders
    result = entry(brats_cls=recorder, failures=failures, INPUT_DIR=inputs, OUTPUT_DIR=output,
                   BRATS_CLS_ENGINE="tensorrt")
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert "BRATS_CLS_ENGINE: unknown engine 'tensorrt'" in result.stderr and "openvino" in result.stderr


@pytest.mark.parametrize("value", ["0/3", "4/3", "2-3"])
def test_a_bad_brats_cls_shard_exits_2_naming_it_before_brats_cls_runs(recorder, folders, value):
    inputs, output, failures = folders
    result = entry(brats_cls=recorder, failures=failures, INPUT_DIR=inputs, OUTPUT_DIR=output, BRATS_CLS_SHARD=value)
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert f"BRATS_CLS_SHARD: '{value}'" in result.stderr and "numbered from 1" in result.stderr


def test_a_stale_failures_file_is_never_read(recorder, folders):
    inputs, output, failures = folders
    failures.write_text(json.dumps(SOME_FAILED))  # from an earlier run
    result = entry(brats_cls=recorder, failures=failures, INPUT_DIR=inputs, OUTPUT_DIR=output, RECORD_EXIT=1)
    assert result.returncode == 1 and "no readable failures file" in result.stderr


@pytest.mark.parametrize("status", [0, 1, 2])
def test_the_other_commands_keep_the_cli_exit_status(recorder, status):
    for command in ("train", "evaluate", "preprocess"):
        result = entry(command, brats_cls=recorder, RECORD_EXIT=status, RECORD_FAILURES=json.dumps(SOME_FAILED))
        assert result.returncode == status


# ------------------------------------------------------------------------------ real brats-cls


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("entry_weights")
    torch.manual_seed(7)
    save_model(build_model("bifpn", "tiny"), folder / "bifpn.pt", {"fold": 0})
    write_manifest(folder, [{"name": "bifpn", "file": "bifpn.pt", "arch": "bifpn", "fold": 0, "size": "tiny"}])
    return folder


def test_real_mlcube_call_writes_one_readable_mask_per_case_and_lists_them(tmp_path, phantom_cases, tiny_weights):
    parameters = tmp_path / "parameters.yaml"
    parameters.write_text("tta: false\ndevice: cpu\n")
    out = tmp_path / "predictions"
    out.mkdir()
    failures = tmp_path / "logs" / "failures.json"
    failures.parent.mkdir()
    result = entry("infer", f"--data_path={phantom_cases}", "--parameters_file", parameters, f"--output_path={out}",
                   failures=failures, BRATS_CLS_WEIGHTS=tiny_weights)
    assert result.returncode == 0, result.stderr
    cases = find_cases(phantom_cases).cases
    assert sorted(p.name for p in out.iterdir()) == sorted(c.output_name for c in cases)
    for case in cases:
        mask = out / case.output_name
        assert stat.S_IMODE(mask.stat().st_mode) == 0o644  # readable by the scorer, whoever it runs as
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(mask)))
        assert labels.shape == sitk.GetArrayFromImage(sitk.ReadImage(str(case.paths[0]))).shape
        assert set(np.unique(labels).tolist()) <= {0, 1, 2, 3}
    assert json.loads(failures.read_text()) == {"written": sorted(c.case_id for c in cases), "skipped": [], "failed": {}}


def test_real_synapse_call_with_a_malformed_case_completes_with_status_0_naming_it(tmp_path, phantom_cases_2021,
                                                                                    tiny_weights):
    inputs = tmp_path / "input"
    shutil.copytree(phantom_cases_2021, inputs)
    broken, good = find_cases(inputs).cases
    broken.modalities["t2"].unlink()
    out = tmp_path / "output"
    out.mkdir()
    failures = tmp_path / "failures.json"
    result = entry(failures=failures, INPUT_DIR=inputs, OUTPUT_DIR=out, BRATS_CLS_WEIGHTS=tiny_weights)
    assert result.returncode == 0, result.stderr
    assert [p.name for p in out.iterdir()] == [good.output_name]
    assert f"{broken.case_id}: " in result.stderr and "1 of 2 case(s) failed" in result.stderr
    record = json.loads(failures.read_text())
    assert record["written"] == [good.case_id] and list(record["failed"]) == [broken.case_id]


def test_real_call_where_every_case_fails_exits_1(tmp_path, phantom_cases_2021, tiny_weights):
    inputs = tmp_path / "input"
    shutil.copytree(phantom_cases_2021, inputs)
    for case in find_cases(inputs).cases:
        case.modalities["t1ce"].write_bytes(case.modalities["t1ce"].read_bytes()[:400])  # truncated NIfTI
    out = tmp_path / "output"
    out.mkdir()
    result = entry(failures=tmp_path / "failures.json", INPUT_DIR=inputs, OUTPUT_DIR=out, BRATS_CLS_WEIGHTS=tiny_weights)
    assert result.returncode == 1, result.stderr
    assert list(out.iterdir()) == [] and "no case could be segmented" in result.stderr


# ------------------------------------------------------------------------------ brats_cls.container, run directly


def container(*args, umask: int | None = None, **env):
    """``python -m brats_cls.container ARGS...``, real brats-cls (``python -m brats_cls``) unless ``BRATS_CLS``
    is given; ``umask``: the one it starts with."""
    environment = {k: v for k, v in os.environ.items() if k not in ("BRATS_CLS_FAILURES",)}
    environment["BRATS_CLS"] = f"{shlex.quote(sys.executable)} -m brats_cls"
    environment.update({k: str(v) for k, v in env.items()})
    return subprocess.run([sys.executable, "-m", "brats_cls.container", *map(str, args)], capture_output=True,
                          text=True, env=environment, timeout=300,
                          preexec_fn=None if umask is None else (lambda: os.umask(umask)))


def _json_file(path: Path, value) -> Path:
    path.write_text(value if isinstance(value, str) else json.dumps(value))
    return path


def test_failures_verdict_known_answers(tmp_path):
    verdict = failures_verdict(_json_file(tmp_path / "some.json", SOME_FAILED))
    assert verdict.status == 0
    assert verdict.lines == (
        f"1 of 2 case(s) failed, 1 written, 0 skipped (listed in {tmp_path / 'some.json'}):",
        "  BraTS-GLI-00002-000: BraTS-GLI-00002-000-t1c.nii.gz: not a NIfTI file",
        "the run completed for the other cases: exit status 0")
    verdict = failures_verdict(_json_file(tmp_path / "all.json", ALL_FAILED))
    assert verdict.status == 1 and verdict.lines[1:] == (
        "  A: A-t1c.nii.gz: truncated", "  B: B-t2w.nii.gz: missing", "no case could be segmented: exit status 1")
    skipped = {"written": [], "skipped": ["A"], "failed": {"B": "B: truncated"}}  # --skip-existing kept A
    assert failures_verdict(_json_file(tmp_path / "skipped.json", skipped)).status == 0
    for name, text in [("missing.json", None), ("cut.json", '{"written": ['), ("list.json", "[]"),
                       ("keys.json", '{"written": []}'), ("failed.json", '{"written": [], "skipped": [], "failed": 3}')]:
        path = tmp_path / name if text is None else _json_file(tmp_path / name, text)
        verdict = failures_verdict(path)
        assert verdict.status == 1 and "no readable failures file" in verdict.lines[0] and name in verdict.lines[0], name


def test_segmentation_verdict_reads_the_failures_file_only_after_status_1(tmp_path):
    failures = _json_file(tmp_path / "f.json", ALL_FAILED)  # would give 1 if it were read
    assert [segmentation_verdict(status, failures).status for status in (0, 2, 137)] == [0, 2, 137]
    assert segmentation_verdict(0, failures).lines == ()
    assert segmentation_verdict(1, failures).status == 1


def test_segment_with_staging_writes_into_a_new_private_folder_only(tmp_path, phantom_cases, tiny_weights):
    out, staging = tmp_path / "out", tmp_path / "staging"
    out.mkdir()
    failures = tmp_path / "failures.json"
    result = container("segment", "--input", phantom_cases, "--output", out, "--weights", tiny_weights,
                       "--staging", staging, umask=0o022, BRATS_CLS_FAILURES=failures)
    assert result.returncode == 0, result.stderr
    assert list(out.iterdir()) == []  # a root publisher moves them there
    assert stat.S_IMODE(staging.stat().st_mode) == 0o755
    cases = find_cases(phantom_cases).cases
    assert sorted(p.name for p in staging.iterdir()) == sorted(c.output_name for c in cases)
    assert json.loads(failures.read_text())["written"] == sorted(c.case_id for c in cases)
    again = container("segment", "--input", phantom_cases, "--output", out, "--weights", tiny_weights,
                      "--staging", staging, BRATS_CLS_FAILURES=tmp_path / "again.json")
    assert again.returncode == 2, again.stderr  # never into a folder that holds an earlier run's masks
    assert f"cannot create {staging}" in again.stderr and "File exists" in again.stderr
    assert not (tmp_path / "again.json").exists()  # brats-cls never ran


def test_publish_runs_the_segmentation_and_moves_each_mask_into_the_output_folder_0644(tmp_path, phantom_cases_2021,
                                                                                     tiny_weights):
    """The root-owned output folder's run, without the user switch: a malformed case among good ones, a
    temporary file that a killed run left, and a umask that would make masks unreadable to others."""
    inputs = tmp_path / "input"
    shutil.copytree(phantom_cases_2021, inputs)
    broken, good = find_cases(inputs).cases
    broken.modalities["t2"].unlink()
    out, staging = tmp_path / "out", tmp_path / "staging"
    out.mkdir()
    (out / f".{good.output_name}.k1ll3d.tmp").write_bytes(b"partial")
    failures = tmp_path / "failures.json"
    segmentation = [sys.executable, "-m", "brats_cls.container", "segment", "--input", inputs, "--output", out,
                    "--weights", tiny_weights, "--staging", staging]
    result = container("publish", out, staging, "--", *segmentation, umask=0o077, BRATS_CLS_FAILURES=failures)
    assert result.returncode == 0, result.stderr
    assert [p.name for p in out.iterdir()] == [good.output_name]  # no temporary, old or new
    mask = out / good.output_name
    assert stat.S_IMODE(mask.stat().st_mode) == 0o644
    assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(mask)))).tolist()) <= {0, 1, 2, 4}
    assert not staging.exists()
    assert f"{broken.case_id}: " in result.stderr and "1 of 2 case(s) failed" in result.stderr
    no_input = container("publish", out, staging, "--", *segmentation[:5], tmp_path / "nothing", "--output", out,
                         "--staging", staging, BRATS_CLS_FAILURES=failures)
    assert no_input.returncode == 2 and "input folder" in no_input.stderr  # the segmentation's status, unchanged
    assert [p.name for p in out.iterdir()] == [good.output_name] and not staging.exists()


def test_publisher_copies_each_new_or_rewritten_mask_once_and_nothing_else(tmp_path, phantom_cases, capsys):
    staging, out = tmp_path / "staging", tmp_path / "out"
    publisher = Publisher(staging, out)
    assert publisher.publish() == []  # the segmentation has not made its folder yet
    staging.mkdir()
    seg_files = sorted(phantom_cases.rglob("*-seg.nii.gz"))
    shutil.copy(seg_files[0], staging / "BraTS-GLI-00001-000.nii.gz")
    shutil.copy(seg_files[1], staging / ".BraTS-GLI-00002-000.nii.gz.x1y2.tmp")  # brats-cls still writing it
    shutil.copy(seg_files[1], staging / ".BraTS-GLI-00006-000.nii.gz")  # hidden: no case's name
    (staging / "BraTS-GLI-00003-000.nii.gz").symlink_to(seg_files[2])  # never followed
    (staging / "BraTS-GLI-00004-000.nii.gz").mkdir()
    (staging / "notes.txt").write_text("not a mask")
    assert publisher.publish() == []  # no output folder: named, and tried again next time
    assert "could not move BraTS-GLI-00001-000.nii.gz into" in capsys.readouterr().err
    os.mkfifo(staging / "BraTS-GLI-00005-000.nii.gz")  # never waited on
    out.mkdir()
    assert publisher.publish() == ["BraTS-GLI-00001-000.nii.gz"]
    assert (out / "BraTS-GLI-00001-000.nii.gz").read_bytes() == seg_files[0].read_bytes()
    assert publisher.publish() == []  # unchanged: not copied again
    os.replace(staging / ".BraTS-GLI-00002-000.nii.gz.x1y2.tmp", staging / "BraTS-GLI-00001-000.nii.gz")
    assert publisher.publish() == ["BraTS-GLI-00001-000.nii.gz"]  # rewritten (brats-cls renames into place)
    assert [p.name for p in out.iterdir()] == ["BraTS-GLI-00001-000.nii.gz"]
    assert (out / "BraTS-GLI-00001-000.nii.gz").read_bytes() == seg_files[1].read_bytes()
    shutil.rmtree(staging)
    staging.symlink_to(phantom_cases / "BraTS-GLI-00001-000")  # a staging folder swapped for a link
    assert Publisher(staging, out).publish() == []


SIGNALLED_CHILD = """import os, pathlib, shutil, signal, sys, time
staging, first, second, pid_file = map(pathlib.Path, sys.argv[1:])
def stop(signum, frame):
    shutil.copy(second, staging / "BraTS-GLI-00002-000.nii.gz")
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
pid_file.write_text(str(os.getpid()))
staging.mkdir()
shutil.copy(first, staging / "BraTS-GLI-00001-000.nii.gz")
time.sleep(120)  # never longer, even when nothing stops it
"""


def test_publish_passes_sigterm_on_and_publishes_what_was_finished(tmp_path, phantom_cases):
    """`docker stop` signals the entry point (PID 1): the run stops, and every finished mask is still in
    the output folder: the one made while it ran (published on the way) and the one made as it stopped."""
    staging, out, child_pid = tmp_path / "staging", tmp_path / "out", tmp_path / "child.pid"
    out.mkdir()
    child = _json_file(tmp_path / "child.py", SIGNALLED_CHILD)
    first, second = sorted(phantom_cases.rglob("*-seg.nii.gz"))[:2]
    with open(tmp_path / "publish.log", "w") as log:  # not a pipe: the child would hold it open
        publisher = subprocess.Popen([sys.executable, "-m", "brats_cls.container", "publish", out, staging, "--",
                                      sys.executable, child, staging, first, second, child_pid], stderr=log)
    try:
        for _ in range(600):
            if (out / "BraTS-GLI-00001-000.nii.gz").exists() or publisher.poll() is not None:
                break
            time.sleep(0.2)
        assert (out / "BraTS-GLI-00001-000.nii.gz").read_bytes() == first.read_bytes()  # published while it runs
        publisher.send_signal(signal.SIGTERM)
        assert publisher.wait(timeout=60) == 143, (tmp_path / "publish.log").read_text()
    finally:
        publisher.kill()
        if child_pid.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(child_pid.read_text()), signal.SIGKILL)
    assert sorted(p.name for p in out.iterdir()) == ["BraTS-GLI-00001-000.nii.gz", "BraTS-GLI-00002-000.nii.gz"]
    assert (out / "BraTS-GLI-00002-000.nii.gz").read_bytes() == second.read_bytes()
    assert not staging.exists()


def test_publish_refuses_a_missing_output_folder_before_running_anything(tmp_path):
    marker = tmp_path / "ran"
    result = container("publish", tmp_path / "missing", tmp_path / "staging", "--", "touch", marker)
    assert result.returncode == 2 and not marker.exists()
    assert f"output folder {tmp_path / 'missing'} does not exist" in result.stderr


def test_exit_status_of_a_command_that_cannot_start_or_is_killed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = container("publish", out, tmp_path / "staging", "--", str(tmp_path / "no-such-program"))
    assert result.returncode == 127 and "no-such-program" in result.stderr
    killed = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    assert container("publish", out, tmp_path / "staging", "--", sys.executable, "-c", killed).returncode == 137


@pytest.mark.parametrize("args, folder", [
    (["train", "--fold", "1", "--resume", "--out", "/runs/a b"], "/runs/a b"),  # --resume takes no value
    (["train", "--out=/runs", "--size", "tiny"], "/runs"),
    (["train", "--fold", "0"], "/from-env"),  # $BRATS_OUTPUT
    (["train", "--help"], None),
    (["preprocess", "--data", "/data", "--cache", "/cache"], "/cache"),
    (["synth", "--cases", "2", "--out", "phantoms"], "phantoms"),
    (["evaluate", "--pred", "/p", "--truth", "/t", "--json", "/reports/e.json", "--csv", "/tables/e.csv"], "/tables"),
    (["evaluate", "--csv", "/tables/e.csv", "--overlay", "/pictures"], "/pictures"),  # the folder option first
    (["evaluate", "--pred", "/p", "--truth", "/t"], None),
    (["bench", "--quick", "--json", "/bench/b.json"], "/bench"),
    (["bench", "--quick"], None),
    (["models"], None),
    (["infer", "--output", "/o"], None),  # the segmentation calls go through `segment`
])
def test_writes_into_reads_each_command_with_its_own_options(monkeypatch, args, folder):
    monkeypatch.setenv("BRATS_OUTPUT", "/from-env")
    assert writes_into(args[0], args[1:]) == (None if folder is None else Path(folder))


def test_train_writes_into_slash_output_without_brats_output(monkeypatch):
    monkeypatch.delenv("BRATS_OUTPUT", raising=False)
    assert writes_into("train", ["--fold", "2"]) == Path("/output")


def test_writes_into_prints_the_nearest_existing_folder(tmp_path):
    (tmp_path / "runs").mkdir()
    result = container("writes-into", "train", "--out", tmp_path / "runs" / "new" / "deeper", "--help")
    assert result.returncode == 0 and result.stdout == ""  # --help: train writes nothing
    result = container("writes-into", "train", "--out", tmp_path / "runs" / "new" / "deeper")
    assert result.returncode == 0 and result.stdout == f"{tmp_path / 'runs'}\n"
    assert nearest_existing_folder(Path("no/such/folder")) == Path.cwd()


# ------------------------------------------------------------------------------ train --fold N


@pytest.fixture(scope="module")
def labelled_cases(phantom_cases, phantom_cases_2021, tmp_path_factory):
    """Five labelled phantom cases (both namings): one per fold."""
    data = tmp_path_factory.mktemp("labelled")
    for source in (phantom_cases, phantom_cases_2021):
        for case_dir in source.iterdir():
            shutil.copytree(case_dir, data / case_dir.name)
    return data


TINY_TRAINING = ["--size", "tiny", "--epochs", "1", "--steps-per-epoch", "1", "--device", "cpu", "-q"]


def test_train_fold_without_arch_trains_bifpn_then_unetpp_each_resumable(tmp_path, labelled_cases):
    out = tmp_path / "runs"
    result = entry("train", "--fold", "1", *TINY_TRAINING, BRATS_DATA=labelled_cases, BRATS_OUTPUT=out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.index("training bifpn fold 1") < result.stdout.index("training unetpp fold 1")
    for arch in ("bifpn", "unetpp"):
        run = out / f"{arch}-fold1"
        assert (run / "last.pt").is_file() and (run / "best.pt").is_file()
        assert json.loads((run / "run.json").read_text())["arch"] == arch
    finished = (out / "bifpn-fold1" / "last.pt").read_bytes()
    shutil.rmtree(out / "unetpp-fold1")  # as if the job had been stopped during the second network
    result = entry("train", "--fold", "1", "--resume", *TINY_TRAINING, BRATS_DATA=labelled_cases, BRATS_OUTPUT=out)
    assert result.returncode == 0, result.stderr
    assert (out / "bifpn-fold1" / "last.pt").read_bytes() == finished  # a finished run is left as it is
    assert (out / "unetpp-fold1" / "last.pt").is_file()  # the missing one starts
    assert f"{out / 'unetpp-fold1'}: 1 epoch(s)" in result.stdout


def test_loader_workers_fall_back_to_0_when_shared_memory_is_short():
    tiny, paper = recipe_for("bifpn", "tiny"), recipe_for("bifpn", "paper")
    assert batch_bytes(tiny) == 2 * 4 * (7 * 32 ** 3 + 3 * 32)  # image 4 + regions 3 channels, slices 3 x D
    assert batch_bytes(paper) == 4 * 4 * (7 * 96 * 128 * 128 + 3 * 96)
    assert shm_needed(tiny, 2) == 5 * batch_bytes(tiny)  # 2 batches in flight per worker, 1 in training
    assert shm_needed(tiny, 2, processes=4) == 4 * shm_needed(tiny, 2) and shm_needed(tiny, 0) == 0
    assert loader_workers(2, tiny, 64 * MIB) == (2, None)  # Docker's default /dev/shm carries tiny batches
    workers, warning = loader_workers(2, paper, 64 * MIB)  # but not the paper's 168 MiB ones
    assert workers == 0 and "--shm-size 2g" in warning and "840.0 MiB" in warning and "--workers 0" in warning
    assert loader_workers(2, paper, 900 * MIB) == (2, None)
    assert loader_workers(0, paper, 0) == (0, None)
    assert loader_workers(4, recipe_for("unetpp", "paper"), 1000 * MIB)[0] == 0  # 9 x 112 MiB > 1000 MiB


# ------------------------------------------------------------------------------ parameters helper


def test_parameters_to_flags_known_answers():
    assert parameters_to_flags({}) == []
    assert parameters_to_flags({"tta": True, "cls_suppression": True}) == ["--tta", "--cls-suppression"]
    assert parameters_to_flags({"label_scheme": 2021, "device": "cuda", "precision": "bf16"}) == [
        "--label-scheme", "2021", "--device", "cuda", "--precision", "bf16"]
    assert parameters_to_flags({"models": " bifpn "}) == ["--models", "bifpn"]
    assert parameters_to_flags({"tta": None, "et_min_voxels": 0}) == ["--et-min-voxels", "0"]  # null: CLI default


@pytest.mark.parametrize("parameters, named", [
    ({"tta": "false"}, "tta: expected true or false"),
    ({"tta": 1}, "tta: expected true or false"),
    ({"et_min_voxels": -1}, "et_min_voxels: expected an integer >= 0"),
    ({"et_min_voxels": True}, "et_min_voxels"),
    ({"et_min_voxels": 2.5}, "et_min_voxels"),
    ({"label_scheme": 2020}, "label_scheme: expected one of auto, 2021, 2023"),
    ({"device": "gpu"}, "device"),
    ({"models": []}, "models"),
    ({"models": "a\nb"}, "models"),
    ({"TTA": True}, "unknown key 'TTA'"),
])
def test_bad_parameters_are_named(parameters, named):
    with pytest.raises(ParametersError, match="parameters") as error:
        parameters_to_flags(parameters, source="parameters file p.yaml")
    assert named in str(error.value) and "p.yaml" in str(error.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ParametersError) as error:
        parameters_to_flags({"tta": "no", "foo": 1, "device": "tpu"})
    assert all(part in str(error.value) for part in ("tta:", "'foo'", "device:"))


def test_read_parameters_errors_name_the_file(tmp_path):
    assert read_parameters(_write(tmp_path / "empty.yaml", "")) == {}
    with pytest.raises(ParametersError, match="list.yaml: expected a mapping"):
        read_parameters(_write(tmp_path / "list.yaml", "- tta\n"))
    with pytest.raises(ParametersError, match="bad.yaml: not valid YAML"):
        read_parameters(_write(tmp_path / "bad.yaml", "tta: [true\n"))
    with pytest.raises(ParametersError, match="cannot read it"):
        read_parameters(tmp_path / "missing.yaml")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------ MedPerf files


def test_mlcube_yaml_declares_the_medperf_model_cube():
    cube = yaml.safe_load((REPO / "container" / "mlcube.yaml").read_text())
    assert cube["docker"]["gpu_args"] == "--gpus all"
    assert (REPO / "container" / cube["docker"]["build_context"] / cube["docker"]["build_file"]).resolve() == REPO / "Dockerfile"
    infer = cube["tasks"]["infer"]["parameters"]
    assert set(infer["inputs"]) == {"data_path", "parameters_file"}
    assert infer["outputs"]["output_path"]["type"] == "directory"
    assert cube["platform"]["accelerator_count"] >= 1 and cube["name"] and cube["docker"]["image"]


def test_workspace_parameters_are_all_accepted():
    parameters = read_parameters(REPO / "container" / "workspace" / "parameters.yaml")
    assert parameters and parameters_to_flags(parameters)


def test_container_config_declares_the_medperf_volumes_that_the_entry_point_reads():
    config = yaml.safe_load((REPO / "container" / "container_config.yaml").read_text())
    assert config["container_type"] == "DockerImage" and config["image"]
    infer = config["tasks"]["infer"]
    assert set(infer.get("run_args", {})) <= {"shm_size", "gpus", "command", "entrypoint", "environment"}  # MedPerf's
    assert "command" not in infer.get("run_args", {})  # the no-argument call
    volumes = {**infer["input_volumes"], **infer["output_volumes"]}
    assert {name: (v["mount_path"], v["type"]) for name, v in volumes.items()} == {
        "data_path": ("/mlcommons/volumes/data", "directory"),
        "parameters_file": ("/mlcommons/volumes/parameters/parameters_file.yaml", "file"),
        "additional_files": ("/mlcommons/volumes/additional_files", "directory"),
        "output_path": ("/mlcommons/volumes/predictions", "directory"),
    }
    script = ENTRYPOINT.read_text()
    assert "medperf=${BRATS_CLS_MEDPERF:-/mlcommons/volumes}" in script
    assert all(part in script for part in ('"$medperf/data"', '"$medperf/predictions"',
                                           "/parameters/parameters_file.yaml", "/additional_files"))
