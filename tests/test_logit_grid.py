"""Flips summed on a network's coarse logit grid and up-sampled once (brats_cls.logit_grid): the same
logits as up-sampling, cropping and un-flipping each flip, through the models and the Predictor."""

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from brats_cls.logit_grid import add_flip, add_flip_torch, halo_shape, placements, upsample
from brats_cls.models import PRESETS, BiFPNSeg, UNetPlusPlus
from brats_cls.predictor import Predictor, flip_combinations


def leave(coarse: torch.Tensor, factor: int, size) -> torch.Tensor:
    """What a network's forward does last: trilinear x factor (half-pixel centres), crop to ``size``."""
    if factor > 1:
        coarse = F.interpolate(coarse, scale_factor=float(factor), mode="trilinear", align_corners=False)
    return coarse[..., : size[0], : size[1], : size[2]]


@pytest.mark.parametrize("factor, size, padded", [
    (2, (32, 48, 16), (32, 64, 32)),  # padding on two axes, as the demo UNet++ pads to multiples of 32
    (2, (32, 48, 16), (32, 48, 16)),  # no padding (the BiFPN)
    (1, (16, 32, 16), (16, 32, 16)),  # logits already on the input grid
    (4, (16, 32, 48), (64, 64, 64)),
])
def test_the_halo_grid_sums_the_flips_as_up_sampling_each_would(factor, size, padded):
    generator = torch.Generator().manual_seed(factor)
    coarse_shape = tuple(n // factor for n in padded)
    expected = torch.zeros((1, 3, *size), dtype=torch.float64)
    total = torch.zeros((1, 3, *halo_shape(size, factor)))
    for dims in flip_combinations(True):
        coarse = torch.randn((1, 3, *coarse_shape), generator=generator)
        full = leave(coarse.double(), factor, size)
        expected += torch.flip(full, dims) if dims else full
        add_flip(total, coarse, dims, factor, size)
    result = upsample(total, factor, size)
    assert result.shape == expected.shape
    torch.testing.assert_close(result.double(), expected, rtol=0, atol=2e-5)


def test_the_torch_placement_of_other_devices_equals_numpys_for_every_flip_and_precision():
    generator = torch.Generator().manual_seed(9)
    size, factor = (32, 48, 16), 2
    for dtype in (torch.float32, torch.bfloat16):
        for dims in flip_combinations(True):
            coarse = torch.randn((1, 3, 16, 32, 16), generator=generator).to(dtype)
            start = torch.randn((1, 3, *halo_shape(size, factor)), generator=generator)
            by_numpy, by_torch = start.clone(), start.clone()
            add_flip(by_numpy, coarse, dims, factor, size)
            add_flip_torch(by_torch, coarse, dims, factor, size)
            assert not torch.equal(by_numpy, start) and torch.equal(by_numpy, by_torch), (dtype, dims)


def test_placements_refuse_coarse_logits_that_do_not_cover_the_input():
    with pytest.raises(ValueError, match="do not cover"):
        placements((8, 8, 8), (32, 16, 16), 2, ())
    with pytest.raises(ValueError, match="multiple of the logit factor"):
        halo_shape((33, 16, 16), 2)


def _networks():
    torch.manual_seed(7)
    bifpn = BiFPNSeg(**{k: v for k, v in PRESETS["bifpn"]["tiny"].items()}).eval()
    unetpp = UNetPlusPlus(**{**PRESETS["unetpp"]["tiny"], "input_scale": 0.5, "stem_channels": 4}).eval()
    return bifpn, unetpp


def test_forward_is_forward_coarse_up_sampled_and_cropped():
    """Both networks' forward is their forward_coarse followed by one trilinear up-sampling and the crop,
    exactly; a BiFPN at input_scale 1/2 up-samples twice and has no coarse form."""
    x = torch.randn((1, 4, 48, 32, 16))  # the UNet++ at 1/2 pads D and W to multiples of 32
    with torch.no_grad():
        for network in _networks():
            full, coarse = network(x), network.forward_coarse(x)
            assert torch.equal(full["seg"], leave(coarse["seg"], network.logit_factor, x.shape[2:]))
            assert torch.equal(full["slices"], coarse["slices"])
    half = BiFPNSeg(**{**PRESETS["bifpn"]["tiny"], "input_scale": 0.5})
    assert half.logit_factor is None
    with pytest.raises(ValueError, match="up-samples twice"):
        half.forward_coarse(x)


def test_the_predictor_on_coarse_grids_gives_the_logits_of_each_flip_up_sampled():
    """The Predictor sums each network's flips on its halo grid; its ensemble logits and each network's
    WT mask are those of forward (full resolution) over the 8 flips, un-flipped, averaged."""
    bifpn, unetpp = _networks()
    volume = np.random.default_rng(4).normal(size=(4, 48, 32, 16)).astype(np.float32)
    x = torch.from_numpy(volume)[None]
    predictor = Predictor([bifpn, unetpp], precision="fp32")
    assert {predictor.mirrored(model, predictor.mirrors(x)).factor for model in (bifpn, unetpp)} == {2}
    logits = predictor.ensemble(volume)
    expected, per_model = 0, []
    with torch.no_grad():
        for network in (bifpn, unetpp):
            own = sum(torch.flip(network(torch.flip(x, dims))["seg"], dims) if dims else network(x)["seg"]
                      for dims in flip_combinations(True)) / 8
            per_model.append(own[0, 0].numpy() >= 0)
            expected = expected + own / 2
    np.testing.assert_allclose(logits.seg, expected[0].numpy(), rtol=0, atol=1e-5)
    for mask, reference in zip(logits.model_whole_tumour, per_model):
        assert (mask != reference).sum() <= 2  # ties at logit 0 may fall either way after rounding
    full = Predictor([bifpn, unetpp], precision="fp32", coarse_logits=False)
    assert full.mirrored(bifpn, full.mirrors(x)).factor is None
    np.testing.assert_allclose(full.ensemble(volume).seg, expected[0].numpy(), rtol=0, atol=1e-5)
