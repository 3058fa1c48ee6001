"""Shared fixtures: small phantom BraTS cases written once per test session.

The cases come from :mod:`brats_cls.synth` on a small grid (D, H, W) = :data:`SMALL_SHAPE`, with
spacing 1 mm, direction diag(-1, -1, 1) and origin (0, -(H - 1), 0) like BraTS, so that inference and
training tests run in seconds. They need nilearn (``pip install -r requirements-dev.txt``).
"""

from __future__ import annotations

import pytest

from brats_cls.synth import SMALL_SHAPE, write_cases

RING = {"kind": "ring", "lesions": 1}


@pytest.fixture(scope="session")
def phantom_cases(tmp_path_factory):
    """Folder holding 3 small phantom cases in 2023 naming, ground truth included.

    ``BraTS-GLI-00001-000`` and ``BraTS-GLI-00002-000`` have one ring-enhancing tumour with all three
    labels (necrosis 1, edema 2, enhancing 3; at least 300 enhancing voxels each, so a small-ET
    relabelling threshold tuned for full-size cases may remove them: set it explicitly);
    ``BraTS-GLI-00003-000`` is healthy (all labels 0). Each case is a
    folder ``<ID>/`` with ``<ID>-{t2f,t1n,t1c,t2w,seg}.nii.gz``, int16 modalities and uint8 labels, on
    a :data:`SMALL_SHAPE` grid. Read-only: tests must copy the folder before changing it.
    """
    out = tmp_path_factory.mktemp("phantom_2023")
    write_cases(out, 3, seed=63, naming="2023", start_index=1, shape=SMALL_SHAPE,
                healthy_indices={3}, progress=False, forced={1: RING, 2: RING})
    return out


@pytest.fixture(scope="session")
def phantom_cases_2021(tmp_path_factory):
    """Folder holding 2 small phantom cases in 2021 naming, both with a tumour.

    ``BraTS2021_00001`` has labels 0, 1, 2, 4 (ring-enhancing); ``BraTS2021_00002`` is non-enhancing
    (labels 0, 1, 2: no ET). Each is a folder ``<ID>/`` with ``<ID>_{flair,t1,t1ce,t2,seg}.nii.gz`` on
    a :data:`SMALL_SHAPE` grid.
    Read-only: tests must copy the folder before changing it.
    """
    out = tmp_path_factory.mktemp("phantom_2021")
    write_cases(out, 2, seed=2021, naming="2021", start_index=1, shape=SMALL_SHAPE,
                healthy_indices=set(), progress=False, forced={1: RING, 2: {"kind": "nonenhancing", "lesions": 1}})
    return out
