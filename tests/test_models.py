"""The two networks: shapes pinned to Tables 1-3, gradient flow, the slice path, checkpoints, presets."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from brats_cls.cli import main
from brats_cls.models import (ARCHITECTURES, PRESET_NAMES, PRESETS, BiFPNSeg, UNetPlusPlus, build_model,
                              count_parameters, load_model, save_model)
from brats_cls.models.bifpn import FusionNode

META = torch.device("meta")


def _record(model: nn.Module, names: list[str]) -> dict[str, tuple[int, ...]]:
    """Hook the named submodules; the dict fills with their output shapes (batch dim dropped)."""
    shapes: dict[str, tuple[int, ...]] = {}
    modules = dict(model.named_modules())
    for name in names:
        modules[name].register_forward_hook(
            lambda module, inputs, output, name=name: shapes.__setitem__(name, tuple(output.shape[1:])))
    return shapes


def _tiny_input(shape=(32, 16, 16), batch=1, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, *shape, generator=generator)


# ------------------------------------------------------------------ Table 1, BiFPN and its decoder


def test_bifpn_table1_encoder_shapes_at_paper_size():
    model = build_model("bifpn", "paper", device=META)
    pyramid = model.encode(torch.empty(1, 4, 96, 128, 128, device=META))
    assert [tuple(level.shape[1:]) for level in pyramid] == [
        (16, 48, 64, 64), (32, 24, 32, 32), (64, 12, 16, 16), (128, 6, 8, 8)]


def test_bifpn_encoder_block_is_table1_residual_block():
    model = build_model("bifpn", "paper", device=META)
    for block in model.encoder:
        convs = [m for m in block.main.modules() if isinstance(m, nn.Conv3d)]
        assert [c.stride for c in convs] == [(2, 2, 2), (1, 1, 1)]
        assert all(c.kernel_size == (3, 3, 3) for c in convs)
        assert [m.p for m in block.main.modules() if isinstance(m, nn.Dropout)] == [0.1, 0.1]
        assert block.shortcut.stride == (2, 2, 2) and block.shortcut.kernel_size == (3, 3, 3)


def test_bifpn_layers_decoder_and_outputs_at_paper_size():
    model = build_model("bifpn", "paper", device=META).eval()
    assert len(model.bifpn) == 3
    x = torch.empty(1, 4, 96, 128, 128, device=META)
    levels = model.fuse(model.encode(x))
    assert [tuple(level.shape[1:]) for level in levels] == [
        (256, 48, 64, 64), (256, 24, 32, 32), (256, 12, 16, 16), (256, 6, 8, 8)]
    assert tuple(model.decode(levels).shape[1:]) == (1024, 48, 64, 64)
    out = model(x)
    assert set(out) == {"seg", "slices"}
    assert tuple(out["seg"].shape) == (1, 3, 96, 128, 128)
    assert tuple(out["slices"].shape) == (1, 3, 96)


def test_bifpn_decoder_upsample_blocks_per_level():
    """Level k (1/2^k of the input) gets k-1 up-sample blocks; level 1 one conv block, no up-sampling."""
    model = build_model("bifpn", "paper", device=META)
    convs_per_level = [sum(isinstance(m, nn.Conv3d) for m in branch.modules()) for branch in model.decoder]
    assert convs_per_level == [1, 1, 2, 3]
    assert model.seg_head.kernel_size == (1, 1, 1) and model.seg_head.out_channels == 3


def test_bifpn_nodes_fuse_two_inputs_top_down_and_three_bottom_up():
    layer = build_model("bifpn", "paper", device=META).bifpn[0]
    assert [node.fusion_weights.numel() for node in layer.top_down] == [2, 2, 2]
    # the coarsest level has no top-down node, so its output fuses 2 (EfficientDet's P7_out)
    assert [node.fusion_weights.numel() for node in layer.bottom_up] == [3, 3, 2]


def test_fast_normalised_fusion_known_answer():
    node = FusionNode(3, 8, 4)
    with torch.no_grad():
        node.fusion_weights.copy_(torch.tensor([1.0, -1.0, 3.0]))
    expected = torch.tensor([1.0, 0.0, 3.0]) / (4.0 + 1e-4)
    torch.testing.assert_close(node.normalised_weights(), expected)


# ------------------------------------------------------------------ Table 2 / Table 3 classifiers

CLASSIFIER_ROWS = ["classifier.conv_block", "classifier.pool", "classifier.upsample", "classifier.lstm",
                   "classifier.fc"]


def test_bifpn_table2_classifier_rows():
    model = build_model("bifpn", "paper", device=META).eval()
    shapes = _record(model, CLASSIFIER_ROWS)
    model(torch.empty(1, 4, 96, 128, 128, device=META))
    assert shapes == {
        "classifier.conv_block": (512, 48, 64, 64),
        "classifier.pool": (512, 48),
        "classifier.upsample": (512, 96),
        "classifier.lstm": (1024, 96),
        "classifier.fc": (3, 96),
    }
    assert model.classifier.lstm.lstm.num_layers == 2 and model.classifier.lstm.lstm.bidirectional
    assert model.classifier.fc.kernel_size == (1,)


def test_unetpp_table3_classifier_rows():
    model = build_model("unetpp", "paper", device=META).eval()
    shapes = _record(model, CLASSIFIER_ROWS[:2] + CLASSIFIER_ROWS[3:])
    inputs = {}
    model.classifier.register_forward_hook(lambda m, args, out: inputs.__setitem__("x", tuple(args[0].shape[1:])))
    out = model(torch.empty(1, 4, 128, 128, 128, device=META))
    assert inputs["x"] == (128, 128, 128, 128)
    assert shapes == {
        "classifier.conv_block": (256, 128, 128, 128),
        "classifier.pool": (256, 128),
        "classifier.lstm": (512, 128),
        "classifier.fc": (3, 128),
    }
    assert isinstance(model.classifier.upsample, nn.Identity)
    assert model.classifier.lstm.lstm.num_layers == 3
    assert tuple(out["seg"].shape) == (1, 3, 128, 128, 128) and tuple(out["slices"].shape) == (1, 3, 128)


def test_unetpp_nested_nodes_at_paper_size():
    model = build_model("unetpp", "paper", device=META)
    shapes = _record(model, [f"nodes.x{i}_{j}" for i in range(5) for j in range(5 - i)])
    model(torch.empty(1, 4, 64, 64, 64, device=META))
    filters = (32, 64, 128, 256, 512)
    assert len(shapes) == 15
    for name, shape in shapes.items():
        depth = int(name.split("x")[1].split("_")[0])
        assert shape == (filters[depth],) + (64 // 2 ** depth,) * 3, name
    # X(i, j) reads j same-level nodes and the up-sampled node below
    assert model.nodes["x0_4"][0][0].in_channels == 4 * 32 + 64
    assert len(model.heads) == 4 and all(h.kernel_size == (1, 1, 1) for h in model.heads)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_paper_preset_uses_group_norm_with_8_groups(arch):
    model = build_model(arch, "paper", device=META)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) or isinstance(m, nn.GroupNorm)]
    assert norms and all(isinstance(m, nn.GroupNorm) and m.num_groups == 8 for m in norms)


# ------------------------------------------------------------------ real computation, tiny preset


def test_unetpp_deep_supervision_average_in_training_only():
    torch.manual_seed(0)
    model = build_model("unetpp", "tiny").train()
    out = model(_tiny_input(batch=2))
    assert len(out["deep"]) == 4 and all(tuple(d.shape) == (2, 3, 32, 16, 16) for d in out["deep"])
    torch.testing.assert_close(out["seg"], torch.stack(out["deep"]).mean(0))
    assert len({float(d.detach().abs().sum()) for d in out["deep"]}) == 4  # four different heads
    assert "deep" not in model.eval()(_tiny_input())


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_gradients_reach_every_parameter(arch):
    torch.manual_seed(0)
    model = build_model(arch, "tiny").train()
    out = model(_tiny_input(batch=2))
    loss = out["seg"].square().mean() + out["slices"].square().mean()
    loss = loss + sum(d.square().mean() for d in out.get("deep", []))
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    names = [name for name, _ in model.named_parameters()]
    assert any("lstm" in n for n in names)
    if arch == "bifpn":
        assert sum("fusion_weights" in n for n in names) == 2 * (3 + 3)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_slice_logits_come_from_the_classifier_on_the_shared_features(arch):
    torch.manual_seed(0)
    model = build_model(arch, "tiny").eval()
    x = _tiny_input()
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out["slices"], model.classifier(model.features(x)), rtol=0, atol=0)
        k = 20
        changed = x.clone()
        changed[0, 2, k, 8, 8] += 5.0
        delta = (model(changed)["slices"] - out["slices"]).abs()[0]
    assert delta[:, k].max() > 1e-6


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_reduced_resolution_maps_outputs_back_to_the_input_grid(arch):
    torch.manual_seed(0)
    model = build_model(arch, {**build_model(arch, "tiny", device=META).config, "input_scale": 0.5}).eval()
    working = []
    model.classifier.register_forward_hook(lambda m, args, out: working.append(tuple(out.shape)))
    with torch.no_grad():
        out = model(_tiny_input(shape=(32, 48, 32)))
    assert tuple(out["seg"].shape) == (1, 3, 32, 48, 32)
    assert tuple(out["slices"].shape) == (1, 3, 32)
    assert working == [(1, 3, 16)]  # network ran on (16, 32, 16): 48 zero-padded to 64, then halved


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_input_that_is_not_a_multiple_of_16_is_refused(arch):
    model = build_model(arch, "tiny").eval()
    with pytest.raises(ValueError, match="multiples of 16"):
        model(torch.zeros(1, 4, 32, 40, 32))
    with pytest.raises(ValueError, match=r"\(B, 4, D, H, W\)"):
        model(torch.zeros(1, 3, 32, 32, 32))


# ------------------------------------------------------------------ checkpoints and presets


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_checkpoint_round_trip_reproduces_outputs_exactly(arch, tmp_path):
    torch.manual_seed(0)
    model = build_model(arch, "tiny").eval()
    with torch.no_grad():
        for p in model.parameters():  # move away from the initial values, so that a reload must read them
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / f"{arch}.pt"
    metadata = {"fold": 2, "training": {"epochs": 3, "loss": [0.5, 0.25]}}
    save_model(model, path, metadata)
    assert [p.name for p in tmp_path.iterdir()] == [f"{arch}.pt"]  # no temporary file left behind

    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["arch"] == arch and raw["metadata"] == metadata
    json.dumps(raw["config"])  # plain values only

    loaded, loaded_metadata = load_model(path)
    assert loaded_metadata == metadata and loaded.config == model.config and not loaded.training
    x = _tiny_input()
    with torch.no_grad():
        expected, actual = model(x), loaded(x)
    assert torch.equal(expected["seg"], actual["seg"]) and torch.equal(expected["slices"], actual["slices"])


def test_save_refuses_metadata_that_is_not_json(tmp_path):
    with pytest.raises(ValueError, match="JSON"):
        save_model(build_model("bifpn", "tiny"), tmp_path / "m.pt", {"when": object()})
    assert list(tmp_path.iterdir()) == []


def test_load_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="weights.pt"):
        load_model(path)
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="not a brats-cls model checkpoint"):
        load_model(path)


UNRECORDED = object()  # a hyper-parameter left out of a checkpoint's config


@pytest.mark.parametrize("key, value, message", [
    ("input_scale", 0.4, "1/k"),  # non-exact scales are no longer built
    ("classifier_window", None, "classifier_window"),  # nor whole-plane classifier pooling
    ("classifier_window", UNRECORDED, "does not record classifier_window"),  # a default must not fill it in
])
def test_load_refuses_a_checkpoint_this_version_does_not_build(key, value, message, tmp_path):
    path = tmp_path / "old.pt"
    save_model(build_model("unetpp", "tiny"), path)
    checkpoint = torch.load(path, weights_only=True)
    if value is UNRECORDED:
        del checkpoint["config"][key]
    else:
        checkpoint["config"][key] = value
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=message) as error:
        load_model(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("arch, size, message", [
    ("resnet", "paper", "unknown architecture"),
    ("bifpn", "huge", "unknown preset"),
    ("bifpn", {"bifpn_width": 64}, "bad hyper-parameters"),
    ("bifpn", {"encoder_channels": [16, 32, 64]}, "4 entries"),
    ("bifpn", {"encoder_channels": [12, 32, 64, 128]}, "norm_groups"),
    ("bifpn", {"dropout": 1.5}, "dropout"),
    ("bifpn", {"bifpn_layers": 0}, "bifpn_layers"),
    ("unetpp", {"filters": [32, 64, 128, 256]}, "5 entries"),
    ("unetpp", {"filters": "wide"}, "filters"),
    ("unetpp", {"input_scale": 0}, "input_scale"),
    ("bifpn", {"input_scale": 0.4}, "1/k"),  # only exact scales: the same for a crop and a whole volume
    ("unetpp", {"input_scale": 0.75}, "1/k"),
    ("bifpn", {"classifier_window": None}, "classifier_window"),  # no whole-plane pooling
    ("unetpp", {"classifier_window": None}, "classifier_window"),
    ("unetpp", {"lstm_layers": 2.5}, "lstm_layers"),
    ("unetpp", {"classifier_channels": 100}, "norm_groups"),
    ("unetpp", {"arch": "bifpn"}, "architecture"),
    ("unetpp", {"stem_channels": 8}, "stem_channels"),  # a stem needs a working grid of 1/k, k >= 2
    ("unetpp", {"stem_channels": 0, "input_scale": 0.5}, "stem_channels"),
    ("unetpp", 3, "preset name or a dict"),
])
def test_bad_configuration_raises_value_error(arch, size, message):
    with pytest.raises(ValueError, match=message):
        build_model(arch, size, device=META)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_config_rebuilds_the_same_architecture(arch):
    for preset in PRESET_NAMES:
        model = build_model(arch, preset, device=META)
        assert model.arch == arch and model.config["arch"] == arch
        rebuilt = build_model(arch, json.loads(json.dumps(model.config)), device=META)
        assert rebuilt.config == model.config
        assert [(n, p.shape) for n, p in rebuilt.named_parameters()] == \
            [(n, p.shape) for n, p in model.named_parameters()]
    assert isinstance(build_model("bifpn", "tiny", device=META), BiFPNSeg)
    assert isinstance(build_model("unetpp", "tiny", device=META), UNetPlusPlus)


def test_demo_preset_puts_logits_on_a_2mm_grid_and_paper_runs_at_full_resolution():
    # BiFPN's head reads half its working grid, UNet++'s its whole working grid: 2 mm logits for both
    assert build_model("bifpn", "demo", device=META).config["input_scale"] == 1.0
    assert build_model("unetpp", "demo", device=META).config["input_scale"] == 0.5
    assert build_model("unetpp", "demo", device=META).config["stem_channels"] == 8  # a learned way onto 2 mm
    assert build_model("unetpp", "paper", device=META).stem is None  # the paper's network has no stem
    for arch in ARCHITECTURES:
        paper = build_model(arch, "paper", device=META).config
        assert paper["input_scale"] == 1.0 and paper["classifier_window"] == 128  # the paper's crops
        assert paper == {**build_model(arch, {}, device=META).config, "classifier_window": 128}
        assert build_model(arch, "demo", device=META).config["classifier_window"] == 64  # the demo recipe's crops


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_constructor_defaults_are_the_paper_preset(arch):
    # one source for the paper's sizes: the constructors; the paper preset adds nothing to them
    assert PRESETS[arch]["paper"] == {}
    with torch.device(META):
        defaults = ARCHITECTURES[arch]().config
    assert defaults == build_model(arch, "paper", device=META).config
    assert defaults["classifier_window"] == 128  # the in-plane size of the paper's crops


def test_an_exact_scale_is_the_same_for_a_crop_and_a_whole_volume():
    from brats_cls.models.blocks import WorkingGrid

    crop, whole = WorkingGrid.of((64, 64, 64), 0.5), WorkingGrid.of((160, 176, 144), 0.5)
    assert crop.working == (32, 32, 32) and crop.padded == (64, 64, 64)
    assert whole.padded == (160, 192, 160) and whole.working == (80, 96, 80)  # padded to 32s, then exactly halved
    x = torch.arange(2 * 32 * 32 * 32, dtype=torch.float32).reshape(1, 2, 32, 32, 32)
    grid = WorkingGrid.of((32, 32, 32), 0.5)
    # every working voxel is the mean of its 2 x 2 x 2 block: all input voxels count once
    torch.testing.assert_close(grid.enter(x)[0, 1, 3, 4, 5], x[0, 1, 6:8, 8:10, 10:12].mean())
    # a smooth (linear) field comes back unchanged inside; the padding is cut off
    ramp = torch.arange(48, dtype=torch.float32).view(1, 1, 48, 1, 1).expand(1, 1, 48, 16, 16).contiguous()
    grid = WorkingGrid.of((48, 16, 16), 0.5)
    back = grid.leave(grid.enter(ramp))
    assert back.shape == ramp.shape
    torch.testing.assert_close(back[0, 0, 1:46, 8, 8], ramp[0, 0, 1:46, 8, 8])
    assert WorkingGrid.of((48, 16, 16), 1.0).enter(ramp) is ramp
    with pytest.raises(ValueError, match="1/k"):
        WorkingGrid.of((48, 16, 16), 0.4)


def test_a_learned_stem_generalises_the_block_average():
    # with each output channel the 1/8 average of its own input channel, the stem is the block average
    tiny = {**build_model("unetpp", "tiny", device=META).config, "input_scale": 0.5}
    torch.manual_seed(0)
    plain = build_model("unetpp", tiny).eval()
    stemmed = build_model("unetpp", {**tiny, "stem_channels": 4}).eval()
    missing = stemmed.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["stem.bias", "stem.weight"]
    with torch.no_grad():
        stemmed.stem.weight.copy_(torch.eye(4).view(4, 4, 1, 1, 1).expand(4, 4, 2, 2, 2) / 8)
        stemmed.stem.bias.zero_()
        x = torch.randn(1, 4, 48, 32, 64)  # padded to 64 x 32 x 64 on the way in
        expected, got = plain(x), stemmed(x)
    torch.testing.assert_close(got["seg"], expected["seg"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["slices"], expected["slices"], rtol=1e-5, atol=1e-5)
    assert got["seg"].shape == (1, 3, 48, 32, 64)
    with torch.no_grad():  # and it is learned: other weights, other logits
        stemmed.stem.weight[0, 1] += 0.5
        assert not torch.allclose(stemmed(x)["seg"], expected["seg"], atol=1e-3)


def test_classifier_windows_tile_the_plane_and_take_the_maximum():
    from brats_cls.models.slice_classifier import SliceClassifier, window_starts

    assert window_starts(32, 32) == [0] and window_starts(20, 32) == [0]
    assert window_starts(88, 32) == [0, 28, 56] and window_starts(72, 32) == [0, 20, 40]
    torch.manual_seed(0)
    head = SliceClassifier(8, 8, 4, 2, norm_groups=2, window=(16, 16)).eval()
    features = torch.randn(2, 8, 12, 16, 16)
    with torch.no_grad():
        # a plane the size of the window (a training crop) is pooled as a whole
        whole = head.fc(head.lstm(head.upsample(head.conv_block(features).mean(dim=(3, 4)))))
        torch.testing.assert_close(head(features), whole)
        # a larger plane: the maximum over the windows, each window on its own, per sample and slice
        big = torch.randn(2, 8, 12, 40, 24)
        crops = [head(big[..., h : h + 16, w : w + 16]) for h in window_starts(40, 16) for w in window_starts(24, 16)]
        assert len(crops) == 6
        torch.testing.assert_close(head(big), torch.stack(crops).amax(dim=0), rtol=1e-5, atol=1e-5)


def test_classifier_windows_must_be_whole_feature_cells():
    with pytest.raises(ValueError, match="classifier_window"):
        build_model("bifpn", {"classifier_window": 63}, device=META)


def _lstm_parameters(inputs: int, hidden: int, layers: int) -> int:
    """A stacked bidirectional LSTM by hand: per layer and direction 4 gates x hidden x (input + hidden + 2 biases)."""
    total = 0
    for layer in range(layers):
        total += 2 * 4 * hidden * ((inputs if layer == 0 else 2 * hidden) + hidden + 2)
    return total


def test_classifier_parameters_are_tables_2_and_3_counted_by_hand():
    bifpn = build_model("bifpn", "paper", device=META).classifier
    assert count_parameters(bifpn.conv_block) == 1024 * 512 * 27 + 2 * 512  # conv3d3 without bias, GN scale + shift
    assert count_parameters(bifpn.upsample) == 512 * 512 * 3 + 2 * 512  # tconv k3 without bias, GN
    assert count_parameters(bifpn.lstm) == _lstm_parameters(512, 512, 2) == 10_502_144
    assert count_parameters(bifpn.fc) == 1024 * 3 + 3  # conv1d1
    unetpp = build_model("unetpp", "paper", device=META).classifier
    assert count_parameters(unetpp.conv_block) == 128 * 256 * 27 + 2 * 256
    assert count_parameters(unetpp.lstm) == _lstm_parameters(256, 256, 3)
    assert count_parameters(unetpp.fc) == 512 * 3 + 3


def test_models_command_prints_the_documented_parameter_counts():
    # the README's table: a change of architecture must change it too
    documented = {("bifpn", "paper"): 40_392_032, ("bifpn", "demo"): 173_680, ("bifpn", "tiny"): 24_650,
                  ("unetpp", "paper"): 32_558_991, ("unetpp", "demo"): 463_259, ("unetpp", "tiny"): 56_231}
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0, result.output
    for (arch, preset), count in documented.items():
        line = next(line for line in result.output.splitlines() if line.split()[:2] == [arch, preset])
        assert line.split()[2] == f"{count:,d}"


@pytest.mark.parametrize("stride, groups, kernel, batch, bias", [
    (1, 1, 3, 1, True), (2, 1, 3, 1, False), (1, 4, 3, 1, True), (1, 1, 1, 1, True), (1, 1, 1, 2, False)])
def test_fast_inference_convolution_matches_the_autograd_path(stride, groups, kernel, batch, bias):
    from brats_cls.models.blocks import Conv3d

    torch.manual_seed(0)
    conv = Conv3d(4, 8, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=bias)
    x = torch.randn(batch, 4, 8, 12, 10)
    with torch.enable_grad():
        reference = conv(x)  # PyTorch's own dispatch (autograd path)
    with torch.inference_mode():
        fast = conv(x)  # forced oneDNN, or a matrix product for 1x1x1
    assert fast.shape == reference.shape
    torch.testing.assert_close(fast, reference.detach(), rtol=1e-5, atol=1e-5)
