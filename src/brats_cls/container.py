"""The image's entry point, the part after the call form: ``entrypoint.sh`` works out which platform
call it got and, started as root, which user runs it (``setpriv``); this module does the rest.

    python -m brats_cls.container segment --input I --output O [--parameters P] [--weights W] [--staging S]
    python -m brats_cls.container publish OUTPUT STAGING -- COMMAND...
    python -m brats_cls.container writes-into COMMAND [ARGS...]
    python -m brats_cls.container usage

``segment`` is every platform's segmentation call: it runs ``brats-cls infer`` with the parameters
file's flags and ``--failures``, then gives the platform the exit status it expects (the table of
container/README.md, "Exit status"): 0 when the run completed, the failed cases named on stderr and
in the failures file; 1 when no case could be segmented or brats-cls crashed; 2 for a usage error
before any work. With ``--staging S`` it writes the masks into a new folder ``S`` instead of ``O``.

``publish`` is the root process of a run whose output folder root owns: it runs COMMAND (the
``segment --staging`` call, as an unprivileged user) and copies each finished mask of STAGING into
OUTPUT, owned by root, mode 0644, about once a second and once at the end (container/README.md,
"Users and file ownership").

``writes-into`` names the folder that a ``brats-cls`` command writes into, read with that command's
own option parser, so that ``entrypoint.sh`` runs it as that folder's owner.

Environment: ``BRATS_CLS`` (``brats-cls``), the command that runs brats-cls; ``BRATS_CLS_FAILURES``
(``/tmp/brats-cls-failures.json``), the failures file of a segmentation call; ``BRATS_CLS_SHARD``
(``K/N``: only shard K of N, numbered from 1) and ``BRATS_CLS_DEVICES`` (``auto``, a count or a list
such as ``cuda:0,cuda:1``) and ``BRATS_CLS_ENGINE`` (:data:`brats_cls.engines.ENGINE_CHOICES`), a segmentation
call's ``--shard``, ``--devices`` (:mod:`brats_cls.parallel`) and ``--engine``, since no platform lets a
submission add arguments. A bad ``BRATS_CLS_SHARD`` or ``BRATS_CLS_ENGINE`` is refused (exit status 2)
naming the variable.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import click

from .cases import parse_shard
from .io import remove_stale_temporaries, replaced_atomically
from .params import KNOWN_KEYS, ParametersError, parameters_to_flags, read_parameters

DEFAULT_FAILURES = Path("/tmp/brats-cls-failures.json")
PREFIX = "entrypoint: "
#: Signals that the entry point passes on to the process it runs (it is PID 1 of the container, which
#: ignores every signal it has no handler for: `docker stop` would otherwise wait and kill everything).
FORWARDED = (signal.SIGTERM, signal.SIGINT)

USAGE = """\
usage: entrypoint.sh                      segment $INPUT_DIR (/input) into $OUTPUT_DIR (/output); when
                                          /mlcommons/volumes/data exists (MedPerf container config),
                                          segment it into /mlcommons/volumes/predictions with the
                                          optional /mlcommons/volumes/parameters/parameters_file.yaml
       entrypoint.sh infer --data_path=DIR --output_path=DIR [--parameters_file=FILE]
                                          MLCube / MedPerf / BraTS orchestrator call; FILE is YAML
{keys}
       entrypoint.sh hotfix               no-op (MedPerf template)
       entrypoint.sh train|preprocess|evaluate|synth|bench|models ARGS...
                                          run `brats-cls COMMAND ARGS...`; `train --fold N` trains
                                          both networks of fold N from /data into /output
       entrypoint.sh --help               this text
Options may also be given as `--name VALUE`.
Environment of the two segmentation calls: BRATS_CLS_SHARD=K/N segments only shard K of N (numbered from 1:
case i of the sorted IDs goes to shard (i mod N) + 1); BRATS_CLS_DEVICES (auto: one worker per GPU when
several are visible; a count; or a list such as cuda:0,cuda:1); BRATS_CLS_ENGINE (auto, the default:
openvino for float32 on the CPU, else eager; or eager, eager-cl, compile, onnxruntime, openvino: exported
graphs cached under /tmp); BRATS_CLS_FAILURES, the failures file.
Exit status of the two segmentation calls: 0 the run completed (a case that failed is named on stderr
and in $BRATS_CLS_FAILURES, default {failures}); 1 no case could be segmented;
2 usage error before any work. Other commands: brats-cls's own (0 done, 1 some work failed, 2 usage).
Started as root (no -u), the image runs brats-cls as the owner of the output folder, or as uid 10001
when root owns it, never as root.
"""


def usage() -> str:
    """The image's usage text (``docker run IMAGE --help``), naming every parameters-file key."""
    keys = textwrap.fill(f"with any of the keys {', '.join(KNOWN_KEYS)}", width=100,
                         initial_indent=" " * 42, subsequent_indent=" " * 42)
    return USAGE.format(keys=keys, failures=DEFAULT_FAILURES)


