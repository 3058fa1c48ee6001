"""entrypoint.sh outside the image, the parameters-file helper, and the MLCube files.

Most tests point ``BRATS_CLS`` at a small recorder script that prints the arguments it receives
(and exits with ``$RECORD_EXIT``), which pins exactly what each platform call turns into; two tests
run the real ``brats-cls`` through the entry point on phantom cases with tiny random-weight models.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml

from brats_cls.cases import find_cases
from brats_cls.models.registry import build_model, save_model
from brats_cls.params import KNOWN_KEYS, ParametersError, parameters_to_flags, read_parameters
from brats_cls.weights import write_manifest

REPO = Path(__file__).resolve().parents[1]
ENTRYPOINT = REPO / "entrypoint.sh"
RECORDER = 'import json, os, sys\nprint(json.dumps(sys.argv[1:]))\nsys.exit(int(os.environ.get("RECORD_EXIT", "0")))\n'


@pytest.fixture
def recorder(tmp_path):
    script = tmp_path / "record.py"
    script.write_text(RECORDER)
    return f"{shlex.quote(sys.executable)} {script}"


def entry(*args, brats_cls: str | None = None, **env):
    environment = {k: v for k, v in os.environ.items() if k not in ("INPUT_DIR", "OUTPUT_DIR")}
    environment["BRATS_CLS_PYTHON"] = sys.executable
    environment["BRATS_CLS"] = brats_cls or f"{sys.executable} -m brats_cls"
    environment.update({k: str(v) for k, v in env.items()})
    return subprocess.run(["bash", str(ENTRYPOINT), *map(str, args)], capture_output=True, text=True,
                          env=environment, timeout=300)


def recorded(result) -> list[str]:
    return json.loads(result.stdout)


# ------------------------------------------------------------------------------ argument mapping


def test_no_arguments_is_synapse_infer_on_input_dir_and_output_dir(recorder):
    result = entry(brats_cls=recorder)
    assert result.returncode == 0, result.stderr
    assert recorded(result) == ["infer", "--input", "/input", "--output", "/output"]
    result = entry(brats_cls=recorder, INPUT_DIR="/data/cases", OUTPUT_DIR="/data/out dir")
    assert recorded(result) == ["infer", "--input", "/data/cases", "--output", "/data/out dir"]


@pytest.mark.parametrize("spelling", ["equals", "spaces"])
def test_mlcube_infer_with_parameters_file(tmp_path, recorder, spelling):
    parameters = tmp_path / "parameters.yaml"
    parameters.write_text("tta: false\ncls_suppression: false\nlabel_scheme: 2023\net_min_voxels: 200\n"
                          "device: cpu\nmodels: [bifpn, 'unetpp:0']\n")
    values = {"--data_path": "/mlcube_io0", "--parameters_file": parameters, "--output_path": "/mlcube_io2"}
    if spelling == "equals":
        args = [f"{k}={v}" for k, v in values.items()]
    else:
        args = [word for item in values.items() for word in item]
    result = entry("infer", *args, brats_cls=recorder)
    assert result.returncode == 0, result.stderr
    assert recorded(result) == ["infer", "--input", "/mlcube_io0", "--output", "/mlcube_io2", "--no-tta",
                                "--no-cls-suppression", "--label-scheme", "2023", "--et-min-voxels", "200",
                                "--device", "cpu", "--models", "bifpn,unetpp:0"]


def test_mlcube_infer_without_parameters_file_as_the_orchestrator_calls_it(recorder):
    result = entry("infer", "--output_path=/mlcube_io2", "--data_path=/mlcube_io0", brats_cls=recorder)
    assert result.returncode == 0, result.stderr
    assert recorded(result) == ["infer", "--input", "/mlcube_io0", "--output", "/mlcube_io2"]


def test_empty_parameters_file_adds_no_flag(tmp_path, recorder):
    parameters = tmp_path / "p.yaml"
    parameters.write_text("# nothing set\n")
    result = entry("infer", "--data_path=/d", f"--parameters_file={parameters}", "--output_path=/o", brats_cls=recorder)
    assert recorded(result) == ["infer", "--input", "/d", "--output", "/o"]


def test_unknown_parameter_keys_are_named_and_exit_2(tmp_path, recorder):
    parameters = tmp_path / "parameters.yaml"
    parameters.write_text("tta: true\nthreshold: 0.4\npostprocess: yes\n")
    result = entry("infer", "--data_path=/d", f"--parameters_file={parameters}", "--output_path=/o", brats_cls=recorder)
    assert result.returncode == 2
    assert result.stdout == ""  # brats-cls was never called
    assert "'threshold'" in result.stderr and "'postprocess'" in result.stderr and str(parameters) in result.stderr


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


def test_hotfix_is_a_no_op(recorder):
    result = entry("hotfix", "--anything=1", brats_cls=recorder)
    assert result.returncode == 0 and result.stdout == ""


@pytest.mark.parametrize("command", ["train", "preprocess", "evaluate", "synth", "bench", "models"])
def test_other_commands_pass_through_unchanged(recorder, command):
    result = entry(command, "--fold", "0", "--out", "/a folder/with spaces", "--flag=x", brats_cls=recorder)
    assert result.returncode == 0, result.stderr
    assert recorded(result) == [command, "--fold", "0", "--out", "/a folder/with spaces", "--flag=x"]


@pytest.mark.parametrize("status", [1, 2])
def test_exit_status_of_brats_cls_is_the_containers(recorder, status):
    assert entry(brats_cls=recorder, RECORD_EXIT=status).returncode == status
    assert entry("train", brats_cls=recorder, RECORD_EXIT=status).returncode == status


def test_help_prints_usage_and_exits_0(recorder):
    for flag in ("--help", "-h"):
        result = entry(flag, brats_cls=recorder)
        assert result.returncode == 0
        assert result.stdout.startswith("usage:") and "--parameters_file" in result.stdout and "hotfix" in result.stdout
        assert all(key in result.stdout for key in KNOWN_KEYS)


# ------------------------------------------------------------------------------ real brats-cls


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("entry_weights")
    torch.manual_seed(7)
    save_model(build_model("bifpn", "tiny"), folder / "bifpn.pt", {"fold": 0})
    write_manifest(folder, [{"name": "bifpn", "file": "bifpn.pt", "arch": "bifpn", "fold": 0, "size": "tiny"}])
    return folder


def test_real_mlcube_call_writes_one_mask_per_case(tmp_path, phantom_cases, tiny_weights):
    parameters = tmp_path / "parameters.yaml"
    parameters.write_text("tta: false\ndevice: cpu\n")
    out = tmp_path / "predictions"
    out.mkdir()
    result = entry("infer", f"--data_path={phantom_cases}", "--parameters_file", parameters, f"--output_path={out}",
                   BRATS_CLS_WEIGHTS=tiny_weights)
    assert result.returncode == 0, result.stderr
    cases = find_cases(phantom_cases).cases
    assert sorted(p.name for p in out.iterdir()) == sorted(c.output_name for c in cases)
    for case in cases:
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / case.output_name)))
        assert labels.shape == sitk.GetArrayFromImage(sitk.ReadImage(str(case.paths[0]))).shape
        assert set(np.unique(labels).tolist()) <= {0, 1, 2, 3}


def test_real_synapse_call_reports_a_malformed_case_with_status_1(tmp_path, phantom_cases_2021, tiny_weights):
    inputs = tmp_path / "input"
    shutil.copytree(phantom_cases_2021, inputs)
    broken, good = find_cases(inputs).cases
    broken.modalities["t2"].unlink()
    out = tmp_path / "output"
    out.mkdir()
    result = entry(INPUT_DIR=inputs, OUTPUT_DIR=out, BRATS_CLS_WEIGHTS=tiny_weights)
    assert result.returncode == 1
    assert [p.name for p in out.iterdir()] == [good.output_name]
    assert broken.case_id in result.stdout + result.stderr


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


# ------------------------------------------------------------------------------ MLCube files


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
