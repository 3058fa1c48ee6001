"""Engines (brats_cls.engines): every installed engine against eager PyTorch on a phantom case, the
export cache (reuse, corruption, stale records, other weights), clear errors. Tiny networks with
random weights of fixed seeds; no assertion on time.

Tolerance: logits within :data:`TOLERANCE` (1e-4) of eager float32. The engines' own kernels sum in
another order: the differences seen are ~1e-6 (float32 rounding over a few dozen layers), so 1e-4 is
two orders of magnitude above them. Masks: identical wherever eager's logit is further than the
tolerance from the threshold (:func:`assert_same_masks`; under 1 % of the case's voxels are nearer).
"""

import json
import logging

import numpy as np
import pytest
import torch

from brats_cls.cases import find_cases
from brats_cls.device import native_bf16
from brats_cls.engines import (ENGINES, ArtefactCache, EngineError, Runner, bind_weights, choose_engine, export_onnx,
                               get_engine, installed)
from brats_cls.models.registry import build_model
from brats_cls.predictor import Predictor

TOLERANCE = 1e-4
CASE_ID = "BraTS-GLI-00001-000"
# random tiny classifiers call most slices negative: without suppression the masks say something;
# the flips are the Predictor's, the same for every engine
SETTINGS = {"suppression": False, "tta": False}
SHAPE = (1, 4, 32, 48, 64)  # a whole volume for the tiny networks: 2 x 2 classifier windows in plane


def tiny(arch: str, seed: int):
    torch.manual_seed(seed)
    return build_model(arch, "tiny").eval()


@pytest.fixture(scope="module")
def networks():
    return [tiny("bifpn", 1), tiny("unetpp", 2)]


@pytest.fixture(scope="module")
def case(phantom_cases):
    return next(c for c in find_cases(phantom_cases).cases if c.case_id == CASE_ID)


@pytest.fixture(scope="module")
def eager_prediction(networks, case):
    return Predictor(networks, precision="fp32", **SETTINGS).predict(case)


def needs(name: str):
    return pytest.mark.skipif(not installed(name), reason=f"engine {name} not installed")


def near_threshold(logits) -> np.ndarray:
    """``(d, h, w)``: voxels whose decision an error of TOLERANCE could change (some region's voxel or
    slice logit within TOLERANCE of the threshold, logit 0)."""
    voxels = (np.abs(logits.seg) <= TOLERANCE).any(axis=0)
    slices = (np.abs(logits.slices) <= TOLERANCE).any(axis=0)
    return voxels | slices[:, None, None]


def assert_same_masks(prediction, eager) -> None:
    """Masks identical wherever the eager logits are further than TOLERANCE from the threshold;
    random tiny networks put a few hundred of the case's voxels nearer than that."""
    near = near_threshold(eager.logits)
    differ = (prediction.decision.regions != eager.decision.regions).any(axis=0)
    assert not (differ & ~near).any(), f"{int((differ & ~near).sum())} voxels decided otherwise"
    assert int((prediction.labels != eager.labels).sum()) <= int(near.sum())
    assert near.mean() < 0.01  # what the comparison leaves out is small


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs(n)) for n in ENGINES if n != "compile"])
def test_engine_matches_eager_logits_and_masks(name, networks, case, eager_prediction, tmp_path):
    predictor = Predictor(networks, precision="fp32", engine=name, engine_cache=tmp_path, **SETTINGS)
    assert predictor.precision == "fp32" and predictor.engine.name == name
    for _ in range(2):  # the second case runs on what the first left loaded (and released)
        prediction = predictor.predict(case)
        np.testing.assert_allclose(prediction.logits.seg, eager_prediction.logits.seg, rtol=0, atol=TOLERANCE)
        np.testing.assert_allclose(prediction.logits.slices, eager_prediction.logits.slices, rtol=0, atol=TOLERANCE)
        assert_same_masks(prediction, eager_prediction)
    assert prediction.labels.any()  # a mask that says something


