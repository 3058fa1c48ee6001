"""The paper's Table 4 in miniature, on a held-out PHANTOM test set (never BraTS data), and the choice of
ensemble weights on a separate tuning set.

    python scripts/phantom_table.py                       # the table: docs/phantom_results.{md,json}
    python scripts/phantom_table.py --tune                # choose the ensemble weights, write them to the manifest
    python scripts/phantom_table.py --official /tmp/brats-cls-eval-venv/bin/python   # also check the 10-model row

Sets (``synth`` v3, generated on first use, never trained on: the shipped weights were trained on
seeds 20201 and 20301):

* held-out test set: :data:`SETS` ``heldout``, 24 cases, half in 2023 naming and half in 2021
  naming, four of them tumour-free;
* tuning set: ``tuning``, 10 cases, two tumour-free. Only ``--tune`` reads it; the test set never
  chooses anything.

Each model's flip-averaged logits are computed once per case, then combined into every row (best
single model per architecture by validation Dice from the manifest, each 5-fold ensemble, the
10-model ensemble with equal and with the shipped weights), each with and without the classifier
suppression, exactly as ``brats-cls infer`` combines them (logits averaged before the sigmoid).

What the classifier is for, measured directly: **WT voxels on tumour-free slices** (axial slices
where the truth has no tumour), summed over all cases, with and without suppression, and the WT
voxels of each tumour-free case. The JSON also keeps each row's per-case Dice (``per_case_dice``, in
the order of ``case_ids``). Metrics: ``brats_cls.evaluate`` (global Dice and HD95, and the
lesion-wise Dice ``sq_dsc``), which the tests check against the official ``brats-evaluation``
package; ``--official`` also runs the package on the 10-model row's masks here.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from brats_cls.cases import find_cases
from brats_cls.evaluate import evaluate_case, summarise
from brats_cls.io import read_case, read_label, write_json_atomically, write_label
from brats_cls.predictor import Predictor
from brats_cls.preprocess import preprocess, uncrop
from brats_cls.regions import REGIONS, convert_scheme, et_label_of, regions_to_labels
from brats_cls.synth import write_cases
from brats_cls.synth.phantom import SYNTH_VERSION
from brats_cls.weights import load_ensemble, read_manifest, write_manifest

REPO = Path(__file__).resolve().parents[1]
SETS = {"heldout": {"seed": 7303, "healthy": {2, 7, 15, 20}, "count": 24},
        "tuning": {"seed": 5503, "healthy": {3, 8}, "count": 10}}
#: The folder (under ``--work``) of each set, named by the generator version that made it.
FOLDERS = {name: f"{name}-v{SYNTH_VERSION}" for name in SETS}


def make_set(folder: Path, name: str) -> list:
    spec = SETS[name]
    if not (folder / ".complete").exists():
        half = spec["count"] // 2
        write_cases(folder, half, seed=spec["seed"], naming="2023", start_index=1,
                    healthy_indices={i for i in spec["healthy"] if i <= half})
        write_cases(folder, spec["count"] - half, seed=spec["seed"], naming="2021", start_index=half + 1,
                    healthy_indices={i for i in spec["healthy"] if i > half})
        (folder / ".complete").write_text("")
    return find_cases(folder).cases


def set_composition(cases) -> dict:
    """How many cases are tumour-free, lack ET, are small (WT < 2,000 voxels), have several lesions."""
    from skimage.measure import label

    counts = {"tumour_free": 0, "without_et": 0, "small": 0, "several_lesions": 0}
    for case in cases:
        truth = read_label(case.seg, case.case_id)
        whole = truth > 0
        counts["tumour_free"] += not whole.any()
        counts["without_et"] += bool(whole.any() and not (truth == et_label_of(case.scheme)).any())
        counts["small"] += bool(0 < whole.sum() < 2000)
        counts["several_lesions"] += bool(label(whole, connectivity=3).max() > 1)
    return counts


def groups(entries: list[dict]) -> dict[str, tuple[list[int], list[float] | None]]:
    """Row name -> (member indices, weights or None for equal)."""
    rows = {}
    for arch, label in (("unetpp", "UNet++"), ("bifpn", "BiFPN")):
        members = [i for i, e in enumerate(entries) if e["arch"] == arch]
        if members:
            best = max(members, key=lambda i: _validation(entries[i]))
            rows[f"best single {label}"] = ([best], None)
            rows[f"ensemble of {len(members)}-fold {label}"] = (members, None)
    everyone = list(range(len(entries)))
    rows[f"ensemble of {len(entries)} models"] = (everyone, None)
    shipped = [float(e.get("ensemble_weight", 1.0)) for e in entries]
    if len(set(shipped)) > 1:
        rows[f"ensemble of {len(entries)} models, shipped weights"] = (everyone, shipped)
    return rows


def _validation(entry: dict) -> float:
    training = entry["training"]
    return (training.get("best_validation_cls_dice") or training["best_validation_dice"])["mean"]


def combine(per_model, members, weights):
    weights = np.ones(len(members)) if weights is None else np.asarray([weights[i] for i in members], float)
    weights = weights / weights.sum()
    seg = sum(w * per_model[i].seg for w, i in zip(weights, members))
    slices = sum(w * per_model[i].slices for w, i in zip(weights, members))
    return seg, slices


def tumour_free_slice_voxels(predicted_wt: np.ndarray, truth_wt: np.ndarray) -> int:
    """Predicted WT voxels on the axial slices (axis 0) where the truth has no tumour."""
    empty = ~truth_wt.any(axis=(1, 2))
    return int(predicted_wt[empty].sum())


def score_set(cases, models, entries, args, rows, masks_dir: Path | None = None) -> dict:
    """Per row and suppression setting: the per-case metrics, the WT voxels on tumour-free cases and
    on tumour-free slices (per case)."""
    single = [Predictor([model], tta=not args.no_tta, precision=args.precision) for model in models]
    scores: dict[str, list] = {}
    false_positive: dict[str, list] = {}
    free_slices: dict[str, list] = {}
    started = time.perf_counter()
    for number, case in enumerate(cases, 1):
        images = read_case(case)
        truth = read_label(case.seg, case.case_id, images.geometry)
        volume, box = preprocess(images.image)
        per_model = [predictor.ensemble(volume) for predictor in single]
        for name, (members, weights) in rows.items():
            seg, slices = combine(per_model, members, weights)
            for suppression in (False, True):
                row = f"{name} {'w.' if suppression else 'w/o'} cls"
                single[0].suppression = suppression
                regions = single[0].decide(seg, slices).regions
                labels = uncrop(regions_to_labels(regions, case.scheme), box)
                scores.setdefault(row, []).append(evaluate_case(labels, truth, images.geometry.spacing[::-1],
                                                                case.scheme))
                if not truth.any():
                    false_positive.setdefault(row, []).append(int(regions[0].sum()))
                free_slices.setdefault(row, []).append(tumour_free_slice_voxels(labels > 0, truth > 0))
                if masks_dir is not None and row == f"ensemble of {len(entries)} models w. cls":
                    write_label(convert_scheme(labels, case.scheme, "2023"), images.geometry,
                                masks_dir / "pred" / f"{case.case_id}.nii.gz")
        print(f"{number}/{len(cases)} {case.case_id}: {(time.perf_counter() - started) / number:.1f} s per case",
              flush=True)
    return {"scores": scores, "false_positive": false_positive, "tumour_free_slices": free_slices}


def summary_table(result: dict) -> dict:
    table = {}
    for row, per_case in result["scores"].items():
        summary = summarise(per_case)
        dice = {r: summary[r]["dice"]["mean"] for r in REGIONS}
        hd95 = {r: summary[r]["hd95"]["mean"] for r in REGIONS}
        lesion = {r: summary[r]["sq_dsc"]["mean"] for r in REGIONS}
        table[row] = {"dice": dice, "hd95": hd95, "lesion_dice": lesion,
                      "mean_dice": float(np.mean(list(dice.values()))),
                      "mean_hd95": float(np.mean(list(hd95.values()))),
                      "false_positive_wt_voxels_on_tumour_free": result["false_positive"].get(row, []),
                      "wt_voxels_on_tumour_free_slices": int(sum(result["tumour_free_slices"][row])),
                      "wt_voxels_on_tumour_free_slices_per_case": result["tumour_free_slices"][row],
                      "per_case_dice": [{r: round(float(case[r]["dice"]), 4) for r in REGIONS} for case in per_case]}
    return table


def markdown(table: dict) -> str:
    lines = ["| Method (PHANTOM held-out set) | ET Dice | WT Dice | TC Dice | Mean | ET HD95 | WT HD95 | TC HD95 | Mean | "
             "lesion-wise Dice ET / WT / TC | WT voxels on tumour-free slices | FP WT voxels, tumour-free cases |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row, v in table.items():
        d, h, lw = v["dice"], v["hd95"], v["lesion_dice"]
        fp = ", ".join(str(x) for x in v["false_positive_wt_voxels_on_tumour_free"]) or "-"
        lines.append(f"| {row} | {d['ET']:.4f} | {d['WT']:.4f} | {d['TC']:.4f} | {v['mean_dice']:.4f} | "
                     f"{h['ET']:.2f} | {h['WT']:.2f} | {h['TC']:.2f} | {v['mean_hd95']:.2f} | "
                     f"{lw['ET']:.3f} / {lw['WT']:.3f} / {lw['TC']:.3f} | {v['wt_voxels_on_tumour_free_slices']} | {fp} |")
    return "\n".join(lines)


def suppression_effect(table: dict, row: str) -> dict:
    """What suppression did to ``row`` (a name without ' w/o cls' / ' w. cls'): the share of WT voxels on
    tumour-free slices it removed, and the change of each region's mean Dice."""
    without, with_ = table[f"{row} w/o cls"], table[f"{row} w. cls"]
    before, after = without["wt_voxels_on_tumour_free_slices"], with_["wt_voxels_on_tumour_free_slices"]
    return {"tumour_free_slice_voxels": [before, after],
            "removed_share": (before - after) / before if before else None,
            "dice_change": {r: with_["dice"][r] - without["dice"][r] for r in REGIONS}}