class Refusal(Exception):
    """A call that cannot start (exit status 2); the message says what to change."""


# ------------------------------------------------------------------------------ segmentation calls


@dataclass(frozen=True)
class Verdict:
    """The exit status of a segmentation call, and the lines for stderr that explain it."""

    status: int
    lines: tuple[str, ...] = ()


def failures_verdict(failures: Path) -> Verdict:
    """The verdict on a run whose brats-cls exited with status 1 (some case failed), from the failures
    file it wrote: 0 when a mask was written or skipped (the run completed: every platform fails the
    whole run on any other status), 1 when none was, or when there is no readable file (a crash)."""
    try:
        record = json.loads(failures.read_text())
        written, skipped, failed = record["written"], record["skipped"], dict(record["failed"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        return Verdict(1, (f"brats-cls exited with status 1 and left no readable failures file {failures} "
                           f"({error}): exit status 1",))
    total = len(written) + len(skipped) + len(failed)
    lines = [f"{len(failed)} of {total} case(s) failed, {len(written)} written, {len(skipped)} skipped "
             f"(listed in {failures}):"]
    lines += [f"  {case_id}: {message}" for case_id, message in sorted(failed.items())]
    if written or skipped:
        return Verdict(0, (*lines, "the run completed for the other cases: exit status 0"))
    return Verdict(1, (*lines, "no case could be segmented: exit status 1"))


def segmentation_verdict(brats_cls_status: int, failures: Path) -> Verdict:
    """The platform exit status for brats-cls's: its own, except that status 1 (some case failed) is
    decided by :func:`failures_verdict`."""
    return failures_verdict(failures) if brats_cls_status == 1 else Verdict(brats_cls_status)


def _existing_folder(output: Path) -> None:
    if not output.is_dir():
        raise Refusal(f"output folder {output} does not exist: mount one there (-v HOST_FOLDER:{output})")


def check_output_folder(output: Path) -> None:
    """Raise :class:`Refusal` unless ``output`` is a folder this process may write into."""
    _existing_folder(output)
    if not os.access(output, os.W_OK):
        info = output.stat()
        owner = f"owner {info.st_uid}:{info.st_gid}, mode {stat.S_IMODE(info.st_mode):o}"
        raise Refusal(f"output folder {output} ({owner}) is not writable by uid {os.getuid()}:{os.getgid()}: run the "
                      "container without -u (the image then writes as the folder's owner), or with -u set to the "
                      "folder's owner")


def make_staging_folder(staging: Path) -> None:
    """Create the private folder (mode 0755, new) that the masks are written into before publishing."""
    try:
        staging.mkdir(mode=0o755)
    except OSError as error:
        raise Refusal(f"cannot create {staging} as uid {os.getuid()}:{os.getgid()} ({error.strerror}): the image "
                      "needs a writable /tmp (with --read-only, add --tmpfs /tmp)") from None


def brats_cls_command() -> list[str]:
    """The command that runs brats-cls: ``$BRATS_CLS`` split as a shell would, default ``brats-cls``."""
    return shlex.split(os.environ.get("BRATS_CLS") or "brats-cls")


def failures_path() -> Path:
    return Path(os.environ.get("BRATS_CLS_FAILURES") or DEFAULT_FAILURES)


def scale_flags() -> list[str]:
    """``--shard``, ``--devices`` and ``--engine`` from ``$BRATS_CLS_SHARD``, ``$BRATS_CLS_DEVICES`` and
    ``$BRATS_CLS_ENGINE`` (module docstring). Raises :class:`Refusal` naming a bad ``BRATS_CLS_SHARD`` or
    ``BRATS_CLS_ENGINE``."""
    flags = []
    shard = os.environ.get("BRATS_CLS_SHARD", "").strip()
    if shard:
        try:
            flags += ["--shard", str(parse_shard(shard))]
        except ValueError as error:
            raise Refusal(f"BRATS_CLS_SHARD: {error}") from None
    devices = os.environ.get("BRATS_CLS_DEVICES", "").strip()
    if devices:
        flags += ["--devices", devices]
    engine = os.environ.get("BRATS_CLS_ENGINE", "").strip()
    if engine:
        from .engines import ENGINE_CHOICES  # only when asked: the engines module imports torch

        if engine not in ENGINE_CHOICES:
            raise Refusal(f"BRATS_CLS_ENGINE: unknown engine {engine!r}; choose one of {', '.join(ENGINE_CHOICES)}")
        flags += ["--engine", engine]
    return flags


def infer_call(input_dir: Path, output_dir: Path, failures: Path, parameters_file: Path | None = None,
               weights_dir: Path | None = None) -> list[str]:
    """The ``brats-cls infer`` command line of a segmentation call. Raises :class:`Refusal` naming
    every bad key of the parameters file."""
    flags = []
    if parameters_file is not None:
        try:
            flags = parameters_to_flags(read_parameters(parameters_file), source=f"parameters file {parameters_file}")
        except ParametersError as error:
            raise Refusal(str(error)) from None
    if weights_dir is not None:
        flags += ["--weights", str(weights_dir)]
    flags += scale_flags()
    return [*brats_cls_command(), "infer", "--input", str(input_dir), "--output", str(output_dir),
            "--failures", str(failures), *flags]


def segment(input_dir: Path, output_dir: Path, parameters_file: Path | None = None, weights_dir: Path | None = None,
            staging: Path | None = None) -> int:
    """Run one segmentation call to its end; its platform exit status (messages on stderr)."""
    failures = failures_path()
    try:
        call = infer_call(input_dir, staging or output_dir, failures, parameters_file, weights_dir)
        if staging is None:
            check_output_folder(output_dir)
        else:
            make_staging_folder(staging)  # the publisher checks the output folder
    except Refusal as error:
        say(f"error: {error}")
        return 2
    try:  # a file left by an earlier run must never be read as this run's
        failures.unlink(missing_ok=True)
    except OSError:
        pass
    verdict = segmentation_verdict(run_forwarding_signals(call), failures)
    for line in verdict.lines:
        say(line)
    return verdict.status


def run_forwarding_signals(argv: Sequence[str], tick: Callable[[], object] | None = None,
                           tick_seconds: float = 1.0) -> int:
    """Run ``argv`` to its end, passing SIGTERM and SIGINT on to it and calling ``tick`` about every
    ``tick_seconds`` meanwhile; its exit status, ``128 + N`` when signal N killed it (as a shell says),
    127 when it cannot be started."""
    running: list[subprocess.Popen] = []

    def forward(signum, _frame):
        if running:
            running[0].send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED}
    try:
        try:
            running.append(subprocess.Popen(list(argv)))
        except OSError as error:
            say(f"error: cannot run {shlex.join(argv)}: {error.strerror}")
            return 127
        while True:
            try:
                status = running[0].wait(timeout=tick_seconds)
                break
            except subprocess.TimeoutExpired:
                if tick is not None:
                    tick()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 128 - status if status < 0 else status


# ------------------------------------------------------------------------------ publishing


class Publisher:
    """Copies each mask of a staging folder that is new or rewritten into the output folder.

    Each copy goes through :func:`brats_cls.io.replaced_atomically` (a hidden ``.<ID>.nii.gz.<random>.tmp``,
    fsynced, then renamed), so only complete ``<ID>.nii.gz`` files ever appear in the output folder,
    owned by this (root) process, mode 0644 under umask 022. The staging folder belongs to an
    unprivileged user: nothing there is followed through a symbolic link, and only regular files
    named ``*.nii.gz`` (not hidden) are copied.
    """

    def __init__(self, staging: Path, output: Path):
        self.staging, self.output = Path(staging), Path(output)
        self.published: dict[str, tuple[int, int, int]] = {}  # name -> (mtime_ns, size, inode) copied

    def publish(self) -> list[str]:
        """One pass: the names copied. A mask that cannot be copied is named on stderr and tried again
        on the next pass."""
        try:
            folder = os.open(self.staging, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:  # not made yet, or not a folder
            return []
        copied = []
        try:
            for name in sorted(os.listdir(folder)):
                if not name.startswith(".") and name.endswith(".nii.gz") and self._copy(folder, name):
                    copied.append(name)
        finally:
            os.close(folder)
        return copied

    def _copy(self, folder: int, name: str) -> bool:
        """Copy ``name`` of the open staging folder when it is a regular file not copied in this version."""
        try:  # O_NONBLOCK: a FIFO under a mask's name must not hang the run
            source = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=folder)
        except OSError:  # a symbolic link, or gone
            return False
        try:
            info = os.fstat(source)
            stamp = (info.st_mtime_ns, info.st_size, info.st_ino)
            if not stat.S_ISREG(info.st_mode) or self.published.get(name) == stamp:
                return False
            with replaced_atomically(self.output / name) as target:
                while chunk := os.read(source, 1 << 20):
                    target.write(chunk)
        except OSError as error:
            say(f"error: could not move {name} into {self.output}: {error}")
            return False
        finally:
            os.close(source)
        self.published[name] = stamp
        return True


def check_publishable(output: Path) -> None:
    """Raise :class:`Refusal` unless this (root) process can create files in ``output``; then remove what
    a killed run left there (the folder must hold masks only)."""
    _existing_folder(output)
    probe = output / f".brats-cls-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise Refusal(f"output folder {output} is not writable ({error.strerror}; a read-only mount?)") from None
    remove_stale_temporaries(output)


def publish(output: Path, staging: Path, command: Sequence[str]) -> int:
    """Run ``command`` (which writes masks into ``staging``) while publishing them into ``output``;
    its exit status. The staging folder is removed at the end."""
    try:
        check_publishable(output)
    except Refusal as error:
        say(f"error: {error}")
        return 2
    publisher = Publisher(staging, output)
    try:
        status = run_forwarding_signals(command, tick=publisher.publish)
        publisher.publish()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return status


# ------------------------------------------------------------------------------ other commands

#: For each brats-cls command that writes where its caller says: the options naming a folder it writes
#: into, then those naming a file (it writes into that file's folder). The first one given counts.
WRITES_INTO = {
    "train": (("--out",), ()),
    "preprocess": (("--cache",), ()),
    "synth": (("--out",), ()),
    "evaluate": (("--overlay",), ("--csv", "--json", "--plot")),
    "bench": ((), ("--json",)),
}


def writes_into(command: str, args: Sequence[str]) -> Path | None:
    """The folder that ``brats-cls COMMAND ARGS...`` writes into, or None (it writes nowhere of the
    caller's choosing, asks for its help, or has arguments its own parser rejects: brats-cls then
    says so itself). ``train`` without ``--out`` writes into ``$BRATS_OUTPUT``, else ``/output``."""
    if command not in WRITES_INTO:
        return None
    from .cli import main

    context = click.Context(main, info_name="brats-cls", resilient_parsing=True)
    cli_command = main.get_command(context, command)
    try:
        given, _, _ = cli_command.make_parser(context).parse_args(list(args))
    except click.ClickException:
        return None
    help_option = cli_command.get_help_option(context)
    if help_option is not None and given.get(help_option.name):
        return None
    name_of = {option: param.name for param in cli_command.params for option in param.opts}
    folders, files = WRITES_INTO[command]
    for option in folders:
        if given.get(name_of[option]):
            return Path(given[name_of[option]])
    for option in files:
        if given.get(name_of[option]):
            return Path(given[name_of[option]]).parent
    if command == "train":  # the train command's own default
        return Path(os.environ.get("BRATS_OUTPUT") or "/output")
    return None


def nearest_existing_folder(path: Path) -> Path:
    """``path`` if it is a folder, else the nearest folder above it (relative paths: from the working
    folder)."""
    path = Path.cwd() / path
    while not path.is_dir():
        path = path.parent
    return path


# ------------------------------------------------------------------------------ command line


def say(line: str) -> None:
    print(PREFIX + line, file=sys.stderr, flush=True)


_PATH = click.Path(path_type=Path)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """The image's entry point after entrypoint.sh: segmentation calls, publishing, ownership."""


@main.command("segment")
@click.option("--input", "input_dir", type=_PATH, required=True, help="Case folders, or one case lying flat.")
@click.option("--output", "output_dir", type=_PATH, required=True, help="Where the masks go.")
@click.option("--parameters", "parameters_file", type=_PATH, default=None, help="MLCube / MedPerf parameters file.")
@click.option("--weights", "weights_dir", type=_PATH, default=None, help="Weights folder instead of the shipped one.")
@click.option("--staging", type=_PATH, default=None,
              help="Write the masks into this new folder instead; a root `publish` moves them to --output.")
def segment_command(input_dir, output_dir, parameters_file, weights_dir, staging) -> None:
    """Run brats-cls infer and exit with the status the platforms expect."""
    sys.exit(segment(input_dir, output_dir, parameters_file, weights_dir, staging))


@main.command("publish")
@click.argument("output_dir", type=_PATH)
@click.argument("staging", type=_PATH)
@click.argument("command", nargs=-1, required=True)
def publish_command(output_dir, staging, command) -> None:
    """Run COMMAND, copying each finished mask of STAGING into OUTPUT_DIR (mode 0644)."""
    os.umask(0o022)  # masks readable by the scorer, whoever it runs as
    sys.exit(publish(output_dir, staging, command))


@main.command("writes-into", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
              add_help_option=False)
@click.argument("command")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def writes_into_command(command, args) -> None:
    """Print the nearest existing folder at or above the one that `brats-cls COMMAND ARGS...` writes into;
    nothing when it writes nowhere of the caller's choosing."""
    target = writes_into(command, args)
    if target is not None:
        click.echo(nearest_existing_folder(target))


@main.command("usage")
def usage_command() -> None:
    """Print the image's usage text."""
    click.echo(usage(), nl=False)


if __name__ == "__main__":
    main()
