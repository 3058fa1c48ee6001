"""Inference at scale (brats_cls.parallel, issue #25): the shard split, ``--shard``, the workers of
``--devices`` on the CPU, a worker that dies, signals, and the memory check against cgroup files.

The multi-worker runs start ``python -m brats_cls infer`` as a process, as a user does, on 4 small
phantom cases with tiny real models (2 CPU workers on 2 cores: slow-ish, not flaky)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from brats_cls.cases import Case, CaseError, Discovery, Shard, find_cases, parse_shard, split_discovery
from brats_cls.device import DeviceError
from brats_cls.engines import choose_engine
from brats_cls.parallel import (GIB, LAUNCHER_RSS, WORKER_PEAK_RSS, EnsembleRun, EnsembleSpec, MemoryLimit,
                                MemoryShortage, check_memory, choose_devices, memory_limit, memory_needed,
                                worker_devices, workers_that_fit)
from brats_cls.synth import SMALL_SHAPE, write_cases
from test_inference import make_weights

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def four_cases(tmp_path_factory) -> Path:
    """4 small phantom cases, 2023 naming (the 3rd healthy). Read-only: copy before changing."""
    out = tmp_path_factory.mktemp("four_cases")
    write_cases(out, 4, seed=64, naming="2023", start_index=1, shape=SMALL_SHAPE, healthy_indices={3},
                progress=False)
    return out


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return make_weights(tmp_path_factory.mktemp("scale_weights"))


@pytest.fixture(scope="module")
def one_process_masks(four_cases, weights, tmp_path_factory) -> dict[str, bytes]:
    """What one process writes for the four cases: the reference of every multi-worker run."""
    out = tmp_path_factory.mktemp("one_process")
    result = infer(four_cases, out, weights)
    assert result.returncode == 0, result.stderr
    return {path.name: path.read_bytes() for path in out.iterdir()}


def infer_command(inputs: Path, output: Path, weights: Path, *flags) -> list[str]:
    return [sys.executable, "-m", "brats_cls", "infer", "--input", str(inputs), "--output", str(output),
            "--weights", str(weights), "--quiet", *map(str, flags)]


def infer(inputs: Path, output: Path, weights: Path, *flags) -> subprocess.CompletedProcess:
    return subprocess.run(infer_command(inputs, output, weights, *flags), capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def ids_of(folder: Path) -> list[str]:
    return sorted(path.name[: -len(".nii.gz")] for path in folder.iterdir())


def case(case_id: str) -> Case:
    return Case(case_id, "2023", {})


# ------------------------------------------------------------------------------ the split rule


def test_split_is_round_robin_over_sorted_ids_with_malformed_cases_in_one_part():
    ids = ["C", "A", "E", "B", "D"]  # discovery sorts its cases; the split sorts again, cases and errors alike
    discovery = Discovery([case(i) for i in sorted(ids)], [CaseError("B2", "missing modality"), CaseError("C", "dup")])
    parts = [split_discovery(discovery, part, 3) for part in range(3)]
    # sorted IDs: A B B2 C D E -> 0: A C, 1: B D, 2: B2 E (the duplicate error "C" goes with case C)
    assert [[c.case_id for c in p.cases] for p in parts] == [["A", "C"], ["B", "D"], ["E"]]
    assert [[e.case_id for e in p.errors] for p in parts] == [["C"], [], ["B2"]]
    seen = [c.case_id for p in parts for c in p.cases]
    assert sorted(seen) == sorted(ids) and len(seen) == len(set(seen))
    assert split_discovery(discovery, 0, 1).cases == discovery.cases
    assert split_discovery(Discovery([case("A")], []), 1, 2).cases == []  # more parts than cases: empty parts
    for bad in ((-1, 2), (2, 2), (0, 0)):
        with pytest.raises(ValueError):
            split_discovery(discovery, *bad)


def test_parse_shard_is_one_based():
    assert parse_shard("1/4") == Shard(1, 4) and parse_shard(" 4 / 4 ") == Shard(4, 4) and str(Shard(2, 3)) == "2/3"
    assert [c.case_id for c in Shard(2, 2).select(Discovery([case(i) for i in "ABCD"], [])).cases] == ["B", "D"]
    for bad in ("0/4", "5/4", "1/0", "1", "a/b", "1/4/2", "-1/4", ""):
        with pytest.raises(ValueError, match="K"):
            parse_shard(bad)


# ------------------------------------------------------------------------------ --shard


def test_shards_share_an_output_folder_each_with_its_own_failures_and_status(four_cases, weights, one_process_masks,
                                                                            tmp_path):
    inputs = shutil.copytree(four_cases, tmp_path / "in")
    broken = find_cases(inputs).cases[0]  # position 0: shard 1 of 2
    broken.modalities["t1ce"].write_bytes(broken.modalities["t1ce"].read_bytes()[:500])
    out = tmp_path / "out"
    out.mkdir()
    # a killed run of shard 2's second case left a temporary; shard 2 removes it, shard 1 must not
    stale_of_shard_2 = out / ".BraTS-GLI-00004-000.nii.gz.x1y2.tmp"
    stale_of_shard_2.write_bytes(b"partial")
    first = infer(inputs, out, weights, "--shard", "1/2", "--failures", tmp_path / "f1.json")
    assert stale_of_shard_2.exists()
    assert first.returncode == 1 and "shard 1/2: 1 case(s) written" in first.stdout, first.stdout + first.stderr
    second = infer(inputs, out, weights, "--shard", "2/2", "--failures", tmp_path / "f2.json")
    assert second.returncode == 0 and "shard 2/2: 2 case(s) written" in second.stdout, second.stdout + second.stderr
    assert not stale_of_shard_2.exists()
    records = [json.loads((tmp_path / f"f{k}.json").read_text()) for k in (1, 2)]
    ids = [c.case_id for c in find_cases(four_cases).cases]
    assert records[0] == {"written": [ids[2]], "skipped": [], "failed": {ids[0]: records[0]["failed"][ids[0]]}}
    assert records[1] == {"written": [ids[1], ids[3]], "skipped": [], "failed": {}}
    assert ids_of(out) == ids[1:]
    for name, payload in one_process_masks.items():
        if name != broken.output_name:
            assert (out / name).read_bytes() == payload, name


@pytest.mark.parametrize("value", ["0/2", "3/2", "2", "one/two"])
def test_a_bad_shard_is_a_usage_error(four_cases, weights, tmp_path, value):
    result = infer(four_cases, tmp_path, weights, "--shard", value)
    assert result.returncode == 2 and "--shard" in result.stderr and list(tmp_path.iterdir()) == [], result.stderr


# ------------------------------------------------------------------------------ workers


def test_worker_devices_known_answers():
    assert worker_devices("auto", "auto", cuda_count=0) == [CPU]  # one process, as without --devices
    assert worker_devices("auto", "auto", cuda_count=3) == [torch.device("cuda", i) for i in range(3)]
    assert worker_devices("auto", "cpu", cuda_count=3) == [CPU]
    assert worker_devices("2", "cpu", cuda_count=3) == [CPU, CPU]
    assert worker_devices("2", "auto", cuda_count=0) == [CPU, CPU]
    assert worker_devices("2", "cuda", cuda_count=3) == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert worker_devices("cuda:1,cuda:0", "auto", cuda_count=2) == [torch.device("cuda", 1), torch.device("cuda", 0)]
    assert worker_devices("cpu, cpu", "cpu", cuda_count=0) == [CPU, CPU]
    for spec, device, count, message in (("0", "cpu", 0, "at least 1"), ("3", "cuda", 2, "2 CUDA device"),
                                         ("cuda:2", "auto", 2, "2 CUDA device"), ("gpu0", "auto", 1, "cpu or cuda:INDEX"),
                                         ("cuda", "auto", 1, "cpu or cuda:INDEX"),
                                         ("cpu,cuda:0", "cpu", 1, "other than --device cpu")):
        with pytest.raises(DeviceError, match=message):
            worker_devices(spec, device, cuda_count=count)


def test_the_workers_start_line_names_the_engine_each_resolves_not_auto(weights):
    cpu = [torch.device("cpu")] * 2
    run = EnsembleRun(EnsembleSpec(Path(weights), engine="auto", precision="fp32"), cpu, None, ["a", "b"])
    expected = choose_engine("auto", "cpu", "fp32")  # openvino where installed (requirements.txt pins it)
    assert run.describe() == f"2 model(s) x 8 flip(s), fp32 on 2 workers (cpu, cpu) with {expected}"
    eager = EnsembleRun(EnsembleSpec(Path(weights), engine="eager"), cpu, None, ["a"])
    assert eager.describe().endswith("on 2 workers (cpu, cpu)")


def test_two_cpu_workers_write_the_one_process_masks_once_each(four_cases, weights, one_process_masks, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".BraTS-GLI-00001-000.nii.gz.k1ll3d.tmp").write_bytes(b"partial")  # from a killed run: removed once
    report = tmp_path / "report"
    result = infer(four_cases, out, weights, "--devices", "cpu,cpu", "--failures", tmp_path / "failures.json",
                   "--report", report, "--skip-existing")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 case(s) written, 0 skipped, 0 failed" in result.stdout
    resolved = choose_engine("auto", "cpu", "auto")  # the start line names the engine the workers run
    assert "on 2 workers (cpu, cpu)" + ("" if resolved == "eager" else f" with {resolved}") in result.stdout
    assert {p.name: p.read_bytes() for p in out.iterdir()} == one_process_masks  # nothing else in the folder
    record = json.loads((tmp_path / "failures.json").read_text())
    ids = [c.case_id for c in find_cases(four_cases).cases]
    assert record == {"written": ids, "skipped": [], "failed": {}}  # each case once: one writer per mask
    assert sorted(p.name for p in report.glob("*.json")) == [f"{i}.json" for i in ids]
    again = infer(four_cases, out, weights, "--devices", "2", "--device", "cpu", "--skip-existing")
    assert again.returncode == 0 and "0 case(s) written, 4 skipped" in again.stdout, again.stdout + again.stderr


def test_a_bad_case_in_one_workers_part_fails_only_that_case(four_cases, weights, one_process_masks, tmp_path):
    inputs = shutil.copytree(four_cases, tmp_path / "in")
    cases = find_cases(inputs).cases
    cases[1].modalities["t2"].unlink()  # malformed: found by discovery, reported once
    cases[2].modalities["t1ce"].write_bytes(cases[2].modalities["t1ce"].read_bytes()[:500])  # fails in worker 0
    out = tmp_path / "out"
    out.mkdir()
    result = infer(inputs, out, weights, "--devices", "cpu,cpu", "--failures", tmp_path / "failures.json")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "2 case(s) written, 0 skipped, 2 failed" in result.stdout
    record = json.loads((tmp_path / "failures.json").read_text())
    assert record["written"] == [cases[0].case_id, cases[3].case_id]
    assert sorted(record["failed"]) == [cases[1].case_id, cases[2].case_id]
    assert "missing modality" in record["failed"][cases[1].case_id] and "t1c" in record["failed"][cases[2].case_id]
    for name in (cases[0].output_name, cases[3].output_name):
        assert (out / name).read_bytes() == one_process_masks[name]
    assert ids_of(out) == record["written"]


def _workers_of(pid: int) -> list[int]:
    """The spawned worker processes among ``pid``'s children (not multiprocessing's resource tracker)."""
    workers = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                workers.append(int(child))
        except OSError:
            pass
    return workers


def _start_and_wait_for_workers(command: list[str], count: int) -> tuple[subprocess.Popen, list[int]]:
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    workers: list[int] = []
    while len(workers) < count and run.poll() is None and time.monotonic() < deadline:
        workers = _workers_of(run.pid)
        time.sleep(0.02)
    assert len(workers) == count, run.communicate()
    return run, workers


def test_a_worker_killed_fails_its_unfinished_cases_and_the_others_finish(four_cases, weights, one_process_masks,
                                                                          tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    failures = tmp_path / "failures.json"
    run, workers = _start_and_wait_for_workers(
        infer_command(four_cases, out, weights, "--devices", "cpu,cpu", "--failures", failures), 2)
    os.kill(workers[0], signal.SIGKILL)  # as the out-of-memory killer does, before it wrote anything
    stdout, stderr = run.communicate(timeout=600)
    assert run.returncode == 1, stdout + stderr
    ids = [c.case_id for c in find_cases(four_cases).cases]
    lost, kept = ids[0::2], ids[1::2]  # worker 0's part, worker 1's part
    assert "worker 0 (cpu) was killed by SIGKILL" in stderr and ", ".join(lost) in stderr
    record = json.loads(failures.read_text())
    assert record["written"] == kept and sorted(record["failed"]) == lost
    assert all("not segmented: worker 0 (cpu) was killed by SIGKILL" in m for m in record["failed"].values())
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {f"{i}.nii.gz": one_process_masks[f"{i}.nii.gz"]
                                                               for i in kept}


def test_sigterm_reaches_the_workers_and_ends_the_run_as_it_ends_one_process(four_cases, weights, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    run, workers = _start_and_wait_for_workers(infer_command(four_cases, out, weights, "--devices", "2",
                                                             "--device", "cpu"), 2)
    run.send_signal(signal.SIGTERM)  # the workers are still importing torch: each dies before its first case
    run.communicate(timeout=120)
    assert run.returncode == -signal.SIGTERM
    for worker in workers:  # none left behind, writing after the run ended
        assert not Path(f"/proc/{worker}").exists()
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------------------ memory


def cgroup_v2(root: Path, path: str, limits: dict[str, str], anon: int) -> tuple[Path, Path]:
    """A cgroup v2 tree under ``root`` (``memory.max`` per folder, relative to the root) and the
    ``/proc/self/cgroup`` that puts this process at ``path``."""
    for folder, value in limits.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "memory.max").write_text(value + "\n")
        (root / folder / "memory.stat").write_text(f"anon {anon}\nfile 12345\n")
    own = root.parent / "self_cgroup"
    own.write_text(f"0::{path}\n")
    return root, own


def test_memory_limit_reads_cgroup_v2_the_lowest_along_the_path(tmp_path):
    root, own = cgroup_v2(tmp_path / "v2", "/job/step", {".": str(8 * GIB), "job": str(3 * GIB), "job/step": "max"},
                          anon=GIB)
    limit = memory_limit(root, own, own_anonymous=GIB // 4)
    assert limit == MemoryLimit(3 * GIB, str(root / "job" / "memory.max"), GIB - GIB // 4)
    root, own = cgroup_v2(tmp_path / "docker", "/", {".": str(16 * GIB)}, anon=0)  # a container's own namespace
    assert memory_limit(root, own, own_anonymous=0) == MemoryLimit(16 * GIB, str(root / "memory.max"), 0)
    root, own = cgroup_v2(tmp_path / "none", "/user.slice", {".": "max", "user.slice": "max"}, anon=0)
    assert memory_limit(root, own, own_anonymous=0) is None
    assert memory_limit(tmp_path / "missing", tmp_path / "missing_self", own_anonymous=0) is None


def test_memory_limit_reads_cgroup_v1_in_a_container(tmp_path):
    """Docker on cgroup v1 mounts the container's own memory cgroup at /sys/fs/cgroup/memory, while
    /proc/self/cgroup names the host's path (which does not exist inside)."""
    memory = tmp_path / "cg" / "memory"
    memory.mkdir(parents=True)
    (memory / "memory.limit_in_bytes").write_text(f"{700 * 1024 ** 2}\n")
    (memory / "memory.stat").write_text(f"cache 999\nrss 100\ntotal_rss {300 * 1024 ** 2}\n")
    own = tmp_path / "self_cgroup"
    own.write_text("12:pids:/docker/abc\n4:memory:/docker/abc\n1:name=systemd:/docker/abc\n0::/\n")
    limit = memory_limit(tmp_path / "cg", own, own_anonymous=100 * 1024 ** 2)
    assert limit == MemoryLimit(700 * 1024 ** 2, str(memory / "memory.limit_in_bytes"), 200 * 1024 ** 2)
    (memory / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert memory_limit(tmp_path / "cg", own, own_anonymous=0) is None


def test_memory_check_names_the_limit_and_what_is_needed():
    assert memory_needed(1) == WORKER_PEAK_RSS and memory_needed(3) == 3 * WORKER_PEAK_RSS + LAUNCHER_RSS
    check_memory(4, None)  # no limit: nothing to check
    template = MemoryLimit(16 * GIB, "/sys/fs/cgroup/memory.max", GIB // 2)  # the 2025 template's --memory 16G
    check_memory(1, template)
    assert workers_that_fit(template, 8) == 5  # 5 x 2.5 GiB + 0.6 GiB + 0.5 GiB in use <= 16 GiB < 6 workers
    small = MemoryLimit(GIB, "/sys/fs/cgroup/memory/memory.limit_in_bytes", 300 * 1024 ** 2)
    assert workers_that_fit(small, 2) == 0
    with pytest.raises(MemoryShortage) as raised:
        check_memory(1, small)
    message = str(raised.value)
    assert "the memory limit is 1.00 GiB (/sys/fs/cgroup/memory/memory.limit_in_bytes)" in message
    assert "other processes of the cgroup hold 300 MiB" in message
    assert f"1 worker(s) need about {WORKER_PEAK_RSS / GIB:.2f} GiB" in message and "--memory 4g" in message
    with pytest.raises(MemoryShortage, match="fewer workers"):
        check_memory(6, template)


def test_auto_devices_use_as_many_gpus_as_the_limit_holds_named_ones_all_or_none():
    template = MemoryLimit(16 * GIB, "/sys/fs/cgroup/memory.max", 0)
    devices, warning = choose_devices("auto", "auto", template, cuda_count=8)
    assert devices == [torch.device("cuda", i) for i in range(6)]  # 6 x 2.5 GiB + 0.6 GiB <= 16 GiB
    assert "holds 6 of 8 workers" in warning and "/sys/fs/cgroup/memory.max" in warning
    assert choose_devices("auto", "auto", None, cuda_count=8) == ([torch.device("cuda", i) for i in range(8)], None)
    assert choose_devices("auto", "auto", template, cuda_count=0) == ([CPU], None)
    with pytest.raises(MemoryShortage, match="8 worker"):
        choose_devices("8", "cuda", template, cuda_count=8)
    with pytest.raises(MemoryShortage, match="1 worker"):
        choose_devices("auto", "auto", MemoryLimit(GIB, "memory.max", 0), cuda_count=8)
