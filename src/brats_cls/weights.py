"""Model weights: the manifest, sha256 checks before any load, and loading the ensemble once.

``weights/manifest.json`` lists every model: ``{"models": [{"name", "file", "arch", "fold", "size",
"config", "sha256", "parameters", "training": {...}}, ...]}``. A file is loaded only after its sha256
matches the manifest, and only with ``torch.load(..., weights_only=True)`` (inside ``load_model``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .io import write_bytes_atomically

WEIGHTS_ENV = "BRATS_CLS_WEIGHTS"


class WeightsError(Exception):
    """Weights missing, unknown to the manifest, or altered."""


def default_weights_dir() -> Path:
    """$BRATS_CLS_WEIGHTS, else ``weights/`` of the checkout this package is installed from."""
    if os.environ.get(WEIGHTS_ENV):
        return Path(os.environ[WEIGHTS_ENV])
    return Path(__file__).resolve().parents[2] / "weights"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(weights_dir: Path) -> list[dict]:
    manifest_path = weights_dir / "manifest.json"
    if not manifest_path.is_file():
        raise WeightsError(f"no manifest.json in weights folder {weights_dir}")
    try:
        manifest = json.loads(manifest_path.read_text())
        entries = manifest["models"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise WeightsError(f"{manifest_path} is not a valid manifest: {error}") from None
    if not entries:
        raise WeightsError(f"{manifest_path} lists no model")
    return entries


def select_entries(entries: list[dict], selection: str | None) -> list[dict]:
    """Filter manifest entries by a comma list of names, architectures or ``arch:fold`` items."""
    if not selection:
        return entries
    wanted = [item.strip() for item in selection.split(",") if item.strip()]
    chosen = []
    for entry in entries:
        keys = {entry.get("name", ""), entry["arch"], f"{entry['arch']}:{entry.get('fold')}", entry["file"]}
        if keys & set(wanted):
            chosen.append(entry)
    if not chosen:
        raise WeightsError(f"--models {selection!r} matches no model of the manifest")
    return chosen


def ensemble_weights(entries: list[dict]) -> list[float] | None:
    """The manifest's ``ensemble_weight`` per model (default 1); None when they are all equal (the
    paper's plain mean; ``scripts/phantom_table.py --tune`` chooses them on a tuning set)."""
    weights = [float(entry.get("ensemble_weight", 1.0)) for entry in entries]
    return None if len(set(weights)) == 1 else weights


def load_ensemble(weights_dir: Path, selection: str | None = None, device="cpu",
                  skip_unweighted: bool = False) -> tuple[list, list[dict]]:
    """Load every selected model once, after checking its sha256 against the manifest.

    ``skip_unweighted`` (inference): a model whose ``ensemble_weight`` is 0 while others weigh more
    adds nothing to the weighted mean, so it is neither loaded nor run. Selected alone, or with
    others all weighted 0, the weights are equal and every selected model runs."""
    from .models.registry import load_model

    weights_dir = Path(weights_dir)
    if not weights_dir.is_dir():
        raise WeightsError(f"weights folder {weights_dir} does not exist (give --weights DIR or set ${WEIGHTS_ENV})")
    entries = select_entries(read_manifest(weights_dir), selection)
    weights = ensemble_weights(entries)
    if skip_unweighted and weights is not None:
        entries = [entry for entry, weight in zip(entries, weights) if weight > 0]
    models = []
    for entry in entries:
        path = weights_dir / entry["file"]
        if path.resolve().parent != weights_dir.resolve():
            raise WeightsError(f"manifest entry {entry['file']!r} points outside {weights_dir}")
        if not path.is_file():
            raise WeightsError(f"weights file {path} listed in the manifest is missing")
        actual = sha256_of(path)
        if actual != entry.get("sha256"):
            raise WeightsError(f"weights file {path} is altered: sha256 {actual} != manifest {entry.get('sha256')}")
        model, _ = load_model(path, map_location=device)
        models.append(model.to(device).eval())
    return models, entries


def write_manifest(weights_dir: Path, entries: list[dict]) -> Path:
    """Write ``manifest.json`` atomically; each entry's ``sha256`` is (re)computed from its file."""
    weights_dir = Path(weights_dir)
    for entry in entries:
        entry["sha256"] = sha256_of(weights_dir / entry["file"])
    path = weights_dir / "manifest.json"
    write_bytes_atomically(path, (json.dumps({"models": entries}, indent=2) + "\n").encode())
    return path
