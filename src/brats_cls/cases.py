"""Case discovery: how BraTS cases are named and found on disk.

Two naming schemes exist (see ``shared/BRATS_CONTRACT.md``):

* 2020/2021: ``<ID>_{flair,t1,t1ce,t2}.nii.gz``, ground truth ``<ID>_seg.nii.gz``, ET label 4;
* 2023+:     ``<ID>-{t2f,t1n,t1c,t2w}.nii.gz``, ground truth ``<ID>-seg.nii.gz``, ET label 3.

An input folder holds case folders, or the four files of one case lying flat in it (Synapse 2021
mounts one case folder as ``/input``). Both layouts are found by :func:`find_cases`.

Every modality is stored internally in the fixed order :data:`MODALITIES` =
(FLAIR, T1, T1ce, T2); the networks' input channels follow that order.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

#: Internal modality order: the networks' four input channels, always in this order.
MODALITIES = ("flair", "t1", "t1ce", "t2")

#: File suffix of each modality in each naming scheme, in :data:`MODALITIES` order.
SCHEME_SUFFIXES = {
    "2021": {"flair": "_flair", "t1": "_t1", "t1ce": "_t1ce", "t2": "_t2"},
    "2023": {"flair": "-t2f", "t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w"},
}
SEG_SUFFIXES = {"2021": "_seg", "2023": "-seg"}
NIFTI_EXTENSIONS = (".nii.gz", ".nii")

#: A case ID becomes an output file name, so it may hold no path separator, no control character
#: (newlines in file names break logs and platform scripts) and may not start with "." (hidden files:
#: macOS ``._*`` resource forks, our own ``.*.tmp`` temporaries, "." and "..").
_SAFE_ID = re.compile(r"^[^./\\\x00-\x1f\x7f][^/\\\x00-\x1f\x7f]*\Z")


class CaseError(Exception):
    """A case that cannot be processed. The message names the case, the file and the problem."""

    def __init__(self, case_id: str, problem: str, path: Path | str | None = None):
        self.case_id = case_id
        self.problem = problem
        self.path = Path(path) if path is not None else None
        where = f" ({self.path})" if self.path is not None else ""
        super().__init__(f"case {case_id}: {problem}{where}")


@dataclass(frozen=True)
class Case:
    """One BraTS case: its ID, naming scheme, the four modality files and the optional label."""

    case_id: str
    scheme: str  # "2021" or "2023"
    modalities: dict[str, Path] = field(hash=False)  # keyed by MODALITIES names
    seg: Path | None = field(default=None, hash=False)
    folder: Path | None = field(default=None, hash=False)

    @property
    def paths(self) -> list[Path]:
        """Modality files in :data:`MODALITIES` order."""
        return [self.modalities[name] for name in MODALITIES]

    @property
    def output_name(self) -> str:
        return f"{self.case_id}.nii.gz"


def _strip_nifti(name: str) -> str | None:
    for ext in NIFTI_EXTENSIONS:
        if name.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return None


def parse_name(name: str) -> tuple[str, str, str] | None:
    """Split a file name into ``(case_id, scheme, role)``; role is a modality name or ``"seg"``.

    Returns None for a name that is no BraTS modality or label file. The longest matching suffix
    wins, so ``X_t1ce`` is T1ce of case ``X``, never T1 of case ``X_t1ce``'s prefix.
    """
    stem = _strip_nifti(name)
    if stem is None:
        return None
    candidates = []
    for scheme, suffixes in SCHEME_SUFFIXES.items():
        for role, suffix in [*suffixes.items(), ("seg", SEG_SUFFIXES[scheme])]:
            if stem.endswith(suffix) and len(stem) > len(suffix):
                candidates.append((len(suffix), stem[: -len(suffix)], scheme, role))
    if not candidates:
        return None
    _, case_id, scheme, role = max(candidates)
    if not _SAFE_ID.match(case_id) or case_id.strip() != case_id:
        return None
    return case_id, scheme, role


def _cases_in_folder(folder: Path) -> list[Case]:
    """Group the NIfTI files lying directly in ``folder`` into cases; raises CaseError on a bad group."""
    groups: dict[str, dict[str, list[Path]]] = {}
    schemes: dict[str, set[str]] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        parsed = parse_name(path.name)
        if parsed is None:
            log.debug("ignoring %s: not a BraTS modality or label file", path)
            continue
        case_id, scheme, role = parsed
        groups.setdefault(case_id, {}).setdefault(role, []).append(path)
        schemes.setdefault(case_id, set()).add(scheme)
    cases = []
    for case_id, roles in groups.items():
        modality_roles = set(roles) - {"seg"}
        if not modality_roles:
            log.debug("ignoring %s in %s: a label without modalities", case_id, folder)
            continue
        if len(schemes[case_id]) > 1:
            raise CaseError(case_id, "files mix the 2021 and 2023 naming schemes", folder)
        scheme = schemes[case_id].pop()
        for role, paths in roles.items():
            if len(paths) > 1:
                names = ", ".join(p.name for p in paths)
                raise CaseError(case_id, f"duplicated {role} file: {names}", folder)
        missing = [m for m in MODALITIES if m not in roles]
        if missing:
            wanted = ", ".join(f"{case_id}{SCHEME_SUFFIXES[scheme][m]}.nii.gz" for m in missing)
            raise CaseError(case_id, f"missing modality file(s): {wanted}", folder)
        seg = roles.get("seg", [None])[0]
        cases.append(Case(case_id, scheme, {m: roles[m][0] for m in MODALITIES}, seg, folder))
    return cases


@dataclass
class Discovery:
    """What :func:`find_cases` found: valid cases, and cases that are malformed (with their error)."""

    cases: list[Case]
    errors: list[CaseError]


def find_cases(root: Path | str) -> Discovery:
    """Find every case under ``root``: its case folders, or one case's files lying flat in it.

    A malformed case (missing or duplicated modality, mixed schemes) becomes a :class:`CaseError`
    in ``errors`` and never hides the other cases. Stray files and folders are ignored.
    Raises ``FileNotFoundError`` / ``NotADirectoryError`` when ``root`` itself is unusable.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"input folder {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"input {root} is not a folder")
    cases: list[Case] = []
    errors: list[CaseError] = []
    folders = [root] + sorted(p for p in root.iterdir() if p.is_dir())
    for folder in folders:
        try:
            found = _cases_in_folder(folder)
        except CaseError as error:
            errors.append(error)
            continue
        except OSError as error:  # an unreadable case folder is a failed case, not a silent omission
            errors.append(CaseError(folder.name, f"cannot list folder: {error.strerror or error}", folder))
            continue
        if not found and folder is not root:
            log.debug("ignoring folder %s: no BraTS case in it", folder)
        cases.extend(found)
    seen: dict[str, Case] = {}
    unique = []
    for case in cases:
        if case.case_id in seen:
            errors.append(
                CaseError(case.case_id, f"the same case ID is also in {seen[case.case_id].folder}", case.folder)
            )
            continue
        seen[case.case_id] = case
        unique.append(case)
    return Discovery(sorted(unique, key=lambda c: c.case_id), errors)



