"""MLCube / MedPerf parameters file -> ``brats-cls infer`` flags.

MedPerf calls a model cube as ``infer --data_path=D --parameters_file=P --output_path=O``, where ``P``
is the cube's ``workspace/parameters.yaml``. ``entrypoint.sh`` turns that file into CLI flags with
``python3 -m brats_cls.params P``, which prints one flag per line, or names every bad key on stderr
and exits 2.

Accepted keys (all optional) and the flags they become:

=================  ===========================  ==========================================
key                value                        flag
=================  ===========================  ==========================================
tta                true / false                 ``--tta`` / ``--no-tta``
cls_suppression    true / false                 ``--cls-suppression`` / ``--no-cls-suppression``
label_scheme       auto, 2021, 2023             ``--label-scheme``
et_min_voxels      integer >= 0                 ``--et-min-voxels``
device             auto, cpu, cuda              ``--device``
precision          auto, fp32, bf16, fp16       ``--precision``
models             string, or list of strings   ``--models`` (a list is joined with commas)
=================  ===========================  ==========================================

Decisions: an empty file, or a key whose value is empty (``null``), means "the CLI default", since
cube templates often leave keys blank. Booleans must be YAML booleans, not strings, and integers real
integers, so that ``tta: "false"`` is an error rather than silently true.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

import yaml

from .device import DEVICES, PRECISIONS

_CHOICES = {
    "label_scheme": ("auto", "2021", "2023"),
    "device": DEVICES,
    "precision": PRECISIONS,
}
_BOOLEANS = {"tta": "tta", "cls_suppression": "cls-suppression"}
KNOWN_KEYS = ("tta", "cls_suppression", "label_scheme", "et_min_voxels", "device", "precision", "models")


class ParametersError(ValueError):
    """A parameters file that cannot be used; the message names the file and every bad key."""


def _flags_for(key: str, value) -> list[str]:
    """Flags for one known key; raises ValueError with the reason when the value is wrong."""
    if key in _BOOLEANS:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return [f"--{'' if value else 'no-'}{_BOOLEANS[key]}"]
    if key in _CHOICES:
        text = str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None
        if text not in _CHOICES[key]:
            raise ValueError(f"expected one of {', '.join(_CHOICES[key])}, got {value!r}")
        return [f"--{key.replace('_', '-')}", text]
    if key == "et_min_voxels":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"expected an integer >= 0, got {value!r}")
        return ["--et-min-voxels", str(value)]
    if key == "models":
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise ValueError(f"expected a comma list of model names or a list of them, got {value!r}")
        joined = ",".join(n.strip() for n in names)
        if "\n" in joined:
            raise ValueError("model names cannot hold a line break")
        return ["--models", joined]
    raise AssertionError(key)  # every KNOWN_KEYS entry is handled above


def parameters_to_flags(parameters: Mapping, source: str = "parameters") -> list[str]:
    """``brats-cls infer`` flags for a parameters mapping, in :data:`KNOWN_KEYS` order.

    Raises :class:`ParametersError` naming ``source`` and every unknown or invalid key.
    """
    problems = [f"unknown key {key!r}" for key in parameters if key not in KNOWN_KEYS]
    flags: list[str] = []
    for key in KNOWN_KEYS:
        value = parameters.get(key)
        if value is None:
            continue
        try:
            flags += _flags_for(key, value)
        except ValueError as error:
            problems.append(f"{key}: {error}")
    if problems:
        allowed = ", ".join(KNOWN_KEYS)
        raise ParametersError(f"{source}: {'; '.join(problems)} (allowed keys: {allowed})")
    return flags


def read_parameters(path: Path | str) -> dict:
    """The mapping in a YAML parameters file; an empty file is ``{}``. Raises ParametersError."""
    path = Path(path)
    try:
        parameters = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ParametersError(f"parameters file {path}: cannot read it: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ParametersError(f"parameters file {path}: not valid YAML: {error}") from None
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise ParametersError(f"parameters file {path}: expected a mapping of keys, got {type(parameters).__name__}")
    return parameters


def main(argv: list[str] | None = None) -> int:
    """``python3 -m brats_cls.params FILE``: print the flags one per line; exit 2 on a bad file."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python3 -m brats_cls.params PARAMETERS_FILE", file=sys.stderr)
        return 2
    try:
        flags = parameters_to_flags(read_parameters(argv[0]), source=f"parameters file {argv[0]}")
    except ParametersError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for flag in flags:
        print(flag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
