"""Engines: how one loaded network's forward pass is run at inference (issue #24).

An engine turns a network in eval mode into a *runner*: a callable that takes a batch of flipped
volumes ``(B, 4, D, H, W)`` float32 and returns ``(seg logits (B, 3, D, H, W), slice logits (B, 3, D))``,
the two outputs of the network's ``forward``, or of its ``forward_coarse`` (segmentation logits on its
coarse logit grid, :mod:`brats_cls.logit_grid`) for a runner prepared with ``coarse``.
:class:`~brats_cls.predictor.Predictor` calls runners and nothing else, so every engine goes through
the same flips, windows, ensemble and decision.

Engines (:data:`ENGINE_CHOICES`: :data:`ENGINES` and ``auto``):

* ``auto`` (the default of ``brats-cls infer`` and of the image): :func:`choose_engine` picks
  ``openvino`` for a run on the CPU where OpenVINO is installed, in float32 or in a bfloat16 the CPU
  computes natively, ``eager`` everywhere else (below);
* ``eager``: the network itself, PyTorch eager, one operator at a time (the library's default, and
  the reference every other engine is measured against);
* ``eager-cl``: a copy of the network with ``channels_last_3d`` weights, fed ``channels_last_3d``
  inputs (the given network is left as it is);
* ``compile``: the network exported for each input shape (below) and compiled by ``torch.compile``
  (inductor; on the CPU with ``freezing``, the inductor setting for inference: weights become
  constants, convolutions get pre-packed oneDNN weights); CPU or CUDA;
* ``onnxruntime``: the network exported to ONNX for each input shape, run by ONNX Runtime's CPU
  execution provider; float32 only (its CPU provider has no bfloat16 convolution);
* ``openvino``: the same ONNX graph read and compiled by OpenVINO's CPU plugin (which fuses
  convolution, normalisation and activation); float32, or bfloat16 on a CPU that computes it natively.

ONNX Runtime and OpenVINO run on the CPU only: the GPU path keeps PyTorch (``eager``, or ``compile``).

**One graph per input shape.** The networks compute from the input's size in Python: the working
grid's padding and crop (:class:`~brats_cls.models.blocks.WorkingGrid`) and the number and position
of the classifier's in-plane windows (:func:`~brats_cls.models.slice_classifier.window_starts`, a loop
over ``ceil(n / w)`` windows). An exporter freezes such values, and the legacy ONNX tracer cannot even
evaluate them (it hands the model tensor sizes: ``round(Tensor)`` fails). So each input shape gets
its own graph, made by ``torch.export`` at that static shape (every size a Python int, exactly the
eager computation) and, for the ONNX engines, written as ONNX (opset :data:`ONNX_OPSET`, the
TorchScript exporter over the exported graph, LSTM as ONNX ``LSTM``). Cropped brains differ in size,
so a new case usually means a new shape: what makes that cheap is the next point.

**One graph per architecture.** The ONNX graph is exported without constant folding, so that every
initializer is a parameter of the network under its state-dict name. The graph of an architecture,
preset and shape is then exported once, cached, and each network's own weights are written into
its initializers before ONNX Runtime or OpenVINO reads it (:func:`bind_weights`; a graph whose
initializers are not exactly the network's parameters is never bound: that network gets a graph of its
own, keyed by its weights too). Ten networks of two architectures cost two exports per shape.

**The cache** (:class:`ArtefactCache`): ``$BRATS_CLS_ENGINE_CACHE``, else
``<temporary directory>/brats-cls-engine-cache`` (``/tmp`` is writable in a read-only container).
An artefact is ``<kind>/<key>.onnx`` beside ``<key>.json``; the key is the sha256 of what the
artefact depends on: the architecture and its hyper-parameters, the sha256 of the model code
(``brats_cls/models/*.py``), the input shape, the exporter (torch version, opset, this module's
:data:`EXPORT_VERSION`), and the sha256 of the weights where they are baked in. The record holds
those fields and the artefact's own sha256: a missing or unreadable record, other fields, or a hash
that differs is a stale or corrupt artefact, rebuilt and never used. Both files are written atomically
(:func:`brats_cls.io.write_bytes_atomically`); a folder that cannot be written only costs the reuse.
The ``compile`` engine keeps nothing on disk that it would trust later: inductor's caches go to a
private folder of this process (its one-off cost is paid by every process).

Decisions:

* **``auto``: OpenVINO on the CPU, PyTorch otherwise.** On CPUs without native bfloat16 (``auto``
  precision is float32 there) OpenVINO ran the demo networks 2.3-2.9 times as fast as eager PyTorch;
  where bfloat16 is native (``auto`` precision is bfloat16) OpenVINO's bfloat16 ran them 2.5 times as
  fast as eager bfloat16; both with masks within the agreement limits of eager float32 on the held-out
  phantoms (``BENCHMARKS.md``, engines). A bfloat16 the CPU only emulates (named with ``--precision``)
  stays with eager PyTorch, which runs it; CUDA keeps PyTorch. Without the ``openvino`` package
  ``auto`` is eager: the choice never fails.
* **oneDNN off while exporting**: in CPU float32 inference the networks' ``Conv3d`` calls
  ``torch.mkldnn_convolution`` directly (:mod:`brats_cls.models.blocks`), which has no ONNX form and
  no fake-tensor kernel; with oneDNN flagged off for the export, the standard convolution is traced
  (the same arithmetic; every engine then picks its own kernels).
* Exports run in float32, outside autocast; an engine's reduced precision is its own setting.
* **Memory**: each ONNX Runtime session runs without its memory arena and each OpenVINO model
  releases its intermediate buffers after a network's flips (:meth:`Runner.release`), so ten networks
  never hold ten sets of activations; at most :data:`SHAPES_KEPT` shapes stay loaded per network (a
  whole volume and a window).
* Runners are built on first use of a shape (lazily), so the cost of a shape is paid in the first
  case that has it; :attr:`Engine.stats` says how much went where.
"""

