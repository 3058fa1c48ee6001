"""Ensemble inference: flips, suppression, nesting, the platform contract, faults, exit codes."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from click.testing import CliRunner
from torch import nn

from brats_cls.cases import find_cases
from brats_cls.cli import main
from brats_cls.inference import RunOptions, run_inference
from brats_cls.predictor import THRESHOLD, Predictor, add_unflipped, flip_combinations, relabel_small_enhancing
from brats_cls.models.registry import build_model, save_model
from brats_cls.weights import WeightsError, load_ensemble, write_manifest
from helpers import assert_masks_match_inputs, labels_of


def make_weights(folder: Path, archs=("bifpn", "unetpp"), folds=(0,), seed=0) -> Path:
    """A weights folder of tiny random-weight models with a valid manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for arch in archs:
        for fold in folds:
            torch.manual_seed(seed + fold + 10 * len(arch))
            model = build_model(arch, "tiny")
            name = f"{arch}_fold{fold}"
            save_model(model, folder / f"{name}.pt", {"fold": fold})
            entries.append({"name": name, "file": f"{name}.pt", "arch": arch, "fold": fold, "size": "tiny"})
    write_manifest(folder, entries)
    return folder


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    return make_weights(tmp_path_factory.mktemp("weights"))


def ensemble_logits(models, volume, tta=True, **settings):
    return Predictor(models, tta=tta, precision="fp32", **settings).ensemble(volume)


def decide(seg, slices, suppression=True):
    return Predictor([nn.Conv3d(4, 3, 1)], suppression=suppression).decide(seg, slices)


def run_cli(*args):
    return CliRunner().invoke(main, [*map(str, args)], catch_exceptions=False)


class PositionModel(nn.Module):
    """Seg logits = FLAIR channel + a ramp along D and W; slice logits = a ramp along D.

    Position-dependent outputs are what flip TTA must un-flip correctly: every term is known by hand.
    """

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the Predictor a device

    def forward(self, x):
        d, h, w = x.shape[2:]
        ramp_d = torch.arange(d, dtype=x.dtype).view(1, 1, d, 1, 1)
        ramp_w = torch.arange(w, dtype=x.dtype).view(1, 1, 1, 1, w)
        seg = x[:, :1].repeat(1, 3, 1, 1, 1) + ramp_d + 10 * ramp_w
        slices = torch.arange(d, dtype=x.dtype).view(1, 1, d).repeat(x.shape[0], 3, 1)
        return {"seg": seg, "slices": slices}


def test_flip_combinations():
    flips = flip_combinations(True)
    assert flips[0] == () and len(flips) == len(set(flips)) == 8
    assert set(flips[-1]) == {2, 3, 4}
    assert flip_combinations(False) == [()]


def test_unflipping_against_a_hand_computed_case():
    volume = np.random.default_rng(0).normal(size=(4, 16, 16, 32)).astype(np.float32)
    logits = ensemble_logits([PositionModel()], volume)
    d = np.arange(16, dtype=np.float32)
    w = np.arange(32, dtype=np.float32)
    # Half the flips reverse D, half reverse W: the un-flipped ramps average to their mirror means.
    expected = volume[0][None] + ((d + d[::-1]) / 2)[:, None, None] + 10 * ((w + w[::-1]) / 2)[None, None, :]
    np.testing.assert_allclose(logits.seg, np.repeat(expected, 3, axis=0), rtol=0, atol=1e-4)
    np.testing.assert_allclose(logits.slices, np.tile((d + d[::-1]) / 2, (3, 1)), atol=1e-5)
    plain = ensemble_logits([PositionModel()], volume, tta=False)
    np.testing.assert_allclose(plain.slices[0], d)


