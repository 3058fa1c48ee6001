"""brats-cls bench: the quick mode through the CLI, the JSON it writes, variant and engine parsing, the
engines side by side, FLOP counting, the naive extrapolation, the OpenVINO shape sweep. No assertion on
wall-clock time."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from brats_cls.bench import STAGES, Variant, extrapolate_naive, forward_flops
from brats_cls.bench.engines import EngineSpec, parse_engines
from brats_cls.engines import installed
from brats_cls.cli import main
from brats_cls.predictor import Predictor
from brats_cls.models.registry import build_model


def test_quick_bench_writes_every_stage_peak_flops_and_ratio(tmp_path):
    path = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "--quick", "--training", "--training-steps", "1", "--naive-models", "2",
                                       "--variant", "precision=fp32", "--variant", "precision=fp32,flip_batch=2",
                                       "--json", str(path)])
    assert result.exit_code == 0, result.output
    data = json.loads(path.read_text())
    assert data["config"]["models"] == 2 and data["config"]["size"] == "tiny"
    assert data["case"]["shape"] == [48, 64, 64]
    assert len(data["variants"]) == 2
    for run in (*data["variants"], data["naive"]):
        assert set(run["stages"]) == set(STAGES)
        # the stages are disjoint parts of the case's interval: they cannot add up to more than it
        # (a bookkeeping check, not a speed check)
        parts, whole = sum(run["stages"].values()), run["seconds_total"]
        assert 0.8 * whole <= parts <= whole * 1.001
        assert run["stages"]["forward"] > 0 and run["stages"]["read"] > 0 and run["stages"]["write"] > 0
        assert run["peak_rss_bytes"] > 0
    # one timed call per flip and model; flips batched by 2 give half the calls
    assert [len(call["seconds"]) for call in data["shipped"]["forward_calls"]] == [8, 8]
    assert [len(call["seconds"]) for call in data["variants"][1]["forward_calls"]] == [4, 4]
    # the paths measured compute the same masks: batching flips and the naive float32 path agree with
    # the shipped path voxel for voxel (up to float rounding at the threshold)
    assert data["variants"][1]["labels_agreement_with_first"] >= 0.9999
    assert data["naive"]["labels_agreement_with_shipped"] >= 0.9999
    assert data["naive"]["models"] == 2 and data["naive"]["extrapolated"] is False
    # measured on every model, nothing is extrapolated (up to the rounding of adding the stages back)
    assert data["naive"]["seconds_case_estimate"] == pytest.approx(data["naive"]["seconds_total"], rel=1e-12)
    assert {row["arch"] for row in data["training"]} == {"bifpn", "unetpp"}
    assert all(row["data_samples_per_s"] > 0 and row["step_samples_per_s"] > 0 for row in data["training"])
    # train's "auto" on this CPU, and the same StageTimer keys as infer's report
    assert {row["precision"] for row in data["training"]} <= {"fp32", "bf16"}
    assert "naive / shipped" in result.output and "non-forward %" in result.output


def test_bench_refuses_a_bad_variant():
    result = CliRunner().invoke(main, ["bench", "--quick", "--variant", "precision=fp16"])
    assert result.exit_code == 2 and "precision" in result.output


def test_variant_parse():
    variant = Variant.parse("precision=bf16, flip_batch=4,channels_last=1")
    assert (variant.precision, variant.flip_batch, variant.channels_last, variant.cudnn_benchmark) == ("bf16", 4, True, False)
    assert Variant.parse("") == Variant() and Variant().coarse_logits
    assert not Variant.parse("coarse_logits=0").coarse_logits
    for bad in ("flip_batch=0", "speed=3", "precision"):
        with pytest.raises(ValueError):
            Variant.parse(bad)


def test_forward_flops_scale_with_volume():
    model = build_model("bifpn", "tiny")
    small, large = forward_flops(model, (16, 16, 16)), forward_flops(model, (32, 32, 32))
    assert small > 0
    assert large == pytest.approx(8 * small, rel=0.1)  # convolutions dominate: linear in voxels
    assert forward_flops(model, (16, 16, 16), batch=2) == pytest.approx(2 * small, rel=0.01)


def test_extrapolation_weights_forward_by_the_shipped_times():
    naive = {"seconds_total": 10.0, "stages": {"read": 1.0, "preprocess": 0.5, "forward": 8.0, "aggregation": 0.5,
                                               "decide": 0.0, "uncrop": 0.0, "write": 0.0}}
    shipped = {"forward_calls": [{"seconds": [1.0]}, {"seconds": [3.0]}]}
    # fixed 1 s + (0.5 + 0.5) x 2 models + forward 8 s x (1 + 3) / 1
    assert extrapolate_naive(naive, shipped, 1) == pytest.approx(1.0 + 2.0 + 32.0)
    assert extrapolate_naive(naive, shipped, 2) == pytest.approx(10.0)


def test_flip_batches_give_the_same_logits():
    torch.manual_seed(0)
    models = [build_model("unetpp", "tiny").eval()]
    volume = torch.randn(4, 16, 32, 16).numpy()
    flips = [(), (2,), (3,), (2, 3, 4)]
    one = Predictor(models, precision="fp32", flip_batch=1).mirrored(models[0], Predictor(models).mirrors(
        torch.from_numpy(volume)[None]))
    batched = Predictor(models, precision="fp32", flip_batch=3).mirrored(models[0], Predictor(models).mirrors(
        torch.from_numpy(volume)[None]))
    assert len(Predictor(models).flips) == 8
    assert torch.allclose(one.seg, batched.seg, atol=1e-4)
    assert torch.allclose(one.slices, batched.slices, atol=1e-4)


def test_engine_specs_parse():
    assert parse_engines(["eager,onnxruntime", "openvino:bf16", "eager:fp32"]) == [
        EngineSpec("eager", "fp32"), EngineSpec("onnxruntime", "fp32"), EngineSpec("openvino", "bf16")]
    for bad in ("tensorrt", "eager:fp8", ":bf16"):
        with pytest.raises(ValueError):
            EngineSpec.parse(bad)


@pytest.mark.skipif(not installed("onnxruntime"), reason="onnxruntime not installed")
def test_bench_engines_side_by_side(tmp_path):
    path = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "--quick", "--no-tta", "--engine", "onnxruntime,eager-cl",
                                       "--json", str(path)])
    assert result.exit_code == 0, result.output
    data = json.loads(path.read_text())
    assert "variants" not in data and "naive" not in data  # --engine alone: only the engines phase
    rows = {row["label"]: row for row in data["engines"]}
    assert list(rows) == ["eager fp32", "onnxruntime fp32", "eager-cl fp32"]
    reference, onnx = rows["eager fp32"], rows["onnxruntime fp32"]
    assert reference["identical_voxels"] == 1.0 and reference["reference_over_this"] == 1.0
    for row in rows.values():
        assert {"seconds_first_case", "seconds_steady"} <= set(row) and row["peak_rss_bytes_steady"] > 0  # recorded, not judged
        assert row["identical_voxels"] >= 0.999 and set(row["dice_vs_reference"]) == {"WT", "TC", "ET"}
        assert set(row["dice_vs_truth"]) == {"WT", "TC", "ET"} and row["first_and_steady_identical"]
    assert onnx["one_off"]["exported"] == 2 and onnx["steady_stats"]["exported"] == 0  # the steady case exports nothing
    assert onnx["warm_cache"]["from_cache"] == 2 and onnx["warm_cache"]["exported"] == 0
    assert "onnxruntime fp32" in result.output and "identical %" in result.output


def test_bench_refuses_an_unknown_engine():
    result = CliRunner().invoke(main, ["bench", "--quick", "--engine", "eager,tensorrt"])
    assert result.exit_code == 2 and "unknown engine 'tensorrt'" in result.output
    result = CliRunner().invoke(main, ["bench", "--quick", "--engine", "openvino:fp8"])
    assert result.exit_code == 2 and "precision" in result.output


@pytest.mark.skipif(not installed("openvino"), reason="OpenVINO not installed")
def test_openvino_shape_sweep_reports_each_forward_and_fails_when_one_does():
    """bench/openvino_shapes.py runs each forward in its own process: a shape that works says ok, one
    that fails is named with the child's last error line, and the sweep exits 1."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    run = subprocess.run([sys.executable, "bench/openvino_shapes.py", "--archs", "bifpn", "--shapes", "64,64,64", "5,7,9"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=300)
    lines = run.stdout.splitlines()
    assert run.returncode == 1, run.stdout + run.stderr
    assert lines[0].startswith("bifpn   64,64,64     ok: conv kernels: brgconv_"), lines[0]
    assert lines[1].startswith("bifpn   5,7,9        exit status 1: ") and "multiples of 16" in lines[1]


