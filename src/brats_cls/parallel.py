"""Inference at scale: shards of the case list across machines, one worker per device of a node, and a
check, before any work, that the memory limit holds the run (issue #25).

**Shards** (``brats-cls infer --shard K/N``; in the image ``BRATS_CLS_SHARD=K/N``): shard K of N,
numbered from 1 (:class:`brats_cls.cases.Shard`, which says why), split by
:func:`brats_cls.cases.split_discovery`: round robin over the sorted case IDs, so N machines that see
the same input folder take disjoint parts that cover it, with no coordination. A shard is a run of its
own: its failures file lists its cases only, its exit status is its own, and it removes only what a
killed run left of its own cases in the output folder (shards may share one).

**Workers** (``--devices``). ``auto`` (the default) runs one worker per CUDA device when more than one
is visible and ``--device`` allows CUDA, else one process, exactly as without this module; a count N
runs N workers on ``--device`` (``cuda``: devices 0 to N-1); a comma list names each worker's device
(``cuda:0,cuda:1``, ``cpu,cpu``). One device means one process, no worker. Worker w takes part w of the
run's share, by the same split rule. Workers are processes of torch.multiprocessing's ``spawn`` context
(CUDA cannot be forked), each loading the models once onto its device. They exchange nothing, so there
is no process group (neither NCCL nor gloo): a collective with a dead peer blocks or fails the
survivors, which must instead finish their cases. Each worker writes its own masks (the atomic write
of :mod:`brats_cls.io`; the parts are disjoint, so each mask has one writer) and, after every case,
its summary so far to a JSON file in a private temporary folder; the run combines those into one
summary and one failures file. A worker that dies (a signal, such as the out-of-memory killer's
SIGKILL, or an error outside any case) loses nothing that was written; each case of its part that it
had not finished is failed with a message naming the worker, its device and how it died, so the run
exits 1. Each worker gets ``cores / workers`` torch threads unless ``OMP_NUM_THREADS`` is set. SIGTERM
and SIGINT are passed on to the workers, and the run ends the way the signal ends one process.

**Shared memory.** ``train`` checks ``/dev/shm`` because its DataLoader workers pass batches through
it. Inference workers pass nothing through it: each reads its cases from disk and writes its masks
and its JSON record to files; only file paths and settings cross to a worker, pickled once through
the pipe that starts it. So ``/dev/shm`` needs no free space for them, and there is no check to make:
``tests/test_container.py`` runs two workers in the image under ``--shm-size 1m``.

**Memory.** Before any work, the memory a run needs (:func:`memory_needed`: :data:`WORKER_PEAK_RSS`
per worker, plus :data:`LAUNCHER_RSS` for the process that starts several) is compared with the
memory limit of the run's cgroup (:func:`memory_limit`: cgroup v2 ``memory.max``, v1
``memory/memory.limit_in_bytes``, the lowest along the cgroup's path) less the anonymous memory that
other processes of that cgroup already hold (the image's entry point, for one). When it does not fit,
the run stops with exit status 2 and a message naming the limit, where it was read, and what is
needed, instead of being killed by the kernel part of the way through. Under ``--devices auto`` the
run uses as many devices as the limit holds, and says so. No limit (or none readable): no check.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import signal
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .cases import Discovery, split_discovery
from .device import DeviceError, resolve_device, resolve_precision
from .engines import choose_engine
from .inference import RunOptions, RunSummary, clean_output_folder, run_inference, segment_cases
from .io import write_json_atomically
from .predictor import Predictor, flip_combinations
from .weights import ensemble_weights, load_ensemble

log = logging.getLogger(__name__)

GIB = 1024 ** 3
MIB = 1024 ** 2
#: Peak RSS of one worker, for the shipped ensemble (10 demo-size models, 8 flips) on a 240 x 240 x 155
#: case. Measured on two phantoms (``brats-cls synth --cases 2 --seed 11``) with ``OMP_NUM_THREADS=1
#: /usr/bin/time -v brats-cls infer --device cpu`` ("Maximum resident set size"): 2.00 GiB with bf16
#: autocast (``auto`` on this CPU, which has AVX-512 BF16), 2.31 GiB with ``--precision fp32`` (``auto``
#: on CPUs without it), 1.72 GiB for the second phantom; 1.25 GiB with ``--no-tta``, 1.78 GiB with one
#: model (so the flipped copies and the activations of one case, not the models, make most of it). The
#: two workers of ``--devices 2 --device cpu`` on the two phantoms (VmHWM read from /proc every 0.5 s):
#: 1.99 and 1.70 GiB. 2.31 GiB rounded up to 2.5 GiB. RSS counts the file-backed pages of torch's
#: libraries too, which processes share and the kernel can reclaim, so the sum over workers errs on the
#: safe side. A CUDA worker keeps its activations on the GPU but adds the CUDA context to its host
#: memory: not measured (no GPU was available); the same figure is used.
WORKER_PEAK_RSS = int(2.5 * GIB)
#: Peak RSS of the process that starts the workers (brats-cls imported, the weights checked, no case):
#: 0.51 GiB in the two-worker run above, and 14 MiB for multiprocessing's resource tracker; 0.6 GiB.
LAUNCHER_RSS = int(0.6 * GIB)
#: A cgroup v1 limit at or above this is "no limit" (the kernel reports about 2**63 then).
_UNLIMITED = 1 << 60


# ------------------------------------------------------------------------------ devices


def _cuda_device(name: str, cuda_count: int) -> torch.device:
    match = re.fullmatch(r"cuda:(\d+)", name)
    if match is None:
        raise DeviceError(f"--devices: {name!r} is not cpu or cuda:INDEX (such as cuda:0)")
    index = int(match.group(1))
    if index >= cuda_count:
        raise DeviceError(f"--devices: {name} asked for, but {cuda_count} CUDA device(s) are visible")
    return torch.device("cuda", index)


def worker_devices(spec: str, device: str = "auto", cuda_count: int | None = None) -> list[torch.device]:
    """The device of each worker that ``--devices SPEC`` with ``--device DEVICE`` asks for (module
    docstring); one device means one process. ``cuda_count``: the CUDA devices visible (default: ask
    torch). Raises :class:`~brats_cls.device.DeviceError` (a ``ValueError``) saying what is wrong."""
    cuda_count = torch.cuda.device_count() if cuda_count is None else cuda_count
    spec = spec.strip()
    if spec == "auto":
        if device in ("auto", "cuda") and cuda_count > 1:
            return [torch.device("cuda", index) for index in range(cuda_count)]
        return [resolve_device(device)]
    if spec.isdigit():
        count = int(spec)
        if count < 1:
            raise DeviceError("--devices: at least 1 worker")
        if device == "cpu" or (device == "auto" and cuda_count == 0):
            return [torch.device("cpu")] * count
        if count > cuda_count:
            raise DeviceError(f"--devices {count}: {cuda_count} CUDA device(s) are visible")
        return [torch.device("cuda", index) for index in range(count)]
    devices = [torch.device("cpu") if name.strip() == "cpu" else _cuda_device(name.strip(), cuda_count)
               for name in spec.split(",")]
    if device == "auto" or all(named.type == device for named in devices):
        return devices
    raise DeviceError(f"--devices {spec} names devices other than --device {device}")


# ------------------------------------------------------------------------------ memory


@dataclass(frozen=True)
class MemoryLimit:
    """A cgroup's memory limit, where it was read, and what other processes of the cgroup hold."""

    limit: int  # bytes
    source: str  # the file
    used_by_others: int = 0  # anonymous memory of the cgroup's other processes, bytes