def official_check(cases, masks_dir: Path, python: str, table: dict, rows: int) -> dict:
    """The official package on the 10-model row's masks: its mean global Dice per region against ours."""
    (masks_dir / "ref").mkdir(exist_ok=True)
    for case in cases:
        truth = read_label(case.seg, case.case_id)
        image = read_case(case).geometry
        write_label(convert_scheme(truth, case.scheme, "2023") if case.scheme != "2023" else truth, image,
                    masks_dir / "ref" / f"{case.case_id}-seg.nii.gz")
    script = REPO / "tests" / "official_brats_eval.py"
    found = json.loads(subprocess.run([python, str(script), str(masks_dir / "ref"), str(masks_dir / "pred")],
                                      capture_output=True, text=True, check=True).stdout)
    ours = table[f"ensemble of {rows} models w. cls"]["dice"]
    # the package gives NaN (null) where truth and prediction are both empty: 1 by the BraTS convention, as ours
    theirs = {r: float(np.mean([1.0 if found[c][r]["dice"] is None else found[c][r]["dice"] for c in found]))
              for r in REGIONS}
    return {"ours": ours, "official": theirs, "max_difference": max(abs(ours[r] - theirs[r]) for r in REGIONS)}


def tune(args) -> None:
    """Choose the ensemble weights on the tuning set; write them into the manifest."""
    models, entries = load_ensemble(args.weights)
    cases = make_set(args.work / FOLDERS["tuning"], "tuning")
    candidates = {"equal": [1.0] * len(entries),
                  "BiFPN only": [float(e["arch"] == "bifpn") for e in entries],
                  "UNet++ only": [float(e["arch"] == "unetpp") for e in entries]}
    means = {arch: np.mean([_validation(e) for e in entries if e["arch"] == arch]) for arch in ("bifpn", "unetpp")}
    candidates["by validation Dice"] = [float(means[e["arch"]]) for e in entries]
    everyone = list(range(len(entries)))
    table = summary_table(score_set(cases, models, entries, args,
                                    {name: (everyone, weights) for name, weights in candidates.items()}))
    scores = {name: table[f"{name} w. cls"]["mean_dice"] for name in candidates}
    for name, score in scores.items():
        print(f"tuning: {name}: mean Dice with suppression {score:.4f}", flush=True)
    best = max(scores, key=scores.get)
    choice = best if scores[best] > scores["equal"] + 0.005 else "equal"  # the paper's default unless clearly beaten
    manifest = read_manifest(args.weights)
    for entry, weight in zip(manifest, candidates[choice]):
        entry["ensemble_weight"] = weight
    write_manifest(args.weights, manifest)
    (REPO / "docs" / "ensemble_tuning.json").write_text(json.dumps({"set": SETS["tuning"] | {"healthy": sorted(
        SETS["tuning"]["healthy"])}, "mean_dice_with_suppression": scores, "chosen": choice}, indent=1) + "\n")
    print(f"chosen: {choice}", flush=True)