def test_openvino_shape_sweep_runs_each_child_through_the_via_prefix():
    """``--via`` prefixes each child's command (QEMU's CPU models in the bench): here oneDNN's ISA cap,
    whose AVX2 kernels the child then reports; the graphs are exported into ``--cache`` first."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    with tempfile.TemporaryDirectory() as cache:
        run = subprocess.run([sys.executable, "bench/openvino_shapes.py", "--archs", "unetpp", "--shapes", "64,64,64",
                              "--via", "env ONEDNN_MAX_CPU_ISA=AVX2", "--cache", cache],
                             cwd=root, env=env, capture_output=True, text=True, timeout=300)
        exported = list(Path(cache).rglob("*.onnx"))
    assert run.returncode == 0, run.stdout + run.stderr
    kernels = run.stdout.strip().split("conv kernels: ")[1].split(", ")
    assert kernels and all("avx2" in kernel for kernel in kernels), run.stdout
    assert len(exported) == 1


def test_openvino_profile_prints_each_architectures_layer_types():
    """bench/openvino_profile.py: per architecture the milliseconds per forward, then OpenVINO's layer
    types with their share (convolutions among them), for forward_coarse's graph when asked."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    run = subprocess.run([sys.executable, "bench/openvino_profile.py", "--shape", "64,64,64", "--runs", "1", "--coarse"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    heads = [line for line in run.stdout.splitlines() if "ms per forward" in line]
    assert [line.split()[0] for line in heads] == ["bifpn", "unetpp"] and all("(forward_coarse)" in h for h in heads)
    assert any(line.split()[0] == "Convolution" and line.split()[2] == "ms" for line in run.stdout.splitlines())