class MemoryShortage(Exception):
    """The run does not fit in the memory limit; the message names the limit and what is needed."""


def _own_cgroup_paths(own_cgroups: Path) -> tuple[str | None, str | None]:
    """``(v2 path, v1 memory path)`` of this process, from ``/proc/self/cgroup``."""
    v2 = v1 = None
    try:
        lines = own_cgroups.read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif "memory" in parts[1].split(","):
            v1 = parts[2]
    return v2, v1


def _folders_up(root: Path, path: str | None) -> list[Path]:
    """``root/path`` and every folder above it up to ``root``; in a container, whose cgroup is mounted
    at ``root`` while ``path`` names the host's, only those that exist."""
    folders = [root]
    relative = Path((path or "").lstrip("/"))
    if relative != Path("."):
        folders += [root / relative.parents[index] for index in range(len(relative.parents) - 1)] + [root / relative]
    return [folder for folder in folders if folder.is_dir()]


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _anonymous_bytes(stat_file: Path, keys: Sequence[str]) -> int:
    try:
        fields = dict(line.split() for line in stat_file.read_text().splitlines() if len(line.split()) == 2)
    except (OSError, ValueError):
        return 0
    for key in keys:
        if fields.get(key, "").isdigit():
            return int(fields[key])
    return 0