from __future__ import annotations

import atexit
import copy
import hashlib
import importlib.util
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .device import PRECISIONS, native_bf16, resolve_precision
from .io import write_bytes_atomically
from .timing import StageTimer

log = logging.getLogger(__name__)

ENGINES = ("eager", "eager-cl", "compile", "onnxruntime", "openvino")
#: what ``--engine`` accepts: an engine, or ``auto`` (:func:`choose_engine`)
ENGINE_CHOICES = ("auto", *ENGINES)
#: the library's default (:class:`~brats_cls.predictor.Predictor`, training's validation): PyTorch itself
DEFAULT_ENGINE = "eager"
#: the default of ``brats-cls infer`` and the image's platform calls
INFER_ENGINE = "auto"
#: the Python package each engine needs beyond torch
PACKAGES = {"onnxruntime": ("onnx", "onnxruntime"), "openvino": ("onnx", "openvino")}
CACHE_ENV = "BRATS_CLS_ENGINE_CACHE"
ONNX_OPSET = 17
#: changes whenever this module exports differently: older artefacts then no longer match
EXPORT_VERSION = 2
CACHE_FORMAT = "brats-cls-engine-artefact/1"
SHAPES_KEPT = 2
_CONCRETE = tuple(name for name in PRECISIONS if name != "auto")


class EngineError(ValueError):
    """An unknown engine, one this machine cannot run, or a network it cannot export."""