def test_adding_through_a_reversed_view_equals_torch_flip_for_every_flip_and_precision():
    generator = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn((1, 3, 5, 6, 7), generator=generator).to(dtype)
        for dims in flip_combinations(True):
            start = torch.randn((1, 3, 5, 6, 7), generator=generator)
            total = start.clone()
            add_unflipped(total, logits, dims)
            expected = start + (torch.flip(logits, dims) if dims else logits).float()
            assert total.dtype == torch.float32 and torch.equal(total, expected), (dtype, dims)


def test_symmetric_input_gives_symmetric_output():
    torch.manual_seed(3)
    model = build_model("bifpn", "tiny").eval()
    half = np.random.default_rng(1).normal(size=(4, 16, 16, 16)).astype(np.float32)
    volume = np.concatenate([half, half[..., ::-1]], axis=-1)  # symmetric under a flip of W
    logits = ensemble_logits([model], volume)
    np.testing.assert_allclose(logits.seg, logits.seg[..., ::-1], atol=1e-5)
    without_tta = ensemble_logits([model], volume, tta=False)
    assert not np.allclose(without_tta.seg, without_tta.seg[..., ::-1], atol=1e-5)


def test_suppression_erases_exactly_the_negative_slices():
    seg = np.full((3, 4, 2, 2), 5.0, dtype=np.float32)
    seg[:, 3] = -5.0  # slice 3 predicts nothing
    slices = np.array([[1, -1, 1, -1], [1, 1, -1, 1], [-1, 1, 1, 1]], dtype=np.float32)
    decision = decide(seg, slices, suppression=True)
    regions = decision.regions
    # WT loses slice 1; TC loses slice 2 and, nested in WT, slice 1; ET loses 0, and 1, 2 through nesting.
    assert regions[0].any(axis=(1, 2)).tolist() == [True, False, True, False]
    assert regions[1].any(axis=(1, 2)).tolist() == [True, False, False, False]
    assert regions[2].any(axis=(1, 2)).tolist() == [False, False, False, False]
    assert decision.slices_suppressed == {"WT": 1, "TC": 1, "ET": 1}
    assert decision.voxels_before == {"WT": 12, "TC": 12, "ET": 12}
    assert decision.suppressed.tolist() == [[False, True, False, False], [False, False, True, False],
                                            [True, False, False, False]]
    off = decide(seg, slices, suppression=False)
    assert off.regions[:, :3].all() and not off.regions[:, 3].any()


def test_threshold_is_probability_one_half_with_ties_positive_for_voxels_and_slices_alike():
    assert THRESHOLD == 0.5
    seg = np.array([-0.01, 0.0, 0.01], dtype=np.float32).reshape(1, 1, 1, 3).repeat(3, axis=0)
    regions = decide(seg, np.ones((3, 1), np.float32)).regions
    assert regions[0, 0, 0].tolist() == [False, True, True]
    # a slice whose averaged logit is exactly 0 (probability 0.5) is positive: nothing is erased
    slices = np.array([[0.0, -0.01]] * 3, dtype=np.float32)
    decision = decide(np.ones((3, 2, 1, 1), np.float32), slices)
    assert decision.regions[0, :, 0, 0].tolist() == [True, False]


def test_nesting_holds_after_decision():
    rng = np.random.default_rng(0)
    decision = decide(rng.normal(size=(3, 8, 8, 8)).astype(np.float32), rng.normal(size=(3, 8)).astype(np.float32))
    whole, core, active = decision.regions
    assert not (core & ~whole).any() and not (active & ~core).any()


def test_small_enhancing_relabelled_as_necrosis():
    regions = np.zeros((3, 4, 4, 4), dtype=bool)
    regions[:, 1, 1, 1:3] = True
    assert relabel_small_enhancing(regions, 3) and not regions[2].any() and regions[1].sum() == 2
    regions[2, 1, 1, 1:3] = True
    assert not relabel_small_enhancing(regions, 2) and regions[2].sum() == 2
    assert not relabel_small_enhancing(regions, 0)