def own_anonymous_bytes(status: Path = Path("/proc/self/status")) -> int:
    """This process's anonymous resident memory (``RssAnon``), bytes; 0 when unknown."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def memory_limit(cgroup_root: Path = Path("/sys/fs/cgroup"), own_cgroups: Path = Path("/proc/self/cgroup"),
                 own_anonymous: int | None = None) -> MemoryLimit | None:
    """The lowest memory limit along this process's cgroup path (v2 ``memory.max``, v1
    ``memory/memory.limit_in_bytes``), with the anonymous memory that the cgroup's other processes hold
    (its ``memory.stat`` ``anon`` / ``total_rss``, less ``own_anonymous``: default this process's);
    None without a limit."""
    v2, v1 = _own_cgroup_paths(own_cgroups)
    candidates = []  # (limit, limit file, stat file, anonymous-memory keys)
    for folder in _folders_up(cgroup_root, v2):
        candidates.append((_read_int(folder / "memory.max"), folder / "memory.max", folder / "memory.stat", ("anon",)))
    for folder in _folders_up(cgroup_root / "memory", v1):
        candidates.append((_read_int(folder / "memory.limit_in_bytes"), folder / "memory.limit_in_bytes",
                           folder / "memory.stat", ("total_rss", "rss")))
    limits = [candidate for candidate in candidates if candidate[0] is not None and candidate[0] < _UNLIMITED]
    if not limits:
        return None
    limit, source, stat_file, keys = min(limits, key=lambda candidate: candidate[0])
    own = own_anonymous_bytes() if own_anonymous is None else own_anonymous
    return MemoryLimit(limit, str(source), max(0, _anonymous_bytes(stat_file, keys) - own))


def memory_needed(workers: int) -> int:
    """Bytes that a run of ``workers`` workers needs (one: the one process)."""
    return workers * WORKER_PEAK_RSS + (LAUNCHER_RSS if workers > 1 else 0)


def workers_that_fit(limit: MemoryLimit | None, wanted: int) -> int:
    """The most workers, up to ``wanted``, whose run fits in ``limit`` (0: not even one)."""
    if limit is None:
        return wanted
    room = limit.limit - limit.used_by_others
    return max((count for count in range(wanted + 1) if count == 0 or memory_needed(count) <= room), default=0)


def _size(count: int) -> str:
    return f"{count / GIB:.2f} GiB" if count >= GIB else f"{count / MIB:.0f} MiB"


def check_memory(workers: int, limit: MemoryLimit | None) -> None:
    """Raise :class:`MemoryShortage` unless a run of ``workers`` workers fits in ``limit``."""
    if workers_that_fit(limit, workers) >= workers:
        return
    needed = memory_needed(workers)
    others = f", of which other processes of the cgroup hold {_size(limit.used_by_others)}" if limit.used_by_others else ""
    each = f"{_size(WORKER_PEAK_RSS)} per worker (the peak RSS measured for the shipped ensemble on a 240 x 240 x 155 case)"
    launcher = f" and {_size(LAUNCHER_RSS)} for the process that starts them" if workers > 1 else ""
    suggestion = math.ceil((needed + limit.used_by_others) / GIB + 0.5)
    raise MemoryShortage(
        f"the memory limit is {_size(limit.limit)} ({limit.source}){others}, but {workers} worker(s) need about "
        f"{_size(needed)}: {each}{launcher}. Give the run more memory (docker run --memory {suggestion}g)"
        + (" or fewer workers (--devices)" if workers > 1 else ""))


def choose_devices(spec: str, device: str = "auto", limit: MemoryLimit | None = None,
                   cuda_count: int | None = None) -> tuple[list[torch.device], str | None]:
    """The workers' devices for ``--devices SPEC --device DEVICE`` (:func:`worker_devices`) that fit
    in ``limit``, and a warning to print when ``auto`` leaves devices out for want of memory. Raises
    :class:`MemoryShortage` when even one worker does not fit, or not all the devices named do."""
    devices = worker_devices(spec, device, cuda_count)
    fitting = workers_that_fit(limit, len(devices))
    warning = None
    if spec.strip() == "auto" and fitting < len(devices):
        if fitting >= 1:
            warning = (f"Warning: the memory limit ({_size(limit.limit)}, {limit.source}) holds {fitting} of "
                       f"{len(devices)} workers: using {', '.join(map(str, devices[:fitting]))}")
        devices = devices[:max(fitting, 1)]  # not even one: the message names what one needs
    check_memory(len(devices), limit)
    return devices, warning


# ------------------------------------------------------------------------------ the ensemble a worker loads


@dataclass(frozen=True)
class EnsembleSpec:
    """What each worker loads and how its Predictor runs (plain values: it is pickled to the workers)."""

    weights_dir: Path
    selection: str | None = None
    tta: bool = True
    precision: str = "auto"
    suppression: bool = True
    label_scheme: str = "auto"
    et_min_voxels: int = 0
    engine: str = "eager"  # brats_cls.engines: what runs the networks (auto: choose_engine per device)
    engine_cache: Path | None = None


def load_predictor(spec: EnsembleSpec, device: torch.device) -> tuple[Predictor, list[str]]:
    """The spec's models, loaded once onto ``device``, in a :class:`Predictor`, and their names.
    Raises :class:`~brats_cls.weights.WeightsError` or ``ValueError`` (a bad checkpoint, device or
    precision)."""
    models, entries = load_ensemble(spec.weights_dir, spec.selection, device, skip_unweighted=True)
    predictor = Predictor(models, tta=spec.tta, precision=spec.precision, suppression=spec.suppression,
                          label_scheme=spec.label_scheme, et_min_voxels=spec.et_min_voxels,
                          weights=ensemble_weights(entries), engine=spec.engine, engine_cache=spec.engine_cache)
    return predictor, [entry.get("name", entry["file"]) for entry in entries]


def _engine_suffix(names) -> str:
    """`` with NAME[/NAME]`` for the start line; nothing for eager alone."""
    names = sorted(set(names))
    return "" if names == ["eager"] else f" with {'/'.join(names)}"


class EnsembleRun:
    """A run of the ensemble on ``devices``: one process on one device (the models loaded here), or
    one worker per device. Made by :meth:`prepare`, which raises before any work on bad weights, a bad
    device or precision (:class:`~brats_cls.weights.WeightsError` or ``ValueError``); then :meth:`run`."""

    def __init__(self, spec: EnsembleSpec, devices: Sequence[torch.device], predictor: Predictor | None,
                 names: list[str]):
        self.spec, self.devices, self.predictor, self.names = spec, list(devices), predictor, names
        self.precisions: list[str] = []

    @classmethod
    def prepare(cls, spec: EnsembleSpec, devices: Sequence[torch.device]) -> "EnsembleRun":
        """One device: load the Predictor. Several: check the weights as every worker will load them
        (manifest, sha256, checkpoints: loaded on the CPU, then dropped) and the precision on each
        device, so that a bad one is a usage error before any worker starts."""
        if len(devices) == 1:
            predictor, names = load_predictor(spec, devices[0])
            return cls(spec, devices, predictor, names)
        _, entries = load_ensemble(spec.weights_dir, spec.selection, "cpu", skip_unweighted=True)
        for device in set(devices):
            resolve_precision(spec.precision, device)
        return cls(spec, devices, None, [entry.get("name", entry["file"]) for entry in entries])

    def run(self, discovery: Discovery, output_dir: Path, options: RunOptions) -> RunSummary:
        """Segment ``discovery`` into ``output_dir``: :func:`~brats_cls.inference.run_inference`, or
        :func:`run_workers`."""
        if self.predictor is not None:
            return run_inference(discovery, output_dir, self.predictor, self.names, options)
        summary, self.precisions = run_workers(discovery, output_dir, self.spec, self.devices, options)
        return summary

    def describe(self) -> str:
        """``10 model(s) x 8 flip(s), bf16 on cpu`` (or ``... on 2 workers (cpu, cpu)``; precisions once run)."""
        flips = len(flip_combinations(self.spec.tta))
        if self.predictor is not None:
            engine = _engine_suffix([self.predictor.engine.name])
            return (f"{len(self.names)} model(s) x {flips} flip(s), {self.predictor.precision} on {self.predictor.device}"
                    f"{engine}")
        # each worker resolves ``auto`` for its own device, as choose_engine does there
        engine = _engine_suffix({choose_engine(self.spec.engine, device, self.spec.precision) for device in self.devices})
        precision = "/".join(sorted(set(self.precisions))) or self.spec.precision
        return (f"{len(self.names)} model(s) x {flips} flip(s), {precision} on {len(self.devices)} workers "
                f"({', '.join(map(str, self.devices))}){engine}")


# ------------------------------------------------------------------------------ workers


def _worker(index: int, device: torch.device, part: Discovery, output_dir: Path, spec: EnsembleSpec,
            options: RunOptions, record: Path, log_level: int, threads: int | None) -> None:
    """One worker (a spawned process): load the models once, segment ``part``, keep ``record`` up to date."""
    logging.basicConfig(level=log_level, format=f"%(levelname)s worker {index} %(name)s: %(message)s")
    if threads is not None:
        torch.set_num_threads(threads)
    state = {"device": str(device), "precision": None, "finished": False, **RunSummary().to_dict()}
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        predictor, names = load_predictor(spec, device)
        state["precision"] = predictor.precision
        write_json_atomically(record, state)

        def progress(summary: RunSummary) -> None:
            write_json_atomically(record, {**state, **summary.to_dict()})

        summary = segment_cases(part, output_dir, predictor, names, options, after_each=progress)
        write_json_atomically(record, {**state, **summary.to_dict(), "finished": True})
    except Exception as error:
        with contextlib.suppress(OSError):
            previous = json.loads(record.read_text()) if record.exists() else state
            write_json_atomically(record, {**previous, "error": f"{type(error).__name__}: {error}"})
        raise  # multiprocessing prints the traceback; the exit status is 1


def _how_it_ended(exitcode: int | None, record: dict | None) -> str:
    if record and record.get("error"):
        return f"stopped with {record['error']}"
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        why = " (the kernel's out-of-memory killer, or kill -9)" if -exitcode == signal.SIGKILL else ""
        return f"was killed by {name}{why}"
    return f"exited with status {exitcode} before finishing"


@contextlib.contextmanager
def _passing_signals_on(processes) -> Iterator[list[int]]:
    """While the workers run, SIGTERM and SIGINT go on to them; the signals received are yielded."""
    received: list[int] = []

    def forward(signum, _frame):
        received.append(signum)
        for process in processes:
            if process.is_alive():
                with contextlib.suppress(OSError):
                    os.kill(process.pid, signum)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_workers(discovery: Discovery, output_dir: Path, spec: EnsembleSpec, devices: Sequence[torch.device],
                options: RunOptions) -> tuple[RunSummary, list[str]]:
    """One worker per entry of ``devices`` over ``discovery`` (module docstring): the run's summary and
    the precision each worker ran in. Like :func:`~brats_cls.inference.run_inference`, removes what a
    killed run left in ``output_dir`` first and writes the failures file of the whole run at the end."""
    started = time.perf_counter()
    clean_output_folder(discovery, output_dir, options)
    cases_only = Discovery(discovery.cases, [])
    parts = [split_discovery(cases_only, index, len(devices)) for index in range(len(devices))]
    threads = None if os.environ.get("OMP_NUM_THREADS") else max(1, len(os.sched_getaffinity(0)) // len(devices))
    context = torch.multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="brats-cls-workers-") as folder:
        records = [Path(folder) / f"worker{index}.json" for index in range(len(devices))]
        processes = [
            context.Process(target=_worker, name=f"brats-cls worker {index}",
                            args=(index, device, part, output_dir, spec,
                                  replace(options, failures_path=None, progress_label=f"worker {index} ({device})",
                                          progress_line=index),
                                  record, logging.getLogger().getEffectiveLevel(), threads))
            for index, (device, part, record) in enumerate(zip(devices, parts, records))]
        with _passing_signals_on(processes) as received:
            for index, process in enumerate(processes):
                if received:  # a signal while starting them: start no more
                    break
                process.start()
                log.info("worker %d (%s, pid %d): %d case(s)", index, devices[index], process.pid,
                         len(parts[index].cases))
            for process in processes:
                if process.pid is not None:
                    process.join()
        outcomes = [_read_record(record) for record in records]
    if received:  # end as one process ends on that signal (the workers had it passed on)
        signal.raise_signal(received[0])
    summaries = [RunSummary(failed={error.case_id: str(error) for error in discovery.errors})]
    for error in discovery.errors:
        log.error("%s", error)
    for index, (process, part, record) in enumerate(zip(processes, parts, outcomes)):
        summary = RunSummary.from_dict(record) if record else RunSummary()
        if process.exitcode != 0 or not (record and record.get("finished")):
            how = _how_it_ended(process.exitcode, record)
            done = {*summary.written, *summary.skipped, *summary.failed}
            lost = [case.case_id for case in part.cases if case.case_id not in done]
            for case_id in lost:
                summary.failed[case_id] = f"case {case_id}: not segmented: worker {index} ({devices[index]}) {how}"
            log.error("worker %d (%s) %s: %d case(s) of its part not segmented%s", index, devices[index], how,
                      len(lost), f" ({', '.join(lost)})" if lost else "")
        summaries.append(summary)
    summary = RunSummary.combined(summaries, time.perf_counter() - started)
    if options.failures_path is not None:
        write_json_atomically(options.failures_path, summary.to_dict())
    return summary, [record["precision"] for record in outcomes if record and record.get("precision")]