@pytest.mark.slow
@needs("compile")
def test_compile_matches_eager(networks, tmp_path):
    """One network (inductor compiles for about a minute on 2 cores), the identity flip."""
    volume = np.random.default_rng(0).standard_normal(SHAPE[1:]).astype(np.float32)
    eager = Predictor(networks[:1], tta=False, precision="fp32").ensemble(volume)
    compiled = Predictor(networks[:1], tta=False, precision="fp32", engine="compile", engine_cache=tmp_path)
    logits = compiled.ensemble(volume)
    np.testing.assert_allclose(logits.seg, eager.seg, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(logits.slices, eager.slices, rtol=0, atol=TOLERANCE)
    assert compiled.engine.stats["exported"] == 1


@needs("onnxruntime")
def test_sliding_windows_run_through_the_engine(networks, volume, tmp_path):
    """A volume above the whole-volume cap: every window (one shape) goes through the engine too."""
    windows = {"tta": False, "precision": "fp32", "max_whole_voxels": 16**3, "window": (32, 32, 32)}
    eager = Predictor(networks, **windows).ensemble(volume)
    predictor = Predictor(networks, engine="onnxruntime", engine_cache=tmp_path, **windows)
    logits = predictor.ensemble(volume)
    assert logits.windowed and predictor.engine.stats["exported"] == 2  # one window shape per architecture
    np.testing.assert_allclose(logits.seg, eager.seg, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(logits.slices, eager.slices, rtol=0, atol=TOLERANCE)


def test_eager_engine_is_the_network_itself(networks):
    """The default engine returns the network's own tensors: the path before engines, bit for bit."""
    volume = torch.randn(SHAPE)
    runner = get_engine("eager").prepare(networks[1], "fp32")
    with torch.inference_mode():
        seg, slices = runner(volume)
        out = networks[1](volume)
    assert torch.equal(seg, out["seg"]) and torch.equal(slices, out["slices"])
    assert Predictor(networks).engine.name == "eager"


def test_channels_last_leaves_the_network_as_it_was(networks):
    weight = next(networks[0].parameters())
    get_engine("eager-cl").prepare(networks[0], "fp32")
    assert weight.is_contiguous() and next(networks[0].parameters()) is weight


# --- the cache ------------------------------------------------------------------------------------


def cached_graphs(folder):
    return sorted((folder / "onnx-graph").glob("*.onnx"))


def run_once(networks, cache, volume, engine="onnxruntime"):
    predictor = Predictor(networks, tta=False, precision="fp32", engine=engine, engine_cache=cache)
    return predictor.ensemble(volume), predictor.engine.stats


@pytest.fixture
def volume():
    return np.random.default_rng(1).standard_normal(SHAPE[1:]).astype(np.float32)


@needs("onnxruntime")
def test_cache_reused_then_rebuilt_when_corrupt_or_stale(networks, volume, tmp_path, caplog):
    eager = Predictor(networks, tta=False, precision="fp32").ensemble(volume)
    first, stats = run_once(networks, tmp_path, volume)
    assert (stats["exported"], stats["from_cache"]) == (2, 0)
    graphs = cached_graphs(tmp_path)
    assert len(graphs) == 2 and all(path.with_suffix(".json").is_file() for path in graphs)

    again, stats = run_once(networks, tmp_path, volume)
    assert (stats["exported"], stats["from_cache"]) == (0, 2)
    np.testing.assert_array_equal(again.seg, first.seg)

    # one flipped byte in a graph: detected by its sha256, rebuilt, never used
    payload = bytearray(graphs[0].read_bytes())
    payload[len(payload) // 2] ^= 0x01
    graphs[0].write_bytes(bytes(payload))
    with caplog.at_level(logging.WARNING, logger="brats_cls.engines"):
        rebuilt, stats = run_once(networks, tmp_path, volume)
    assert (stats["exported"], stats["from_cache"]) == (1, 1)
    assert "corrupt" in caplog.text and graphs[0].name in caplog.text
    np.testing.assert_allclose(rebuilt.seg, eager.seg, rtol=0, atol=TOLERANCE)
    assert ArtefactCache(tmp_path).load(json.loads(graphs[0].with_suffix(".json").read_text())["fields"],
                                        ".onnx") == graphs[0].read_bytes()  # repaired in place

    # a record that is for something else (here: another torch) is stale: rebuilt
    record_path = graphs[1].with_suffix(".json")
    record = json.loads(record_path.read_text())
    record["fields"]["exporter"] = "torch 0.0"
    record_path.write_text(json.dumps(record))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="brats_cls.engines"):
        _, stats = run_once(networks, tmp_path, volume)
    assert (stats["exported"], stats["from_cache"]) == (1, 1) and "stale" in caplog.text


@needs("onnxruntime")
def test_new_weights_never_run_on_cached_ones(networks, volume, tmp_path):
    """Other weights of the same architecture reuse the cached graph, with their own weights bound."""
    run_once(networks[:1], tmp_path, volume)
    retrained = tiny("bifpn", 99)
    logits, stats = run_once([retrained], tmp_path, volume)
    assert (stats["exported"], stats["from_cache"]) == (0, 1)
    eager = Predictor([retrained], tta=False, precision="fp32").ensemble(volume)
    np.testing.assert_allclose(logits.seg, eager.seg, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(logits.slices, eager.slices, rtol=0, atol=TOLERANCE)


@needs("onnxruntime")
def test_weights_bind_only_into_their_own_architecture(networks):
    graph = export_onnx(networks[0], SHAPE)
    assert bind_weights(graph, tiny("bifpn", 5)) is not None
    assert bind_weights(graph, networks[1]) is None  # UNet++ weights into a BiFPN graph
    wider = build_model("bifpn", {**tiny("bifpn", 5).config, "decoder_channels": 8}).eval()
    assert bind_weights(graph, wider) is None  # same names, other shapes


def test_artefact_cache_round_trip_and_refusals(tmp_path, caplog):
    cache = ArtefactCache(tmp_path)
    fields = {"artefact": "test", "input_shape": [1, 4, 16, 16, 16]}
    assert cache.load(fields, ".bin") is None
    cache.store(fields, ".bin", b"graph bytes")
    assert cache.load(fields, ".bin") == b"graph bytes"
    artefact, record = cache.paths(fields, ".bin")
    assert cache.paths({**fields, "input_shape": [1, 4, 16, 16, 32]}, ".bin")[0] != artefact  # keyed by shape
    artefact.write_bytes(b"graph bytez")
    assert cache.load(fields, ".bin") is None
    cache.store(fields, ".bin", b"graph bytes")
    record.unlink()
    assert cache.load(fields, ".bin") is None
    record.write_text("{not json")
    assert cache.load(fields, ".bin") is None


def test_unwritable_cache_costs_only_the_reuse(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cache = ArtefactCache(blocker / "cache")
    with caplog.at_level(logging.WARNING, logger="brats_cls.engines"):
        cache.store({"artefact": "test"}, ".bin", b"x")
    assert "cannot write" in caplog.text and cache.load({"artefact": "test"}, ".bin") is None


# --- errors ---------------------------------------------------------------------------------------


def test_unknown_engine_is_a_clear_error(networks):
    with pytest.raises(EngineError, match="unknown engine 'tensorrt'; choose one of eager, eager-cl, compile"):
        get_engine("tensorrt")
    with pytest.raises(ValueError, match="unknown engine"):
        Predictor(networks, engine="tensorrt")
    with pytest.raises(EngineError, match="unknown engine"):
        installed("tensorrt")


@needs("openvino")
def test_auto_is_openvino_on_the_cpu_unless_bfloat16_is_emulated_and_eager_elsewhere(networks, tmp_path):
    native = native_bf16(torch.device("cpu"))
    assert choose_engine("auto", "cpu", "fp32") == "openvino"
    assert choose_engine("auto", "cpu", "bf16") == ("openvino" if native else "eager")
    assert choose_engine("auto", "cuda", "fp32") == "eager"
    assert choose_engine("auto", "cpu", "auto") == "openvino"  # float32, or bfloat16 where native
    assert choose_engine("onnxruntime", "cpu", "bf16") == "onnxruntime"  # a named engine is never replaced
    predictor = Predictor(networks, engine="auto", precision="fp32", engine_cache=tmp_path)
    assert predictor.engine.name == "openvino" and predictor.precision == "fp32"
    chosen = Predictor(networks, engine="auto", precision="bf16", engine_cache=tmp_path)
    assert (chosen.engine.name, chosen.precision) == ("openvino" if native else "eager", "bf16")


def test_auto_without_openvino_is_eager(monkeypatch):
    import brats_cls.engines as engines

    monkeypatch.setattr(engines, "installed", lambda name: name != "openvino")
    assert engines.choose_engine("auto", "cpu", "fp32") == "eager"


@needs("onnxruntime")
def test_precision_and_device_an_engine_lacks(networks):
    assert Predictor(networks, engine="onnxruntime", precision="auto").precision == "fp32"
    with pytest.raises(EngineError, match="onnxruntime does not run bf16"):
        Predictor(networks, engine="onnxruntime", precision="bf16")
    with pytest.raises(EngineError, match="CPU only"):
        get_engine("onnxruntime", "cuda")


def test_runner_release_is_optional():
    calls = []
    Runner(lambda batch: (batch, batch)).release()
    Runner(lambda batch: (batch, batch), lambda: calls.append(1)).release()
    assert calls == [1]


@needs("onnxruntime")
def test_a_graph_exported_under_bfloat16_autocast_is_float32(networks):
    """The Predictor runs a bf16 case under autocast and exports on first use: the graph it caches (keyed
    as float32, shared with later float32 runs) must hold no bfloat16 cast."""
    import onnx

    for network in networks:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            graph = onnx.load_from_string(export_onnx(network, SHAPE))
        casts = [attribute.i for node in graph.graph.node if node.op_type == "Cast" for attribute in node.attribute
                 if attribute.name == "to"]
        assert onnx.TensorProto.BFLOAT16 not in casts