class PointwiseModel(nn.Module):
    """A real 1x1x1 convolution for the segmentation, and the in-plane mean of channel 0 as the slice
    logits; on a volume whose channel 0 is constant within each slice, no output depends on which
    window it was computed in, so windowing must reproduce them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.conv = nn.Conv3d(4, 3, 1)

    def forward(self, x):
        slices = x[:, :1].mean(dim=(3, 4)).repeat(1, 3, 1)  # (B, 1, D, H, W) -> (B, 3, D)
        return {"seg": self.conv(x), "slices": slices}


def test_sliding_windows_reproduce_the_whole_volume_logits():
    """Windowed logits equal whole-volume logits to 1e-5 where the network's output does not depend on
    the window (Gaussian weights normalised, windows placed and averaged right, slices averaged over
    the windows that cover them); for a real network, a window as large as the volume is exact."""
    volume = np.random.default_rng(2).normal(size=(4, 48, 32, 48)).astype(np.float32)
    volume[0] = np.sin(np.arange(48) / 3)[:, None, None]  # constant within each slice
    for tta in (False, True):
        whole = ensemble_logits([PointwiseModel()], volume, tta=tta)
        windowed = ensemble_logits([PointwiseModel()], volume, tta=tta, max_whole_voxels=1000, window=(32, 32, 32))
        assert windowed.windowed and not whole.windowed
        np.testing.assert_allclose(windowed.seg, whole.seg, rtol=0, atol=1e-5)
        np.testing.assert_allclose(windowed.slices, whole.slices, rtol=0, atol=1e-5)
    torch.manual_seed(1)
    real = build_model("bifpn", "tiny").eval()
    whole = ensemble_logits([real], volume, tta=False)
    one_window = ensemble_logits([real], volume, tta=False, max_whole_voxels=1000, window=(48, 32, 48))
    np.testing.assert_allclose(one_window.seg, whole.seg, rtol=0, atol=1e-5)
    np.testing.assert_allclose(one_window.slices, whole.slices, rtol=0, atol=1e-5)


def test_ensemble_weights_average_the_networks():
    volume = np.random.default_rng(3).normal(size=(4, 16, 16, 16)).astype(np.float32)
    torch.manual_seed(0)
    first, second = build_model("bifpn", "tiny").eval(), build_model("unetpp", "tiny").eval()
    alone = [ensemble_logits([model], volume, tta=False) for model in (first, second)]
    equal = ensemble_logits([first, second], volume, tta=False)
    np.testing.assert_allclose(equal.seg, (alone[0].seg + alone[1].seg) / 2, atol=1e-5)
    weighted = ensemble_logits([first, second], volume, tta=False, weights=[3, 1])
    np.testing.assert_allclose(weighted.seg, 0.75 * alone[0].seg + 0.25 * alone[1].seg, atol=1e-5)
    np.testing.assert_allclose(weighted.slices, 0.75 * alone[0].slices + 0.25 * alone[1].slices, atol=1e-5)
    with pytest.raises(ValueError, match="weights"):
        Predictor([first, second], weights=[1, -1])


def test_tampered_and_missing_weights_are_refused(tmp_path, tiny_weights):
    copy = tmp_path / "w"
    shutil.copytree(tiny_weights, copy)
    with open(copy / "bifpn_fold0.pt", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(WeightsError, match="altered"):
        load_ensemble(copy)
    (copy / "bifpn_fold0.pt").unlink()
    with pytest.raises(WeightsError, match="missing"):
        load_ensemble(copy)
    with pytest.raises(WeightsError, match="no manifest"):
        load_ensemble(tmp_path)
    models, entries = load_ensemble(tiny_weights, "unetpp")
    assert [e["arch"] for e in entries] == ["unetpp"] and len(models) == 1
    with pytest.raises(WeightsError, match="matches no model"):
        load_ensemble(tiny_weights, "resnet")


def test_cli_on_case_folders_2023(tmp_path, phantom_cases, tiny_weights):
    out = tmp_path / "out"
    out.mkdir()
    report = tmp_path / "report"
    result = run_cli("infer", "--input", phantom_cases, "--output", out, "--weights", tiny_weights, "--report", report, "--quiet",
                     "--models", "bifpn")
    assert result.exit_code == 0, result.output
    cases = find_cases(phantom_cases).cases
    assert_masks_match_inputs(out, cases, {0, 1, 2, 3})
    for case in cases:
        reference = sitk.ReadImage(str(case.modalities["flair"]))
        data = json.loads((report / f"{case.case_id}.json").read_text())
        assert data["models"] == 1 and data["flips"] == 8 and set(data["slices_suppressed"]) == {"WT", "TC", "ET"}
        assert len(data["slice_probabilities"][0]) == reference.GetSize()[2]
        assert (report / f"{case.case_id}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the QC picture
    assert sorted(p.name for p in report.iterdir()) == sorted(f"{c.case_id}.{ext}" for c in cases for ext in ("json", "png"))
    assert f"{len(cases)} case(s) written" in result.output


def test_a_picture_that_cannot_be_drawn_never_fails_the_case(tmp_path, phantom_cases, tiny_weights, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("matplotlib exploded")

    monkeypatch.setattr("brats_cls.qc.write_qc_figure", broken)
    out, report = tmp_path / "out", tmp_path / "report"
    out.mkdir()
    result = run_cli("infer", "--input", phantom_cases, "--output", out, "--weights", tiny_weights, "--report", report,
                     "--no-tta", "--quiet", "--models", "bifpn")
    assert result.exit_code == 0, result.output
    cases = find_cases(phantom_cases).cases
    assert_masks_match_inputs(out, cases, {0, 1, 2, 3})
    assert not list(report.glob("*.png")) and len(list(report.glob("*.json"))) == len(cases)
    assert any("QC picture not written" in r.getMessage() and "matplotlib exploded" in r.getMessage()
               for r in caplog.records)


def test_cli_on_one_case_lying_flat_2021(tmp_path, phantom_cases_2021, tiny_weights):
    case = find_cases(phantom_cases_2021).cases[0]
    flat = tmp_path / "input"
    flat.mkdir()
    for path in case.paths:
        shutil.copy(path, flat / path.name)
    out = tmp_path / "out"
    out.mkdir()
    result = run_cli("infer", "--input", flat, "--output", out, "--weights", tiny_weights, "--no-tta", "--quiet",
                     "--label-scheme", "2021")
    assert result.exit_code == 0, result.output
    assert [p.name for p in out.iterdir()] == [case.output_name]
    assert set(np.unique(labels_of(out / case.output_name)).tolist()) <= {0, 1, 2, 4}


def test_rotated_anisotropic_geometry_is_copied(tmp_path, phantom_cases_2021, tiny_weights):
    case = find_cases(phantom_cases_2021).cases[0]
    source = tmp_path / "in" / case.case_id
    source.mkdir(parents=True)
    c, s = np.cos(0.4), np.sin(0.4)
    for path in case.paths:
        image = sitk.ReadImage(str(path))
        image.SetSpacing((1.0, 1.0, 1.2))
        image.SetOrigin((12.5, -200.0, 7.0))
        image.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
        sitk.WriteImage(image, str(source / path.name))
    out = tmp_path / "out"
    out.mkdir()
    assert run_cli("infer", "--input", tmp_path / "in", "--output", out, "--weights", tiny_weights, "--no-tta", "--quiet").exit_code == 0
    written = sitk.ReadImage(str(out / case.output_name))
    reference = sitk.ReadImage(str(source / case.paths[0].name))
    assert written.GetSpacing() == reference.GetSpacing() and written.GetOrigin() == reference.GetOrigin()
    np.testing.assert_allclose(written.GetDirection(), reference.GetDirection(), atol=1e-7)


def test_malformed_case_beside_good_ones(tmp_path, phantom_cases, tiny_weights):
    inputs = tmp_path / "in"
    shutil.copytree(phantom_cases, inputs)
    broken = find_cases(inputs).cases[0]
    broken.modalities["t1ce"].write_bytes(broken.modalities["t1ce"].read_bytes()[:500])  # truncated
    missing = find_cases(inputs).cases[1]
    missing.modalities["t2"].unlink()
    out = tmp_path / "out"
    out.mkdir()
    result = run_cli("infer", "--input", inputs, "--output", out, "--weights", tiny_weights, "--no-tta", "--quiet")
    assert result.exit_code == 1
    good = [c for c in find_cases(inputs).cases if c.case_id != broken.case_id]
    assert sorted(p.name for p in out.iterdir()) == sorted(c.output_name for c in good)
    assert broken.case_id in result.output and missing.case_id in result.output and "2 failed" in result.output


def test_usage_errors_exit_2(tmp_path, phantom_cases, tiny_weights):
    out = tmp_path / "out"
    out.mkdir()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli("infer", "--input", empty, "--output", out, "--weights", tiny_weights).exit_code == 2
    assert run_cli("infer", "--input", phantom_cases, "--output", tmp_path / "nope", "--weights", tiny_weights).exit_code == 2
    assert run_cli("infer", "--input", phantom_cases, "--output", out, "--weights", tmp_path / "noweights").exit_code == 2
    result = run_cli("infer", "--input", phantom_cases, "--output", out, "--weights", tiny_weights, "--report", out)
    assert result.exit_code == 2 and "must not be in the output folder" in result.output
    result = run_cli("infer", "--input", phantom_cases, "--output", out, "--weights", tiny_weights,
                     "--failures", out / "failures.json")
    assert result.exit_code == 2 and "--failures must not be in the output folder" in result.output
    assert list(out.iterdir()) == []


def test_same_case_twice_gives_identical_bytes_and_skip_existing(tmp_path, phantom_cases, tiny_weights):
    outputs = []
    for name in ("a", "b"):
        out = tmp_path / name
        out.mkdir()
        assert run_cli("infer", "--input", phantom_cases, "--output", out, "--weights", tiny_weights, "--no-tta", "--quiet",
                       "--models", "bifpn").exit_code == 0
        outputs.append(out)
    for path in outputs[0].iterdir():
        assert path.read_bytes() == (outputs[1] / path.name).read_bytes()
    # A damaged output is recomputed, intact ones are skipped.
    first = sorted(outputs[1].iterdir())[0]
    first.write_bytes(b"garbage")
    result = run_cli("infer", "--input", phantom_cases, "--output", outputs[1], "--weights", tiny_weights, "--no-tta",
                     "--quiet", "--skip-existing", "--models", "bifpn")
    assert result.exit_code == 0 and "1 case(s) written" in result.output
    assert first.read_bytes() == (outputs[0] / first.name).read_bytes()


def test_predictor_keeps_models_and_the_report_shows_agreement_and_stage_times(tmp_path, phantom_cases, tiny_weights):
    models, entries = load_ensemble(tiny_weights)
    out, report = tmp_path / "out", tmp_path / "report"
    out.mkdir()
    report.mkdir()
    case = find_cases(phantom_cases).cases[0]
    prediction = Predictor(models, tta=False).predict(case)
    assert prediction.labels.shape == prediction.geometry.shape
    summary = run_inference(find_cases(case.folder), out, Predictor(models, tta=False), [e["name"] for e in entries],
                            RunOptions(report_dir=report, progress=False))
    assert summary.written == [case.case_id]
    data = json.loads((report / f"{case.case_id}.json").read_text())
    assert set(data["model_wt_dice_vs_ensemble"]) == {e["name"] for e in entries}
    assert all(0.0 <= v <= 1.0 for v in data["model_wt_dice_vs_ensemble"].values())
    assert set(data["seconds"]) == {"read", "preprocess", "logits", "decide", "uncrop", "write"}
    assert data["precision"] in ("fp32", "bf16") and data["threshold"] == 0.5 and data["engine"] == "eager"


def test_run_inference_reports_discovery_errors_and_writes_the_failures_file(tmp_path, phantom_cases, tiny_weights):
    inputs = tmp_path / "in"
    shutil.copytree(phantom_cases, inputs)
    case = find_cases(inputs).cases[0]
    shutil.copy(case.modalities["t1"], case.modalities["t1"].with_name(case.modalities["t1"].name[:-3]))  # .nii duplicate
    out = tmp_path / "out"
    out.mkdir()
    models, entries = load_ensemble(tiny_weights, "bifpn:0")
    failures = tmp_path / "failures.json"
    summary = run_inference(find_cases(inputs), out, Predictor(models, tta=False),
                            options=RunOptions(progress=False, failures_path=failures))
    assert case.case_id in summary.failed and "duplicated" in summary.failed[case.case_id]
    assert summary.exit_code == 1 and len(summary.written) == len(find_cases(phantom_cases).cases) - 1
    recorded = json.loads(failures.read_text())
    assert recorded["written"] == summary.written and set(recorded["failed"]) == {case.case_id}


def labelling_weights(folder: Path) -> Path:
    """A real checkpoint whose masks hold every label: its segmentation head calls every voxel whole
    tumour (bias +10) and splits core and enhancing tumour by the sign of random feature mixtures;
    its classifier calls every slice positive. Loaded through the manifest like any weights."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(7)
    model = build_model("bifpn", "tiny")
    with torch.no_grad():
        model.seg_head.weight[0].zero_()
        model.seg_head.bias.copy_(torch.tensor([10.0, 0.0, 0.0]))
        model.seg_head.weight[1:].normal_(0.0, 3.0)
        model.classifier.fc.weight.zero_()
        model.classifier.fc.bias.fill_(10.0)
    save_model(model, folder / "labelling.pt", {"fold": 0})
    write_manifest(folder, [{"name": "labelling", "file": "labelling.pt", "arch": "bifpn", "fold": 0, "size": "tiny"}])
    return folder