README = REPO / "README.md"
README_MARKERS = ("<!-- results:start -->\n", "<!-- results:end -->")


def whole_ensembles(table: dict) -> list[str]:
    """The row names (without ' w. cls') of the ensembles of every model: equal weights, then the
    shipped weights where the tuning chose any (:func:`groups`)."""
    return [row[: -len(" w. cls")] for row in table
            if row.startswith("ensemble of ") and "-fold " not in row and row.endswith(" w. cls")]


def readme_block(payload: dict) -> str:
    """The README's results table, made from ``docs/phantom_results.json`` (tests/test_docs.py checks
    that the README holds exactly this). The first rows are the ensemble ``infer`` runs."""
    table, comp = payload["table"], payload["composition"]
    everyone, *weighted = whole_ensembles(table)
    shipped = weighted[0] if weighted else everyone
    rows = [("shipped ensemble, with the classifier's suppression", f"{shipped} w. cls"),
            ("the same, without suppression", f"{shipped} w/o cls")]
    if everyone != shipped:
        rows.append((f"{everyone[len('ensemble of '):]}, equal weights (the paper's mean), with suppression",
                     f"{everyone} w. cls"))
    for name in table:
        if name.startswith("ensemble of ") and "-fold " in name and name.endswith(" w. cls"):
            rows.append((f"{name[len('ensemble of '):-len(' w. cls')]} only, with suppression", name))
    lines = [f"Held-out phantom set: {payload['cases']} cases of `synth` v{payload['synth_version']} never trained on "
             f"({comp['tumour_free']} tumour-free, {comp['without_et']} without enhancing tumour, {comp['small']} small, "
             f"{comp['several_lesions']} with several lesions), {payload['flips']} flips, global Dice "
             f"(`python scripts/phantom_table.py`).", "",
             "| | ET | TC | WT | mean | WT voxels on tumour-free slices | WT voxels, each tumour-free case |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for label, key in rows:
        v = table[key]
        d = v["dice"]
        fp = " / ".join(f"{x:,}" for x in v["false_positive_wt_voxels_on_tumour_free"]) or "-"
        lines.append(f"| {label} | {d['ET']:.3f} | {d['TC']:.3f} | {d['WT']:.3f} | **{v['mean_dice']:.3f}** | "
                     f"{v['wt_voxels_on_tumour_free_slices']:,} | {fp} |")
    check = payload.get("official_check")
    if check:
        lines += ["", "The official `brats-evaluation` package, run on the equal-weight ten-model masks, gives the "
                      f"same mean Dice per region as ours (largest difference {check['max_difference']:.1g})."]
    return "\n".join(lines) + "\n"


def write_readme(payload: dict) -> None:
    text = README.read_text()
    start, end = README_MARKERS
    head, rest = text.split(start, 1)
    README.write_text(head + start + readme_block(payload) + end + rest.split(end, 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=REPO / "weights")
    parser.add_argument("--work", type=Path, default=REPO / "runs")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "phantom_results.md")
    parser.add_argument("--no-tta", action="store_true", help="identity only instead of the 8 flips")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--tune", action="store_true", help="choose the ensemble weights on the tuning set")
    parser.add_argument("--official", default=None, help="interpreter with brats-evaluation: check the 10-model row")
    parser.add_argument("--limit", type=int, default=None, help="the first N cases only (a quick check, not the table)")
    parser.add_argument("--readme", action="store_true",
                        help="only rewrite the README's results table from the JSON beside --out")
    args = parser.parse_args()
    if args.tune:
        return tune(args)
    if args.readme:
        return write_readme(json.loads(args.out.with_suffix(".json").read_text()))
    models, entries = load_ensemble(args.weights)
    cases = make_set(args.work / FOLDERS["heldout"], "heldout")[: args.limit]
    with tempfile.TemporaryDirectory() as scratch:
        masks = Path(scratch)
        (masks / "pred").mkdir()
        result = score_set(cases, models, entries, args, groups(entries), masks)
        table = summary_table(result)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"cases": len(cases), "case_ids": [c.case_id for c in cases], "table": table,
                   "synth_version": SYNTH_VERSION, "flips": 1 if args.no_tta else 8, "precision": args.precision,
                   "weights": str(args.weights.relative_to(REPO) if args.weights.is_relative_to(REPO) else args.weights)}
        write_json_atomically(args.out.with_suffix(".json"), payload)  # kept even if the official check fails
        check = official_check(cases, masks, args.official, table, len(entries)) if args.official else None
    composition = set_composition(cases)
    ten = f"ensemble of {len(entries)} models"
    effect = suppression_effect(table, ten)
    removed = "n/a" if effect["removed_share"] is None else f"{effect['removed_share']:.1%}"
    header = (f"Held-out phantom set (synth v{SYNTH_VERSION}): {len(cases)} cases (seed {SETS['heldout']['seed']}; "
              f"{composition['tumour_free']} tumour-free, {composition['without_et']} without enhancing tumour, "
              f"{composition['small']} with a whole tumour under 2,000 voxels, {composition['several_lesions']} "
              f"with several lesions), {'1 flip' if args.no_tta else '8 flips'}, precision {args.precision}, "
              f"weights `{args.weights.relative_to(REPO) if args.weights.is_relative_to(REPO) else args.weights}`. "
              "HD95 in mm; 373 for a region missed or invented. Phantom data, not BraTS.\n\n")
    footer = (f"\n\nSuppression on the {ten}: WT voxels on tumour-free slices {effect['tumour_free_slice_voxels'][0]} "
              f"-> {effect['tumour_free_slice_voxels'][1]} (removed {removed}); Dice change "
              + ", ".join(f"{r} {v:+.4f}" for r, v in effect["dice_change"].items()) + ".\n")
    args.out.write_text(header + markdown(table) + footer)
    payload |= {"official_check": check, "composition": composition, "suppression_effect": effect}
    write_json_atomically(args.out.with_suffix(".json"), payload)
    print(header + markdown(table) + footer)
    if args.out == REPO / "docs" / "phantom_results.md" and args.limit is None and not args.no_tta:
        write_readme(payload)  # the shipped models' full table
    if check:
        print(f"official brats-evaluation on the 10-model row: {check}")


if __name__ == "__main__":
    main()
