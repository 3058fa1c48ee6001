"""Training: losses against hand computations, schedules, augmentation, cache, folds, the loop
(resume exactness, two-process DDP), and the preprocess/train commands."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from click.testing import CliRunner

from brats_cls.cases import find_cases
from brats_cls.cli import main
from brats_cls.io import read_case, read_label
from brats_cls.models.registry import load_model
from brats_cls.preprocess import crop_and_pad, preprocess
from brats_cls.regions import labels_to_regions, slice_targets
from brats_cls.training.augment import (NO_AUGMENTATION, Augmentation, crop_windows, random_crop, random_flip,
                                        random_intensity, training_sample, tumour_voxel)
from brats_cls.training.data import (CropDataset, EpochSampler, TrainingDataError, labelled_cases, make_folds,
                                     open_cache, preprocess_dataset, split_fold)
from brats_cls.training.losses import LOSS_TERMS, PaperLoss, focal_loss, soft_dice_loss
from brats_cls.device import DeviceError, resolve_precision
from brats_cls.regions import dice_score
from brats_cls.training.loop import TrainOptions, train
from brats_cls.training.recipe import RECIPES, recipe_for
from brats_cls.training.schedules import WarmupDecay, make_scheduler, warmup_epochs

# ------------------------------------------------------------------------------------------ losses


def test_dice_loss_is_paper_eq1_over_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, 6)
    target = (torch.rand(2, 3, 4, 5, 6) > 0.7).float()
    p = torch.sigmoid(logits).double()
    g = target.double()
    # eq. 1 per region, sums over batch and voxels, then the mean of the three regions
    per_region = 1 - 2 * (p * g).sum((0, 2, 3, 4)) / ((p**2).sum((0, 2, 3, 4)) + (g**2).sum((0, 2, 3, 4)) + 1e-5)
    assert soft_dice_loss()(logits, target).item() == pytest.approx(per_region.mean().item(), rel=1e-5)


def test_dice_loss_of_a_perfect_prediction_is_near_zero_and_of_empty_truth_is_one():
    target = torch.zeros(1, 3, 4, 4, 4)
    target[:, :, 1:3, 1:3, 1:3] = 1
    assert soft_dice_loss()(target * 40 - 20, target).item() < 1e-6
    assert soft_dice_loss()(torch.randn(1, 3, 4, 4, 4), torch.zeros(1, 3, 4, 4, 4)).item() == pytest.approx(1.0)


def test_focal_loss_is_paper_eq2_with_alpha_quarter_gamma_two():
    logits = torch.tensor([[[2.0, -1.0, 0.5, -3.0]]])
    target = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])
    p = torch.sigmoid(logits)
    p_t = torch.where(target > 0, p, 1 - p)
    alpha_t = torch.where(target > 0, 0.25, 0.75)
    expected = (-alpha_t * (1 - p_t) ** 2 * torch.log(p_t)).mean()
    assert focal_loss()(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)


def test_region_weights_multiply_each_regions_segmentation_terms_and_default_to_the_paper():
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 4, 5, 6)
    target = (torch.rand(2, 3, 4, 5, 6) > 0.7).float()
    p, g = torch.sigmoid(logits).double(), target.double()
    per_region = 1 - 2 * (p * g).sum((0, 2, 3, 4)) / ((p**2).sum((0, 2, 3, 4)) + (g**2).sum((0, 2, 3, 4)) + 1e-5)
    weights = torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64)
    assert soft_dice_loss((1, 1, 2))(logits, target).item() == pytest.approx((per_region * weights).mean().item(),
                                                                             rel=1e-5)
    per_region_focal = torch.stack([focal_loss()(logits[:, [c]], target[:, [c]]) for c in range(3)])
    assert focal_loss(0.25, (1, 1, 2))(logits, target).item() == pytest.approx(
        (per_region_focal * weights.float()).mean().item(), rel=1e-5)
    slices = slice_targets_torch(target)
    outputs = {"seg": logits, "slices": torch.randn(2, 3, 4)}
    paper, weighted = PaperLoss()(outputs, target, slices)[1], PaperLoss((1, 1, 2))(outputs, target, slices)[1]
    assert paper["dice"].item() == pytest.approx(per_region.mean().item(), rel=1e-5)
    assert weighted["dice"].item() > paper["dice"].item()
    for name in ("focal_cls", "bce"):  # the slice terms are not weighted
        assert weighted[name].item() == pytest.approx(paper[name].item(), rel=1e-6)
    assert recipe_for("bifpn", "demo").region_weights == (1.0, 1.0, 1.0)
    assert recipe_for("bifpn", "demo", region_weights=[1, 1, 2]).to_dict()["region_weights"] == [1.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="region weights"):
        PaperLoss((1, 0, 1))
    with pytest.raises(ValueError, match="region weights"):
        recipe_for("bifpn", "demo", region_weights=(1, 1))


def test_total_loss_is_the_sum_of_four_terms_and_deep_heads_are_averaged():
    torch.manual_seed(1)
    regions = (torch.rand(2, 3, 8, 8, 8) > 0.8).float()
    slices = slice_targets_torch(regions)
    heads = [torch.randn(2, 3, 8, 8, 8) for _ in range(4)]
    slice_logits = torch.randn(2, 3, 8)
    criterion = PaperLoss()
    total, terms = criterion({"seg": torch.stack(heads).mean(0), "slices": slice_logits, "deep": heads}, regions, slices)
    assert set(terms) == set(LOSS_TERMS)
    assert total.item() == pytest.approx(sum(terms[name].item() for name in LOSS_TERMS), rel=1e-6)
    singles = [criterion({"seg": head, "slices": slice_logits}, regions, slices)[1] for head in heads]
    for name in ("dice", "focal_seg"):
        assert terms[name].item() == pytest.approx(np.mean([s[name].item() for s in singles]), rel=1e-6)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(slice_logits, slices)
    assert terms["bce"].item() == pytest.approx(bce.item(), rel=1e-6)


def slice_targets_torch(regions: torch.Tensor) -> torch.Tensor:
    return regions.flatten(3).amax(3)  # (B, 3, D, H, W) -> (B, 3, D)


# --------------------------------------------------------------------------------------- schedules


def test_warmup_is_the_papers_ten_epochs_scaled_down_for_short_runs():
    assert [warmup_epochs(e) for e in (200, 300, 50, 10, 9, 2)] == [10, 10, 5, 1, 0, 0]


def test_cosine_and_polynomial_schedules_after_linear_warmup():
    cosine = WarmupDecay("cosine", total_steps=110, warmup_steps=10)
    assert [cosine(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert cosine(10) == pytest.approx(1.0)
    assert cosine(60) == pytest.approx(0.5)  # eq. 4 at t = T/2
    assert cosine(110) == pytest.approx(0.0, abs=1e-12)
    poly = WarmupDecay("poly", total_steps=110, warmup_steps=10)
    assert poly(35) == pytest.approx((1 - 25 / 100) ** 0.9)  # eq. 5
    assert poly(109) == pytest.approx((1 / 100) ** 0.9)
    with pytest.raises(ValueError):
        WarmupDecay("step", 10, 0)


def test_scheduler_steps_per_batch_and_restores_from_its_state():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([parameter], lr=1e-3)
    scheduler = make_scheduler(optimizer, "cosine", total_steps=100, warmup_steps=10)
    rates = []
    for _ in range(30):
        optimizer.step()
        scheduler.step()
        rates.append(scheduler.get_last_lr()[0])
    assert rates[8] == pytest.approx(1e-3)  # step 9 = last warm-up batch
    assert rates[0] == pytest.approx(2e-4)
    restored = make_scheduler(torch.optim.Adam([parameter], lr=1e-3), "cosine", total_steps=100, warmup_steps=10)
    restored.load_state_dict(scheduler.state_dict())
    assert restored.get_last_lr() == scheduler.get_last_lr()


def test_recipes_are_the_papers_and_multiples_of_16():
    assert RECIPES["bifpn"]["paper"].crop == (96, 128, 128) and RECIPES["bifpn"]["paper"].batch_size == 4
    assert RECIPES["unetpp"]["paper"].crop == (128, 128, 128) and RECIPES["unetpp"]["paper"].batch_size == 2
    assert RECIPES["bifpn"]["paper"].schedule == "cosine" and RECIPES["unetpp"]["paper"].schedule == "poly"
    assert all(RECIPES[arch]["paper"].epochs == 200 and RECIPES[arch]["paper"].steps_per_epoch is None
               for arch in RECIPES)
    assert all(r.learning_rate == 1e-3 for arch in RECIPES for r in RECIPES[arch].values())
    assert all(RECIPES[arch]["paper"].augmentation_kind == "paper" for arch in RECIPES)
    # the demo budget is counted in optimiser steps
    assert all(RECIPES[arch]["demo"].epochs * RECIPES[arch]["demo"].steps_per_epoch == 5000 for arch in RECIPES)
    assert recipe_for("unetpp", {"filters": [4, 4, 8, 8, 16]}, epochs=3).crop == (128, 128, 128)
    with pytest.raises(ValueError):
        recipe_for("bifpn", "demo", crop=(40, 32, 32))


# ------------------------------------------------------------------------------------ augmentation


def _volume(shape=(20, 24, 28)):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(4, *shape)).astype(np.float32)
    image[:, :, :3] = 0  # background
    regions = np.zeros((3, *shape), dtype=np.uint8)
    regions[:, 4:9, 10:14, 10:14] = 1
    return image, regions


def test_crop_windows_pad_a_smaller_axis_and_stay_inside_a_larger_one():
    rng = np.random.default_rng(3)
    for _ in range(20):
        source, target = crop_windows((20, 40, 16), (16, 16, 32), rng)
        assert [s.stop - s.start for s in source] == [16, 16, 16]
        assert source[2] == slice(0, 16) and 0 <= target[2].start <= 16
        assert 0 <= source[0].start <= 4 and source[1].stop <= 40


def test_foreground_crops_always_hold_tumour_and_uniform_crops_often_miss_it():
    shape = (64, 64, 64)
    image = np.ones((4, *shape), dtype=np.float32)
    regions = np.zeros((3, *shape), dtype=np.uint8)
    regions[0, 50:54, 2:6, 40:44] = 1  # WT only, near a corner
    regions[2, 52, 3, 41] = 1  # one ET voxel
    rng = np.random.default_rng(11)
    hits = [random_crop(image, regions, (16, 16, 16), rng, foreground_probability=1.0)[1].any() for _ in range(50)]
    assert all(hits)
    uniform = [random_crop(image, regions, (16, 16, 16), rng)[1].any() for _ in range(50)]
    assert sum(uniform) < 25
    # half the crops are placed on tumour: far more hits than uniform crops, but not all of them
    half = [random_crop(image, regions, (16, 16, 16), rng, foreground_probability=0.5)[1].any() for _ in range(200)]
    assert sum(uniform) * 4 < sum(half) < 200
    # the voxel is picked per non-empty region: the single ET voxel comes up about half the time
    picks = [tumour_voxel(regions, rng) for _ in range(400)]
    assert 150 < picks.count((52, 3, 41)) < 250
    assert tumour_voxel(np.zeros((3, 4, 4, 4), np.uint8), rng) is None
    # a crop containing a voxel, where the axis allows any placement: uniform among the valid starts
    starts = {crop_windows((64, 64, 64), (16, 16, 16), rng, contains=(5, 60, 30))[0][0].start for _ in range(300)}
    assert starts == set(range(0, 6))


def test_paper_recipe_keeps_uniform_crops_and_demo_places_half_on_tumour():
    assert all(RECIPES[arch]["paper"].foreground_crop == 0.0 for arch in RECIPES)
    assert all(RECIPES[arch]["demo"].foreground_crop == 0.5 for arch in RECIPES)
    with pytest.raises(ValueError):
        recipe_for("bifpn", "demo", foreground_crop=1.5)


def test_training_sample_crops_and_recomputes_slice_targets_from_the_crop():
    image, regions = _volume()  # tumour on slices 4..8
    out_image, out_regions, slices = training_sample(image, regions, (16, 16, 32), np.random.default_rng(5))
    assert out_image.shape == (4, 16, 16, 32) and out_image.dtype == np.float32
    assert out_regions.shape == (3, 16, 16, 32) and out_regions.dtype == np.uint8
    np.testing.assert_array_equal(slices, slice_targets(out_regions))
    # without augmentation the sample is exactly the window crop_windows draws from the same generator
    for seed in range(20):
        image_crop, region_crop, targets = training_sample(image, regions, (8, 16, 32), np.random.default_rng(seed),
                                                           NO_AUGMENTATION)
        source, target = crop_windows(image.shape[1:], (8, 16, 32), np.random.default_rng(seed))
        np.testing.assert_array_equal(image_crop[(slice(None), *target)], image[(slice(None), *source)])
        np.testing.assert_array_equal(region_crop[(slice(None), *target)], regions[(slice(None), *source)])
        # a slice of the crop is positive exactly when it is one of the tumour's slices 4..8
        first = source[0].start - target[0].start
        expected = [(4 <= first + k <= 8 and target[0].start <= k < target[0].stop) for k in range(8)]
        assert targets[0].astype(bool).tolist() == expected


def test_flip_along_d_reverses_the_slice_targets():
    image, regions = _volume()
    flipped_image, flipped_regions = random_flip(image, regions, np.random.default_rng(0), probability=1.0)
    np.testing.assert_array_equal(flipped_image, image[:, ::-1, ::-1, ::-1])
    np.testing.assert_array_equal(slice_targets(flipped_regions), slice_targets(regions)[:, ::-1])


def test_intensity_changes_only_foreground_per_channel_within_range():
    image, _ = _volume()
    augmentation = Augmentation(intensity_probability=1.0)
    out = random_intensity(image.copy(), np.random.default_rng(2), augmentation)
    assert np.all(out[image == 0] == 0)
    for channel in range(4):
        mask = image[channel] != 0
        # out = a * x + b on the foreground: fit a and b back
        a, b = np.polyfit(image[channel][mask], out[channel][mask], 1)
        assert 0.9 <= a <= 1.1 and -0.1 <= b <= 0.1
    scales = [np.polyfit(image[c][image[c] != 0], out[c][image[c] != 0], 1)[0] for c in range(4)]
    assert len(set(np.round(scales, 6))) == 4  # one factor per channel
    untouched = random_intensity(image.copy(), np.random.default_rng(2), NO_AUGMENTATION)
    np.testing.assert_array_equal(untouched, image)


def test_augmentation_is_reproducible_from_its_generator():
    image, regions = _volume()
    first = training_sample(image, regions, (16, 16, 16), np.random.default_rng([1, 2, 3]))
    second = training_sample(image, regions, (16, 16, 16), np.random.default_rng([1, 2, 3]))
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


# -------------------------------------------------------------------------------- folds, sampler


def test_folds_are_deterministic_disjoint_and_balanced():
    ids = [f"case{i:03d}" for i in range(23)]
    folds = make_folds(list(reversed(ids)), seed=7)
    assert folds == make_folds(ids, seed=7)
    assert folds != make_folds(ids, seed=8)
    assert sorted(sum(folds, [])) == ids
    assert {len(f) for f in folds} == {4, 5}
    training, validation = split_fold(folds, 2)
    assert validation == folds[2] and not set(training) & set(validation) and len(training) + len(validation) == 23
    with pytest.raises(TrainingDataError):
        split_fold(folds, 5)
    with pytest.raises(TrainingDataError):
        make_folds(ids[:4])


def test_epoch_sampler_shards_ranks_and_repeats_with_fresh_keys():
    ranks = [list(EpochSampler(5, seed=1, rank=r, world_size=2, samples_per_rank=4)) for r in (0, 1)]
    keys = ranks[0] + ranks[1]
    assert len(set(keys)) == 8  # no key twice: a repeated case gets another augmentation
    assert sorted({k % 5 for k in keys}) == [0, 1, 2, 3, 4]
    sampler = EpochSampler(5, seed=1)
    first = list(sampler)
    sampler.set_epoch(1)
    assert sorted(first) == [0, 1, 2, 3, 4] and list(sampler) != first


# --------------------------------------------------------------------------------------- cache


@pytest.fixture(scope="module")
def five_cases(phantom_cases, phantom_cases_2021, tmp_path_factory):
    """Five labelled cases (three 2023-named, one healthy; two 2021-named) in one folder."""
    folder = tmp_path_factory.mktemp("five_cases")
    for source in (phantom_cases, phantom_cases_2021):
        for case_dir in source.iterdir():
            shutil.copytree(case_dir, folder / case_dir.name)
    return folder


@pytest.fixture(scope="module")
def five_cache(five_cases, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    preprocess_dataset(five_cases, cache, progress=False)
    return cache


def test_cache_holds_exactly_the_inference_preprocessing(five_cases, five_cache):
    for case in find_cases(five_cases).cases:
        images = read_case(case)
        volume, box = preprocess(images.image)
        regions = crop_and_pad(labels_to_regions(read_label(case.seg, case.case_id), case.scheme), box)
        entry = open_cache(five_cache, [case.case_id])[0]
        assert entry.crop_box == box and entry.meta["scheme"] == case.scheme
        np.testing.assert_array_equal(entry.load("image"), volume.astype(np.float16))
        np.testing.assert_array_equal(entry.load("regions"), regions)
        np.testing.assert_array_equal(entry.load("slices"), slice_targets(regions))
    healthy = open_cache(five_cache, ["BraTS-GLI-00003-000"])[0]
    assert not healthy.load("regions").any()


def test_rerun_skips_intact_cases_and_rebuilds_damaged_ones(five_cases, five_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(five_cache, cache)
    stamps = {p: p.stat().st_mtime_ns for p in cache.glob("*/image.npy")}
    damaged = cache / "BraTS2021_00001" / "regions.npy"
    with open(damaged, "r+b") as handle:  # flip one byte, same size
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 1]))
    preprocess_dataset(five_cases, cache, progress=False)
    for path, stamp in stamps.items():
        rebuilt = path.parent.name == "BraTS2021_00001"
        assert (path.stat().st_mtime_ns != stamp) == rebuilt, path
    np.testing.assert_array_equal(np.load(damaged), np.load(five_cache / "BraTS2021_00001" / "regions.npy"))
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary left


def test_cache_keeps_the_raw_foreground_statistics_that_shading_needs(five_cases, five_cache, tmp_path):
    for case in find_cases(five_cases).cases:
        entry = open_cache(five_cache, [case.case_id])[0]
        raw = read_case(case).image.astype(np.float64)
        for channel in range(4):
            foreground = raw[channel][raw[channel] != 0]
            assert entry.meta["intensity"]["mean"][channel] == pytest.approx(foreground.mean(), rel=1e-9)
            assert entry.meta["intensity"]["std"][channel] == pytest.approx(foreground.std(), rel=1e-9)
            assert entry.variation[channel] == pytest.approx(foreground.std() / foreground.mean(), rel=1e-9)
    shading = RECIPES["bifpn"]["demo"].augmentation()
    assert shading.bias_probability > 0
    CropDataset(open_cache(five_cache), (32, 32, 32), augmentation=shading)[0]
    # a cache written before the statistics existed is refused by the shading augmentation, naming a case
    old = tmp_path / "old"
    shutil.copytree(five_cache, old)
    for meta_path in old.glob("*/meta.json"):
        meta = json.loads(meta_path.read_text())
        del meta["intensity"]
        meta_path.write_text(json.dumps(meta))
    with pytest.raises(TrainingDataError, match="BraTS.* predates the intensity statistics"):
        CropDataset(open_cache(old), (32, 32, 32), augmentation=shading)
    CropDataset(open_cache(old), (32, 32, 32))  # the paper's augmentation does not need them


def test_crop_dataset_gives_tensors_of_the_crop(five_cache):
    dataset = CropDataset(open_cache(five_cache), (32, 32, 32), seed=3)
    sample = dataset[0]
    assert sample["image"].shape == (4, 32, 32, 32) and sample["image"].dtype == torch.float32
    assert sample["regions"].shape == (3, 32, 32, 32) and sample["slices"].shape == (3, 32)
    torch.testing.assert_close(sample["slices"], slice_targets_torch(sample["regions"][None])[0])
    assert not torch.equal(dataset[0]["image"], dataset[5]["image"])  # key 5 = case 0, another draw


def test_unlabelled_or_empty_data_is_refused_before_any_work(phantom_cases, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(phantom_cases, data)
    (data / "BraTS-GLI-00002-000" / "BraTS-GLI-00002-000-seg.nii.gz").unlink()
    with pytest.raises(TrainingDataError, match="BraTS-GLI-00002-000.*no ground-truth label"):
        labelled_cases(data)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingDataError, match="no labelled BraTS case"):
        labelled_cases(tmp_path / "empty")


def test_dice_score_known_answers():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert dice_score(a, b) == 1.0
    a[0, :2] = True
    assert dice_score(a, b) == 0.0
    b[0, 1:4] = True
    assert dice_score(a, b) == pytest.approx(2 * 1 / 5)


# ---------------------------------------------------------------------------------------- loop


def _tiny(arch="bifpn", **changes) -> TrainOptions:
    values = dict(arch=arch, size="tiny", fold=0, epochs=2, seed=11, workers=0, steps_per_epoch=1,
                  device="cpu", progress=False, precision="fp32")
    values.update(changes)
    return TrainOptions(**values)


def _weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_continues_exactly(five_cache, tmp_path):
    straight = train(_tiny(), tmp_path / "straight", cache_dir=five_cache)
    train(_tiny(), tmp_path / "split", cache_dir=five_cache, stop_after=1)
    state = torch.load(tmp_path / "split" / "bifpn-fold0" / "last.pt", weights_only=True)
    assert state["epoch"] == 1
    resumed = train(_tiny(), tmp_path / "split", cache_dir=five_cache, resume=True)
    expected, got = _weights(straight.model), _weights(resumed.model)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
    assert [row["epoch"] for row in resumed.history] == [1, 2]
    assert resumed.history[-1]["loss"] == straight.history[-1]["loss"]
    with pytest.raises(TrainingDataError, match="recipe"):
        train(_tiny(epochs=3), tmp_path / "split", cache_dir=five_cache, resume=True)


def test_warm_start_begins_from_the_parent_records_it_and_resumes_only_from_it(five_cache, tmp_path):
    from brats_cls.models.registry import build_model
    from brats_cls.training.loop import warm_start
    from brats_cls.weights import sha256_of

    parent_run = train(_tiny(epochs=1, seed=3), tmp_path / "parent", cache_dir=five_cache)
    parent = tmp_path / "parent" / "bifpn-fold0" / "best.pt"
    fresh = build_model("bifpn", "tiny")
    assert any(not torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), parent_run.model.state_dict().values()))
    record = warm_start(fresh, parent)
    for name, value in load_model(parent)[0].state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    assert record == {"file": "best.pt", "sha256": sha256_of(parent)}
    child = train(_tiny(epochs=2, init=parent), tmp_path / "child", cache_dir=five_cache, stop_after=1)
    scratch = train(_tiny(epochs=2), tmp_path / "scratch", cache_dir=five_cache, stop_after=1)
    assert child.history[0]["loss"] != scratch.history[0]["loss"]  # another start, same data
    assert json.loads((tmp_path / "child" / "bifpn-fold0" / "run.json").read_text())["init"] == record
    other = tmp_path / "other.pt"
    shutil.copyfile(tmp_path / "scratch" / "bifpn-fold0" / "best.pt", other)
    with pytest.raises(TrainingDataError, match="init changed"):
        train(_tiny(epochs=2, init=other), tmp_path / "child", cache_dir=five_cache, resume=True)
    resumed = train(_tiny(epochs=2, init=parent), tmp_path / "child", cache_dir=five_cache, resume=True)
    assert [row["epoch"] for row in resumed.history] == [1, 2]
    unetpp = train(_tiny("unetpp", epochs=1), tmp_path / "unetpp", cache_dir=five_cache)
    assert unetpp.history
    with pytest.raises(TrainingDataError, match="another network"):
        train(_tiny(epochs=1, init=tmp_path / "unetpp" / "unetpp-fold0" / "best.pt"), tmp_path / "x", cache_dir=five_cache)
    # the command: --init takes a file, or a folder's <arch>_fold<N>.pt
    folder = tmp_path / "weights"
    folder.mkdir()
    shutil.copyfile(parent, folder / "bifpn_fold1.pt")
    args = ["train", "--cache", str(five_cache), "--arch", "bifpn", "--size", "tiny", "--epochs", "1",
            "--steps-per-epoch", "1", "--workers", "0", "--device", "cpu", "--lr", "2e-4", "-q", "--init", str(folder)]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "cli"), "--fold", "1"])
    assert result.exit_code == 0, result.output
    run_json = json.loads((tmp_path / "cli" / "bifpn-fold1" / "run.json").read_text())
    assert run_json["init"]["sha256"] == record["sha256"] and run_json["recipe"]["learning_rate"] == 2e-4
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "cli2"), "--fold", "2"])
    assert result.exit_code == 2 and "no bifpn_fold2.pt" in result.output


def test_unetpp_run_writes_checkpoints_log_plot_and_splits(five_cache, tmp_path):
    result = train(_tiny("unetpp", epochs=1, fold=3), tmp_path, cache_dir=five_cache)
    run = tmp_path / "unetpp-fold3"
    assert {"last.pt", "best.pt", "log.csv", "curves.png", "run.json"} <= {p.name for p in run.iterdir()}
    model, metadata = load_model(run / "best.pt")
    assert model.arch == "unetpp" and metadata["fold"] == 3
    assert set(metadata["val_dice"]) == {"WT", "TC", "ET", "mean"}
    splits = json.loads((tmp_path / "splits.json").read_text())
    assert metadata["validation_cases"] == splits["folds"][3]
    header, row = (run / "log.csv").read_text().splitlines()
    assert header.split(",")[:7] == ["epoch", "step", "loss", "dice", "focal_seg", "focal_cls", "bce"]
    assert row.split(",")[:2] == ["1", "1"] and math.isfinite(float(row.split(",")[2]))
    assert 0 <= result.history[0]["val_dice_mean"] <= 1 and 0 <= result.history[0]["val_cls_dice_mean"] <= 1
    assert metadata["val_cls_dice"]["mean"] == result.history[0]["val_cls_dice_mean"]


def test_bf16_training_runs_on_cpu_keeps_float32_weights_and_records_precision_and_auto_is_fp32(five_cache, tmp_path):
    fp32 = train(_tiny(epochs=1, precision="auto"), tmp_path / "fp32", cache_dir=five_cache)  # auto: fp32 here
    bf16 = train(_tiny(epochs=1, precision="bf16"), tmp_path / "bf16", cache_dir=five_cache)
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())
    assert math.isfinite(bf16.history[0]["loss"])
    # same data, same initial weights, different arithmetic: close losses, different weights
    assert bf16.history[0]["loss"] == pytest.approx(fp32.history[0]["loss"], rel=0.05)
    assert any(not torch.equal(a, b) for a, b in zip(fp32.model.state_dict().values(), bf16.model.state_dict().values()))
    assert json.loads((tmp_path / "bf16" / "bifpn-fold0" / "run.json").read_text())["precision"] == "bf16"
    # training on the CPU: `auto` is float32 (bf16 was slower and diverged; see brats_cls.device)
    assert json.loads((tmp_path / "fp32" / "bifpn-fold0" / "run.json").read_text())["precision"] == "fp32"
    assert resolve_precision("auto", torch.device("cpu"), training=True) == "fp32"
    with pytest.raises(DeviceError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", torch.device("cpu"))
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cpu")) in ("fp32", "bf16")


def _ddp_worker(rank: int, port: int, cache: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    result = train(_tiny(epochs=1, steps_per_epoch=2, batch_size=1), out, cache_dir=cache)
    torch.save(_weights(result.model), os.path.join(out, f"rank{rank}.pt"))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_process_ddp_ends_with_identical_weights(five_cache, tmp_path):
    mp.spawn(_ddp_worker, args=(_free_port(), str(five_cache), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    torch.manual_seed(_tiny().seed)  # the initial weights every rank starts from
    initial = _weights(__import__("brats_cls.models.registry", fromlist=["x"]).build_model("bifpn", "tiny"))
    changed = False
    for name in ranks[0]:
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0, msg=name)
        changed |= not torch.equal(ranks[0][name], initial[name])
    assert changed  # they trained from the same seeded start, and stayed in step
    run_json = json.loads((tmp_path / "bifpn-fold0" / "run.json").read_text())
    assert run_json["world_size"] == 2


# ------------------------------------------------------------------------------------- commands


def test_cli_preprocess_then_train(five_cases, tmp_path):
    runner = CliRunner()
    cache = tmp_path / "cache"
    result = runner.invoke(main, ["preprocess", "--data", str(five_cases), "--cache", str(cache), "-q"])
    assert result.exit_code == 0, result.output
    assert "5 case(s) cached" in result.output
    result = runner.invoke(main, ["train", "--cache", str(cache), "--out", str(tmp_path / "out"), "--arch", "bifpn",
                                  "--size", "tiny", "--epochs", "1", "--steps-per-epoch", "1", "--workers", "0",
                                  "--device", "cpu", "--fold", "1", "-q"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "bifpn-fold1" / "best.pt").exists()
    # no --cache, no --data: the data folder comes from $BRATS_DATA and is cached into OUT/cache
    result = runner.invoke(main, ["train", "--out", str(tmp_path / "out2"), "--arch", "unetpp", "--size", "tiny",
                                  "--epochs", "1", "--steps-per-epoch", "1", "--workers", "0", "--device", "cpu",
                                  "--precision", "fp32", "-q"], env={"BRATS_DATA": str(five_cases)})
    assert result.exit_code == 0, result.output
    assert len(open_cache(tmp_path / "out2" / "cache")) == 5
    assert (tmp_path / "out2" / "unetpp-fold0" / "last.pt").exists()


def test_cli_errors_exit_2_before_any_work(phantom_cases, tmp_path):
    runner = CliRunner()
    data = tmp_path / "data"
    shutil.copytree(phantom_cases, data)
    (data / "BraTS-GLI-00001-000" / "BraTS-GLI-00001-000-seg.nii.gz").unlink()
    out = tmp_path / "out"
    result = runner.invoke(main, ["train", "--data", str(data), "--out", str(out), "--arch", "bifpn", "--size", "tiny"])
    assert result.exit_code == 2 and "BraTS-GLI-00001-000" in result.output and "label" in result.output
    assert not out.exists()
    (tmp_path / "empty").mkdir()
    result = runner.invoke(main, ["preprocess", "--data", str(tmp_path / "empty"), "--cache", str(tmp_path / "c")])
    assert result.exit_code == 2 and "no labelled BraTS case" in result.output
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = runner.invoke(main, ["train", "--data", str(phantom_cases), "--out", str(blocker / "out"),
                                  "--arch", "unetpp", "--size", "tiny"])
    assert result.exit_code == 2 and "not writable" in result.output
    assert not (blocker.parent / "cache").exists()


def test_a_non_finite_step_is_skipped_and_an_all_nan_epoch_stops_the_run(five_cache, tmp_path):
    from brats_cls.models.registry import build_model
    from brats_cls.training.loop import TrainingDiverged
    from brats_cls.training.recipe import recipe_for
    from brats_cls.training.step import TrainStep

    torch.manual_seed(0)
    model = build_model("bifpn", "tiny")
    stepper = TrainStep(model, model, recipe_for("bifpn", "tiny"), torch.device("cpu"), "fp32", 10, 0)
    batch = {"image": torch.randn(1, 4, 32, 32, 32), "regions": torch.zeros(1, 3, 32, 32, 32),
             "slices": torch.zeros(1, 3, 32)}
    before = _weights(model)
    poisoned = dict(batch, image=batch["image"].clone())
    poisoned["image"][0, 0, 5, 5, 5] = float("nan")
    loss, _ = stepper.step(poisoned)
    assert math.isnan(loss) and stepper.skipped == 1
    assert all(torch.equal(before[name], value) for name, value in _weights(model).items())  # untouched
    stepper.step(batch)
    assert stepper.skipped == 1 and any(not torch.equal(before[n], v) for n, v in _weights(model).items())
    # a run whose every step is non-finite stops with the reason instead of training on NaN
    diverging = torch.nn.Parameter(torch.tensor(float("nan")))

    class Poisoned(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.poison = inner, diverging

        def forward(self, x):
            return self.inner(x * self.poison)

    import brats_cls.training.loop as loop
    original = loop.build_model
    loop.build_model = lambda arch, size: Poisoned(original(arch, size))
    try:
        with pytest.raises(TrainingDiverged, match="non-finite"):
            train(_tiny(epochs=1), tmp_path / "diverged", cache_dir=five_cache)
        # the CLI names the network and the way out instead of a traceback
        result = CliRunner().invoke(main, ["train", "--cache", str(five_cache), "--out", str(tmp_path / "cli"),
                                           "--arch", "bifpn", "--size", "tiny", "--epochs", "1", "--steps-per-epoch",
                                           "1", "--workers", "0", "--device", "cpu", "--precision", "bf16", "-q"])
        assert result.exit_code == 1 and "bifpn: bifpn-fold0: every step" in result.output, result.output
        assert "--precision fp32" in result.output
    finally:
        loop.build_model = original