@pytest.mark.parametrize("scheme_flag, naming, expected_et", [
    (None, "2023", 3), (None, "2021", 4), ("2021", "2023", 4), ("2023", "2021", 3)])
def test_written_masks_carry_the_et_label_of_the_scheme(tmp_path, phantom_cases, phantom_cases_2021, scheme_flag,
                                                        naming, expected_et):
    weights = labelling_weights(tmp_path / "weights")
    source = phantom_cases if naming == "2023" else phantom_cases_2021
    out = tmp_path / "out"
    out.mkdir()
    flags = ["--label-scheme", scheme_flag] if scheme_flag else []
    result = run_cli("infer", "--input", source, "--output", out, "--weights", weights, "--no-tta", "--quiet", *flags)
    assert result.exit_code == 0, result.output
    for mask in out.iterdir():
        present = set(np.unique(labels_of(mask)).tolist())
        assert {1, 2, expected_et} <= present <= {0, 1, 2, expected_et}, (mask.name, present)


def test_manifest_ensemble_weights_are_applied(tmp_path, phantom_cases, tiny_weights):
    weights = tmp_path / "w"
    shutil.copytree(tiny_weights, weights)
    manifest = json.loads((weights / "manifest.json").read_text())
    for entry in manifest["models"]:
        entry["ensemble_weight"] = 1.0 if entry["arch"] == "bifpn" else 0.0
    write_manifest(weights, manifest["models"])
    outputs = {}
    for name, extra in (("weighted", []), ("bifpn", ["--models", "bifpn"]), ("equal", ["--weights", tiny_weights])):
        out = tmp_path / name
        out.mkdir()
        result = run_cli("infer", "--input", phantom_cases, "--output", out, "--weights", weights, "--no-tta",
                         "--quiet", "--precision", "fp32", *extra)
        assert result.exit_code == 0, result.output
        outputs[name] = {p.name: labels_of(p) for p in out.iterdir()}
    for name, labels in outputs["weighted"].items():  # a zero weight: as if the UNet++ were not there
        np.testing.assert_array_equal(labels, outputs["bifpn"][name])
    assert any(not np.array_equal(labels, outputs["equal"][name]) for name, labels in outputs["weighted"].items())
    # ... and it is neither loaded nor run; selected alone, the UNet++ models run with equal weights
    models, entries = load_ensemble(weights, skip_unweighted=True)
    assert [e["arch"] for e in entries] == ["bifpn"] * len(models) and len(models) >= 1
    assert len(load_ensemble(weights)[0]) == len(manifest["models"]) > len(models)
    _, alone = load_ensemble(weights, "unetpp", skip_unweighted=True)
    assert alone and {e["arch"] for e in alone} == {"unetpp"}
    report = tmp_path / "report"
    (tmp_path / "reported").mkdir()
    result = run_cli("infer", "--input", phantom_cases, "--output", tmp_path / "reported", "--weights", weights,
                     "--no-tta", "--quiet", "--precision", "fp32", "--report", report)
    assert result.exit_code == 0, result.output
    assert list(report.glob("*.json"))
    for path in report.glob("*.json"):
        written = json.loads(path.read_text())
        assert written["models"] == len(models)
        assert sorted(written["model_wt_dice_vs_ensemble"]) == sorted(e.get("name", e["file"]) for e in entries)


