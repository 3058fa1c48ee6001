"""The shipped models: manifest consistent, checksums right, every model loads and runs."""

import json

import numpy as np
import pytest

from brats_cls.predictor import Predictor
from brats_cls.models.registry import count_parameters
from brats_cls.weights import default_weights_dir, load_ensemble

WEIGHTS = default_weights_dir()


def manifest():
    path = WEIGHTS / "manifest.json"
    assert path.is_file(), f"no shipped weights: {path} is missing (scripts/train_shipped_weights.py makes it)"
    return json.loads(path.read_text())["models"]


def test_manifest_entries_are_distinct_folds_of_known_architectures():
    # scripts/train_shipped_weights.py fills weights/ model by model (all BiFPN folds, then UNet++);
    # README.md says how many of the ten are shipped now.
    entries = manifest()
    pairs = [(e["arch"], e["fold"]) for e in entries]
    assert entries and len(set(pairs)) == len(pairs)
    assert set(pairs) <= {(arch, fold) for arch in ("bifpn", "unetpp") for fold in range(5)}
    for entry in entries:
        training = entry["training"]
        assert entry["file"] == f"{entry['arch']}_fold{entry['fold']}.pt" and entry["size"] == "demo"
        assert training["epochs"] >= 1 and training["training_cases"] >= 40
        assert set(training["best_validation_dice"]) >= {"WT", "TC", "ET", "mean"}
        assert "phantom" in training["data"]
        if "parent" in training:  # a warm start records what it grew from and how far
            parent = training["parent"]
            assert len(parent["sha256"]) == 64 and parent["file"] == entry["file"]
            assert training["steps"] == parent["steps"] + training["steps_added"] and training["steps_added"] > 0
            assert parent["recipe_tag"] != training["recipe_tag"]


def test_weights_folder_is_small_enough_for_the_image():
    total = sum(path.stat().st_size for path in WEIGHTS.iterdir())
    assert total <= 60 * 1024 * 1024


def test_every_model_loads_after_its_checksum_and_runs():
    models, entries = load_ensemble(WEIGHTS)
    assert len(models) == len(manifest())
    for model, entry in zip(models, entries):
        assert count_parameters(model) == entry["parameters"]
    volume = np.random.default_rng(0).normal(size=(4, 32, 32, 32)).astype(np.float32)
    logits = Predictor(models, precision="fp32").ensemble(volume)
    assert logits.seg.shape == (3, 32, 32, 32) and logits.slices.shape == (3, 32)
    assert np.all(np.isfinite(logits.seg))


@pytest.mark.parametrize("arch", ["bifpn", "unetpp"])
def test_training_summary_shows_learning(arch):
    # Validation Dice on phantom cases, recorded at training time: well above an untrained model's 0.
    best = [e["training"]["best_validation_dice"]["WT"] for e in manifest() if e["arch"] == arch]
    if not best:
        pytest.skip(f"no {arch} model shipped yet")
    assert min(best) > 0.3
