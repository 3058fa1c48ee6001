"""Labels <-> the three nested tumour regions (WT, TC, ET), and per-slice region targets.

Label schemes (``shared/BRATS_CONTRACT.md``):

==========  ========================  ============  ================
scheme      necrosis / non-enh. core  edema (SNFH)  enhancing tumour
==========  ========================  ============  ================
2020/2021   1                         2             4
2023+       1                         2             3
==========  ========================  ============  ================

Regions, always in the channel order (WT, TC, ET): WT = every tumour label, TC = necrosis + enhancing,
ET = enhancing.
"""

from __future__ import annotations

import numpy as np

REGIONS = ("WT", "TC", "ET")
NECROSIS = 1
EDEMA = 2
LABEL_SCHEMES = {"2021": 4, "2023": 3}  # scheme -> label of enhancing tumour


def et_label_of(scheme: str) -> int:
    try:
        return LABEL_SCHEMES[scheme]
    except KeyError:
        raise ValueError(f"unknown label scheme {scheme!r}; expected one of {sorted(LABEL_SCHEMES)}") from None


def labels_to_regions(labels: np.ndarray, scheme: str) -> np.ndarray:
    """``(D, H, W)`` label map -> ``(3, D, H, W)`` bool channels (WT, TC, ET).

    Raises ValueError for a label that the scheme does not know (e.g. 4 in a 2023 map).
    """
    enhancing = et_label_of(scheme)
    known = {0, NECROSIS, EDEMA, enhancing}
    present = set(np.unique(labels).tolist())
    unknown = present - known
    if unknown:
        raise ValueError(f"labels {sorted(unknown)} are not in the {scheme} scheme {sorted(known)}")
    whole = labels > 0
    core = (labels == NECROSIS) | (labels == enhancing)
    active = labels == enhancing
    return np.stack([whole, core, active])


def dice_score(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice ``2|P & T| / (|P| + |T|)`` of two boolean masks; 1.0 when both are empty (the BraTS
    convention, so an empty prediction of an absent region scores 1 and any voxel there scores 0)."""
    prediction = np.asarray(prediction, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    total = int(np.count_nonzero(prediction)) + int(np.count_nonzero(truth))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(prediction & truth)) / total


def enforce_nesting(regions: np.ndarray) -> np.ndarray:
    """Make ET inside TC inside WT, by intersection: ``(3, ...)`` bool -> ``(3, ...)`` bool.

    Decision: intersection rather than union. A voxel that the network calls ET but not WT is far
    more often a false positive (a bright vessel, a contrast-enhancing choroid plexus) than a miss
    of the larger region, so the larger region's verdict wins.
    """
    whole = regions[0]
    core = regions[1] & whole
    active = regions[2] & core
    return np.stack([whole, core, active])


def regions_to_labels(regions: np.ndarray, scheme: str) -> np.ndarray:
    """``(3, D, H, W)`` channels (WT, TC, ET) -> uint8 label map, painting nested regions in order.

    WT is painted as edema, then TC as necrosis, then ET as enhancing, each overwriting the larger.
    """
    enhancing = et_label_of(scheme)
    labels = np.zeros(regions.shape[1:], dtype=np.uint8)
    labels[regions[0].astype(bool)] = EDEMA
    labels[regions[1].astype(bool)] = NECROSIS
    labels[regions[2].astype(bool)] = enhancing
    return labels


def slice_targets(regions: np.ndarray) -> np.ndarray:
    """``(3, D, H, W)`` region channels -> ``(3, D)`` float32: 1 where the axial slice holds the region."""
    return regions.reshape(regions.shape[0], regions.shape[1], -1).any(axis=2).astype(np.float32)


def convert_scheme(labels: np.ndarray, source: str, target: str) -> np.ndarray:
    """Relabel enhancing tumour from one scheme's number to another's."""
    out = labels.copy()
    out[labels == et_label_of(source)] = et_label_of(target)
    return out