def default_cache_dir() -> Path:
    """``$BRATS_CLS_ENGINE_CACHE``, else ``brats-cls-engine-cache`` in the temporary directory."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(tempfile.gettempdir()) / "brats-cls-engine-cache"


def installed(name: str) -> bool:
    """True when the packages that engine ``name`` needs are importable (no import is done)."""
    if name not in ENGINES:
        raise EngineError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    return all(importlib.util.find_spec(package) is not None for package in PACKAGES.get(name, ()))


def choose_engine(name: str, device: torch.device | str, precision: str) -> str:
    """The engine that ``name`` means for a run at ``precision`` on ``device``: ``name`` itself unless it is
    ``auto``, which is ``openvino`` on the CPU when the package is installed and the precision is float32
    or a bfloat16 the CPU computes natively, else ``eager`` (module docstring)."""
    if name != "auto":
        return name
    device = torch.device(device)
    if device.type == "cpu" and installed("openvino") and (
            resolve_precision(precision, device) == "fp32" or native_bf16(device)):
        return "openvino"
    return "eager"


def get_engine(name: str, device: torch.device | str = "cpu", cache_dir: Path | str | None = None) -> "Engine":
    """The engine ``name`` for networks on ``device``; artefacts under ``cache_dir`` (None: the default)."""
    if name not in ENGINES:
        raise EngineError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    device = torch.device(device)
    missing = [package for package in PACKAGES.get(name, ()) if importlib.util.find_spec(package) is None]
    if missing:
        raise EngineError(f"engine {name} needs the Python package(s) {', '.join(missing)} "
                          f"(pinned in requirements.txt: pip install -r requirements.txt)")
    cls = {"eager": EagerEngine, "eager-cl": ChannelsLastEngine, "compile": CompileEngine,
           "onnxruntime": OnnxRuntimeEngine, "openvino": OpenVinoEngine}[name]
    if cls.cpu_only and device.type != "cpu":
        raise EngineError(f"engine {name} runs on the CPU only; on {device.type} use eager or compile")
    return cls(device, Path(cache_dir) if cache_dir is not None else default_cache_dir())


# --- runners ----------------------------------------------------------------------------------


class Runner:
    """A network as an engine runs it: ``runner(batch) -> (seg, slices)``; :meth:`release` frees
    what the engine holds between calls (nothing, for PyTorch)."""

    def __init__(self, run: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], release=None):
        self._run = run
        self._release = release

    def __call__(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._run(batch)

    def release(self) -> None:
        if self._release is not None:
            self._release()


class _PerShape(Runner):
    """A runner that builds one callable per input shape (on first use) and keeps the latest
    :data:`SHAPES_KEPT` of them."""

    def __init__(self, engine: "Engine", build):
        self.engine, self.build = engine, build
        self.loaded: OrderedDict[tuple[int, ...], Runner] = OrderedDict()
        super().__init__(self._dispatch, self._release_all)

    def _dispatch(self, batch: torch.Tensor):
        shape = tuple(batch.shape)
        runner = self.loaded.get(shape)
        if runner is not None:
            self.loaded.move_to_end(shape)
            return runner(batch)
        runner = self.build(shape)
        self.loaded[shape] = runner
        while len(self.loaded) > SHAPES_KEPT:
            self.loaded.popitem(last=False)
        with self.engine.timed("first_call_seconds"):
            return runner(batch)

    def _release_all(self) -> None:
        for runner in self.loaded.values():
            runner.release()


# --- engines ----------------------------------------------------------------------------------


class Engine:
    """Base of the engines: the device, the cache, the precisions an engine runs, its statistics."""

    name = ""
    cpu_only = False
    #: keeps artefacts in :attr:`cache` that a later process reuses
    persistent = False
    precisions: tuple[str, ...] = _CONCRETE

    def __init__(self, device: torch.device, cache_dir: Path):
        self.device = device
        self.cache = ArtefactCache(cache_dir)
        #: the one-off work, for the bench: seconds exporting (torch.export and ONNX), loading (binding
        #: weights, making sessions or compiled models), in the first call of each shape (for
        #: ``compile``: inductor's compilation); graphs exported, taken from the cache, not shareable
        self.stats: dict[str, float] = {"export_seconds": 0.0, "load_seconds": 0.0, "first_call_seconds": 0.0,
                                        "exported": 0, "from_cache": 0, "rejected": 0}
        self.timed = StageTimer(self.stats)

    @property
    def version(self) -> str:
        return f"torch {torch.__version__}"

    def resolve_precision(self, name: str) -> str:
        """The concrete precision this engine runs for ``name`` (:func:`~brats_cls.device.resolve_precision`);
        ``auto`` falls back to float32 where the engine lacks the device's reduced precision, a named
        precision it lacks is an EngineError."""
        precision = resolve_precision(name, self.device)
        if precision in self.precisions:
            return precision
        if name == "auto":
            return "fp32"
        raise EngineError(f"engine {self.name} does not run {precision} on {self.device.type}; "
                          f"it runs {', '.join(self.precisions)}")

    def prepare(self, model: nn.Module, precision: str, coarse: bool = False) -> Runner:
        """The runner of ``model`` (in eval mode, on this engine's device) at concrete ``precision``;
        ``coarse``: of its ``forward_coarse`` (:mod:`brats_cls.logit_grid`) instead of ``forward``."""
        raise NotImplementedError


def _outputs(out: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return out["seg"], out["slices"]


def _forward(model: nn.Module, coarse: bool) -> Callable[[torch.Tensor], dict]:
    """The network's ``forward``, or its ``forward_coarse``."""
    return model.forward_coarse if coarse else model


class EagerEngine(Engine):
    """The network itself (see the module docstring)."""

    name = "eager"

    def prepare(self, model, precision, coarse=False):
        forward = _forward(model, coarse)
        return Runner(lambda batch: _outputs(forward(batch)))


class ChannelsLastEngine(Engine):
    """A ``channels_last_3d`` copy of the network (see the module docstring)."""

    name = "eager-cl"

    def prepare(self, model, precision, coarse=False):
        layout = torch.channels_last_3d
        forward = _forward(copy.deepcopy(model).to(memory_format=layout), coarse)

        def run(batch):
            seg, slices = _outputs(forward(batch.contiguous(memory_format=layout)))
            return seg.contiguous(), slices

        return Runner(run)


class _Outputs(nn.Module):
    """The network (its ``forward``, or ``forward_coarse`` when ``coarse``) with its outputs as a tuple
    ``(seg, slices)``, as exporters want them; its parameters are the network's under :attr:`PREFIX`."""

    PREFIX = "model."

    def __init__(self, model: nn.Module, coarse: bool = False):
        super().__init__()
        self.model = model
        self.coarse = coarse

    def forward(self, volume):
        return _outputs(self.model.forward_coarse(volume) if self.coarse else self.model(volume))


def _arch(model: nn.Module) -> str:
    return str(getattr(model, "config", {}).get("arch", type(model).__name__))


def export_program(model: nn.Module, shape: tuple[int, ...], coarse: bool = False) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` (``forward_coarse`` when ``coarse``) at the static input ``shape``, in
    float32, standard convolutions (module docstring: oneDNN off while exporting)."""
    device = next(model.parameters()).device
    # torch warns about oneDNN's TF32 flag (which `flags` sets back) and about the LSTM's flat
    # weights (torch.export keeps them as the LSTM's parameters all the same)
    quiet = warnings.catch_warnings(action="ignore", category=UserWarning)
    with torch.inference_mode(False), torch.no_grad(), torch.autocast(device.type, enabled=False), quiet, \
            torch.backends.mkldnn.flags(enabled=False):
        example = torch.zeros(shape, device=device)
        try:
            return torch.export.export(_Outputs(model, coarse).eval(), (example,))
        except Exception as error:  # noqa: BLE001 - torch.export raises many kinds
            raise EngineError(f"torch.export cannot export the {_arch(model)} network at input "
                              f"{shape}: {error}".splitlines()[0]) from error


class CompileEngine(Engine):
    """``torch.compile`` (inductor) of the exported graph of each input shape (module docstring)."""

    name = "compile"

    def __init__(self, device, cache_dir):
        super().__init__(device, cache_dir)
        if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):  # a private folder: nothing reused from disk
            private = tempfile.mkdtemp(prefix="brats-cls-inductor-")
            atexit.register(shutil.rmtree, private, ignore_errors=True)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = private

    def prepare(self, model, precision, coarse=False):
        options = {"freezing": True} if self.device.type == "cpu" else None

        def build(shape):
            with self.timed("export_seconds"):
                module = export_program(model, shape, coarse).module()
            self.stats["exported"] += 1
            compiled = torch.compile(module, backend="inductor", dynamic=False, options=options)
            return Runner(lambda batch: tuple(compiled(batch)))

        return _PerShape(self, build)


# --- ONNX ---------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def model_code_digest() -> str:
    """sha256 of the networks' source (``brats_cls/models/*.py``): a graph is stale when the code changes."""
    digest = hashlib.sha256()
    for path in sorted((Path(__file__).parent / "models").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def weights_digest(model: nn.Module) -> str:
    """sha256 of a network's state dict (names, dtypes, shapes and values)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{name}:{array.dtype}:{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def export_onnx(model: nn.Module, shape: tuple[int, ...], coarse: bool = False) -> bytes:
    """ONNX of ``model`` (``forward_coarse`` when ``coarse``) at input ``shape``: input ``volume``, outputs
    ``seg`` and ``slices``, every initializer a parameter under its state-dict name (no constant folding)."""
    import onnx  # noqa: F401 - the exporter needs it; imported here so that a missing one is named

    module = export_program(model, shape, coarse).module()
    buffer = io.BytesIO()
    device = next(model.parameters()).device
    # outside the caller's autocast: the exporter traces the module, and a trace under bfloat16 autocast
    # would bake its casts into a graph that is cached as float32
    with torch.inference_mode(False), torch.no_grad(), torch.autocast(device.type, enabled=False), \
            warnings.catch_warnings():
        # the TorchScript exporter warns that it is deprecated and about traced sizes; the shapes
        # here are static by construction
        warnings.simplefilter("ignore")
        example = torch.zeros(shape, device=device)
        try:
            torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=ONNX_OPSET,
                              input_names=["volume"], output_names=["seg", "slices"],
                              training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
        except Exception as error:  # noqa: BLE001 - the exporter raises many kinds
            raise EngineError(f"the ONNX exporter cannot export the {_arch(model)} network at "
                              f"input {shape}: {error}".splitlines()[0]) from error
    return buffer.getvalue()


def bind_weights(graph: bytes, model: nn.Module) -> bytes | None:
    """``graph`` with ``model``'s parameters as its initializers; None when the graph's initializers are
    not exactly the model's float32 parameters by name and shape (then the graph must not be used)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_from_string(graph)
    state = {_Outputs.PREFIX + name: tensor.detach().cpu().contiguous().numpy()
             for name, tensor in model.state_dict().items()}
    initializers = proto.graph.initializer
    if {tensor.name for tensor in initializers} != set(state) or len(initializers) != len(state):
        return None
    for tensor in initializers:
        array = state[tensor.name]
        if tensor.data_type != onnx.TensorProto.FLOAT or array.dtype != np.float32 \
                or tuple(tensor.dims) != array.shape:
            return None
        tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    return proto.SerializeToString()


class _OnnxEngine(Engine):
    """Shared by the ONNX engines: the graph of a network at a shape, from the cache or exported."""

    cpu_only = True
    persistent = True
    suffix = ".onnx"

    def graph_fields(self, model: nn.Module, shape: tuple[int, ...], weights: str | None,
                     coarse: bool = False) -> dict:
        """What an ONNX graph depends on (the cache key); ``weights``: the weights' sha256 when they
        are baked in (a graph that could not be shared), else None; ``coarse``: the graph of
        ``forward_coarse``."""
        config = dict(getattr(model, "config", {}))
        config.pop("arch", None)
        return {"artefact": "onnx-graph", "export_version": EXPORT_VERSION, "exporter": f"torch {torch.__version__}",
                "opset": ONNX_OPSET, "arch": _arch(model), "config": config,
                "model_code": model_code_digest(), "input_shape": list(shape), "dtype": "float32",
                "outputs": "coarse" if coarse else "full", "weights_sha256": weights}

    def _graph(self, fields: dict, model: nn.Module, shape) -> bytes:
        graph = self.cache.load(fields, self.suffix)
        if graph is not None:
            self.stats["from_cache"] += 1
            return graph
        with self.timed("export_seconds"):
            graph = export_onnx(model, shape, fields["outputs"] == "coarse")
        self.stats["exported"] += 1
        self.cache.store(fields, self.suffix, graph)
        return graph

    def onnx_for(self, model: nn.Module, shape: tuple[int, ...], coarse: bool = False) -> bytes:
        """The ONNX of ``model`` (``forward_coarse`` when ``coarse``) at ``shape`` with its own weights:
        the architecture's shared graph with the weights bound, or (when they cannot be bound) a graph
        of its own."""
        shared = self.graph_fields(model, shape, None, coarse)
        graph = self._graph(shared, model, shape)
        with self.timed("load_seconds"):
            bound = bind_weights(graph, model)
        if bound is not None:
            return bound
        self.stats["rejected"] += 1
        log.warning("engine %s: the shared %s graph at %s does not bind this network's weights; exporting its own",
                    self.name, shared["arch"], shape)
        return self._graph(self.graph_fields(model, shape, weights_digest(model), coarse), model, shape)

    def prepare(self, model, precision, coarse=False):
        return _PerShape(self, lambda shape: self.load(self.onnx_for(model, shape, coarse), precision))

    def load(self, graph: bytes, precision: str) -> Runner:
        raise NotImplementedError


class OnnxRuntimeEngine(_OnnxEngine):
    """ONNX Runtime, CPU execution provider, float32 (module docstring)."""

    name = "onnxruntime"
    precisions = ("fp32",)

    @property
    def version(self) -> str:
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}"

    def load(self, graph, precision):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.enable_cpu_mem_arena = False  # activations go back after each run (module docstring)
        options.log_severity_level = 3
        with self.timed("load_seconds"):
            session = onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])

        def run(batch):
            volume = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
            seg, slices = session.run(["seg", "slices"], {"volume": volume})
            return torch.from_numpy(seg), torch.from_numpy(slices)

        return Runner(run)


class OpenVinoEngine(_OnnxEngine):
    """OpenVINO, CPU plugin, float32 or native bfloat16 (module docstring)."""

    name = "openvino"
    precisions = ("fp32", "bf16")
    _HINTS = {"fp32": "f32", "bf16": "bf16"}

    def __init__(self, device, cache_dir):
        super().__init__(device, cache_dir)
        self._core = None

    @property
    def version(self) -> str:
        import openvino

        return f"openvino {openvino.__version__}"

    def resolve_precision(self, name):
        precision = super().resolve_precision(name)
        if precision == "bf16" and not native_bf16(self.device):
            raise EngineError("engine openvino runs bfloat16 only on a CPU that computes it natively "
                              "(AVX-512 BF16 or AMX); use --precision fp32")
        return precision

    def compile(self, graph: bytes, precision: str, extra: dict | None = None):
        """OpenVINO's compiled model of an ONNX ``graph`` at concrete ``precision`` (one stream, this
        process's thread count, latency hint); ``extra``: more CPU-plugin settings (the bench's
        ``PERF_COUNT``)."""
        import openvino

        if self._core is None:
            self._core = openvino.Core()
        config = {"INFERENCE_PRECISION_HINT": self._HINTS[precision], "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": torch.get_num_threads(), "NUM_STREAMS": 1, **(extra or {})}
        with self.timed("load_seconds"):
            return self._core.compile_model(self._core.read_model(graph), "CPU", config)

    def load(self, graph, precision):
        compiled = self.compile(graph, precision)

        def run(batch):
            volume = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
            results = compiled(volume)  # copies of the outputs (share_outputs is off)
            return torch.from_numpy(results["seg"]), torch.from_numpy(results["slices"])

        return Runner(run, compiled.release_memory)


# --- the artefact cache -------------------------------------------------------------------------


class ArtefactCache:
    """Artefacts by key under ``folder``, each with a record of its fields and sha256 (module docstring)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._unwritable_warned = False

    def paths(self, fields: dict, suffix: str) -> tuple[Path, Path]:
        key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
        folder = self.folder / fields["artefact"]
        return folder / f"{key}{suffix}", folder / f"{key}.json"

    def load(self, fields: dict, suffix: str) -> bytes | None:
        """The artefact of ``fields``, or None when absent, stale or corrupt (then it is rebuilt)."""
        artefact, record_path = self.paths(fields, suffix)
        if not artefact.exists() and not record_path.exists():
            return None
        try:
            record = json.loads(record_path.read_text())
            payload = artefact.read_bytes()
        except (OSError, ValueError) as error:
            log.warning("engine cache: %s unreadable (%s): rebuilding it", artefact, error)
            return None
        if not isinstance(record, dict) or record.get("format") != CACHE_FORMAT or record.get("fields") != fields:
            log.warning("engine cache: %s is stale (its record is for something else): rebuilding it", artefact)
            return None
        if record.get("sha256") != hashlib.sha256(payload).hexdigest() or record.get("bytes") != len(payload):
            log.warning("engine cache: %s is corrupt (sha256 differs from its record): rebuilding it", artefact)
            return None
        return payload

    def store(self, fields: dict, suffix: str, payload: bytes) -> None:
        """Write the artefact, then its record, each atomically; a failure only logs (no reuse)."""
        artefact, record_path = self.paths(fields, suffix)
        record = {"format": CACHE_FORMAT, "fields": fields, "sha256": hashlib.sha256(payload).hexdigest(),
                  "bytes": len(payload)}
        try:
            artefact.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomically(artefact, payload)
            write_bytes_atomically(record_path, (json.dumps(record, indent=1) + "\n").encode())
        except OSError as error:
            if not self._unwritable_warned:
                log.warning("engine cache: cannot write under %s (%s): exports are not kept", self.folder, error)
                self._unwritable_warned = True
