"""brats-cls bench: the quick mode through the CLI, the JSON it writes, variant parsing, FLOP counting,
the naive extrapolation. No assertion on wall-clock time."""

import json

import pytest
import torch
from click.testing import CliRunner

from brats_cls.bench import STAGES, Variant, extrapolate_naive, forward_flops
from brats_cls.cli import main
from brats_cls.inference import predict_case_logits
from brats_cls.models.registry import build_model


def test_quick_bench_writes_every_stage_peak_flops_and_ratio(tmp_path):
    path = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "--quick", "--no-tta", "--training", "--training-steps", "1",
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
        assert parts <= whole * 1.001
        assert run["stages"]["forward"] > 0 and run["stages"]["read"] > 0 and run["stages"]["write"] > 0
        assert run["peak_rss_bytes"] > 0
    assert [len(call["seconds"]) for call in data["shipped"]["forward_calls"]] == [1, 1]
    assert all(flops > 0 for flops in data["flops"]["per_forward"].values())
    assert data["flops"]["per_case"] == sum(data["flops"]["per_forward"].values())
    assert data["peak"]["peak_gflops"] > 0
    assert data["naive"]["models"] == 1 and data["naive"]["extrapolated"] is True
    assert data["naive_over_shipped"] > 0
    assert {row["arch"] for row in data["training"]} == {"bifpn", "unetpp"}
    assert all(row["data_samples_per_s"] > 0 and row["step_samples_per_s"] > 0 for row in data["training"])
    assert {row["precision"] for row in data["training"]} == {"float32"}  # train's default on CPU
    assert "naive / shipped" in result.output and "non-forward %" in result.output


def test_bench_refuses_a_bad_variant():
    result = CliRunner().invoke(main, ["bench", "--quick", "--variant", "precision=fp16"])
    assert result.exit_code == 2 and "precision" in result.output


def test_variant_parse():
    variant = Variant.parse("precision=bf16, flip_batch=4,channels_last=1")
    assert (variant.precision, variant.flip_batch, variant.channels_last, variant.cudnn_benchmark) == ("bf16", 4, True, False)
    assert Variant.parse("") == Variant()
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
                                               "suppression": 0.0, "uncrop": 0.0, "write": 0.0}}
    shipped = {"forward_calls": [{"seconds": [1.0]}, {"seconds": [3.0]}]}
    # fixed 1 s + (0.5 + 0.5) x 2 models + forward 8 s x (1 + 3) / 1
    assert extrapolate_naive(naive, shipped, 1) == pytest.approx(1.0 + 2.0 + 32.0)
    assert extrapolate_naive(naive, shipped, 2) == pytest.approx(10.0)


def test_flip_batches_give_the_same_logits():
    torch.manual_seed(0)
    models = [build_model("unetpp", "tiny").eval()]
    volume = torch.randn(4, 16, 32, 16).numpy()
    flips = [(), (2,), (3,), (2, 3, 4)]
    one = predict_case_logits(models, volume, flips, flip_batch=1)
    batched = predict_case_logits(models, volume, flips, flip_batch=3)
    assert torch.allclose(torch.from_numpy(one.seg), torch.from_numpy(batched.seg), atol=1e-4)
    assert torch.allclose(torch.from_numpy(one.slices), torch.from_numpy(batched.slices), atol=1e-4)