def split_discovery(discovery: Discovery, part: int, parts: int) -> Discovery:
    """Part ``part`` (0-based) of ``parts`` of a discovery: the one split rule of ``--shard`` and of the
    workers (:mod:`brats_cls.parallel`).

    Round robin over the sorted, distinct IDs of everything discovered, valid cases and malformed ones
    alike: the ID at position ``i`` goes to part ``i mod parts``, as nnU-Net's ``-part_id/-num_parts``
    slices its sorted case list. The split depends on the IDs alone, so machines that see the same
    input folder agree on it with no coordination; every ID is in exactly one part (a malformed case is
    reported by one part only, and a duplicated ID goes with the case it duplicates); part sizes differ
    by at most one. Raises ``ValueError`` unless ``0 <= part < parts``.
    """
    if not 0 <= part < parts:
        raise ValueError(f"part {part} of {parts}: expected 0 <= part < parts")
    ids = sorted({case.case_id for case in discovery.cases} | {error.case_id for error in discovery.errors})
    mine = set(ids[part::parts])
    return Discovery([case for case in discovery.cases if case.case_id in mine],
                     [error for error in discovery.errors if error.case_id in mine])


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (``--shard K/N``, ``BRATS_CLS_SHARD=K/N``): :func:`split_discovery`'s
    part ``index - 1``.

    Shards are numbered from 1, ``1 <= K <= N``, as in the ``--shard K/N`` of Jest and Playwright; ``0/N``
    is refused, which also catches a 0-based array index passed on as it is. SLURM ``--array=1-N``
    gives ``$SLURM_ARRAY_TASK_ID/N``; a Kubernetes indexed job ``$((JOB_COMPLETION_INDEX + 1))/N``.
    """

    index: int
    count: int

    def select(self, discovery: Discovery) -> Discovery:
        return split_discovery(discovery, self.index - 1, self.count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """``"2/4"`` -> ``Shard(2, 4)``; ``ValueError`` saying what is expected otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if match is None:
        raise ValueError(f"{text!r} is not K/N: give shard K of N, such as 1/4 (shards are numbered from 1)")
    index, count = map(int, match.groups())
    if not 1 <= index <= count:
        raise ValueError(f"{text!r}: K must be between 1 and N (shards are numbered from 1 to N)")
    return Shard(index, count)