def test_every_cropped_brats_size_brain_runs_whole_by_default():
    """Sliding windows just above the cap cost ~4x (predictor's Memory bullet): the default cap holds
    the padded brain crops of 240 x 240 x 155 cases of other geometries (seen: up to 160 x 208 x 176)."""
    from brats_cls.predictor import DEFAULT_MAX_WHOLE_VOXELS

    predictor = Predictor([build_model("bifpn", "tiny").eval()])
    for shape in ((160, 208, 160), (160, 176, 176), (160, 224, 176)):
        assert int(np.prod(shape)) <= predictor.max_whole_voxels == DEFAULT_MAX_WHOLE_VOXELS
    assert 240 * 240 * 160 > DEFAULT_MAX_WHOLE_VOXELS  # an uncropped field of view still goes to windows


def test_cli_engine_option_runs_the_networks_through_that_engine(tmp_path, phantom_cases, tiny_weights):
    """``infer --engine onnxruntime`` exports into --engine-cache and writes the masks eager writes."""
    pytest.importorskip("onnxruntime")
    outputs = {}
    for engine in ("eager", "onnxruntime"):
        out = tmp_path / engine
        out.mkdir()
        result = run_cli("infer", "--input", phantom_cases, "--output", out, "--weights", tiny_weights, "--quiet",
                         "--no-tta", "--precision", "fp32", "--engine", engine, "--engine-cache", tmp_path / "cache")
        assert result.exit_code == 0, result.output
        outputs[engine] = {path.name: labels_of(path) for path in sorted(out.iterdir())}
        assert ("with onnxruntime" in result.output) == (engine == "onnxruntime")
    assert outputs["eager"].keys() == outputs["onnxruntime"].keys() and outputs["eager"]
    for name, labels in outputs["eager"].items():
        assert np.mean(labels == outputs["onnxruntime"][name]) >= 0.999, name
    assert list((tmp_path / "cache").rglob("*.onnx"))  # the graphs went where --engine-cache said
    result = run_cli("infer", "--input", phantom_cases, "--output", tmp_path / "eager", "--weights", tiny_weights,
                     "--engine", "tensorrt")
    assert result.exit_code == 2 and "tensorrt" in result.output
