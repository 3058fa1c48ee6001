"""Shading stress test: held-out PHANTOM cases re-rendered with the same anatomy, tumour, contrast and
noise under bias fields of increasing strength, and what the shipped ensemble makes of them.

    python scripts/shading_stress.py                   # docs/shading_stress.{md,json,png}
    python scripts/shading_stress.py --cases 4 --no-tta   # a quick look, not the table

The cases are the first ``--cases`` of the held-out set (``scripts/phantom_table.py`` SETS
``heldout``, tumour-free ones included), each rendered at every level of :data:`LEVELS` by
``make_case(..., shading_strength=s)``: one field shape per case (drawn from the case's own field
stream) scaled to the level's strength ``s``, the largest log-deviation of any modality from the
brain's mean (:mod:`brats_cls.shading`). Per level: mean Dice of the shipped ensemble (8 flips; as `infer` runs it) with
and without the classifier suppression, the WT voxels on tumour-free slices, and the WT voxels of
each tumour-free case. Phantom data, not BraTS.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path


from brats_cls.cases import find_cases
from brats_cls.io import write_json_atomically
from brats_cls.regions import REGIONS
from brats_cls.synth import make_case, write_case
from brats_cls.synth.phantom import SYNTH_VERSION
from brats_cls.weights import ensemble_weights, load_ensemble

from phantom_table import REPO, SETS, score_set, suppression_effect, summary_table

#: Level -> strength s (log units): the largest brightening is e^s - 1, the largest darkening 1 - e^-s.
LEVELS = {"none": 0.0, "mild": 0.1, "moderate": 0.2, "strong": 0.35}


def describe(strength: float) -> str:
    if strength == 0:
        return "no field"
    return f"s = {strength:g}: up to {math.expm1(strength):+.0%} / {-(1 - math.exp(-strength)):+.0%}"


def level_cases(work: Path, level: str, strength: float, count: int) -> list:
    """The first ``count`` held-out cases rendered at ``strength``, written once under ``work``."""
    spec = SETS["heldout"]
    folder = work / f"stress-v{SYNTH_VERSION}" / level
    if not (folder / f".complete-{count}").exists():
        half = spec["count"] // 2
        for index in range(1, count + 1):
            case = make_case(spec["seed"], index, healthy=index in spec["healthy"], shading_strength=strength)
            write_case(case, folder, "2023" if index <= half else "2021")
        (folder / f".complete-{count}").write_text("")
    return find_cases(folder).cases[:count]


def markdown(results: dict) -> str:
    lines = ["| level | field | ET Dice | WT Dice | TC Dice | mean w. cls | mean w/o cls | WT voxels on tumour-free "
             "slices w/o -> w. cls | FP WT voxels, tumour-free cases (w. cls) |", "|---|---|---|---|---|---|---|---|---|"]
    for level, r in results.items():
        d = r["with"]["dice"]
        fp = ", ".join(str(v) for v in r["with"]["false_positive_wt_voxels_on_tumour_free"]) or "-"
        before, after = r["effect"]["tumour_free_slice_voxels"]
        lines.append(f"| {level} | {describe(r['strength'])} | {d['ET']:.4f} | {d['WT']:.4f} | {d['TC']:.4f} | "
                     f"{r['with']['mean_dice']:.4f} | {r['without']['mean_dice']:.4f} | {before} -> {after} | {fp} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strengths = [r["strength"] for r in results.values()]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for region, colour in zip(REGIONS, ("tab:green", "tab:orange", "tab:red")):
        left.plot(strengths, [r["with"]["dice"][region] for r in results.values()], "o-", color=colour, label=region)
    left.plot(strengths, [r["with"]["mean_dice"] for r in results.values()], "o-", color="black", label="mean")
    left.plot(strengths, [r["without"]["mean_dice"] for r in results.values()], "o--", color="grey",
              label="mean w/o suppression")
    left.set(xlabel="bias-field strength s (log units)", ylabel="Dice (shipped ensemble, w. cls)", ylim=(0, 1),
             title="Dice under shading")
    left.legend(loc="lower left", fontsize=8)
    for key, style, label in (("without", "s--", "w/o suppression"), ("with", "o-", "with suppression")):
        right.plot(strengths, [max(1, r[key]["wt_voxels_on_tumour_free_slices"]) for r in results.values()], style,
                   label=label)
    right.set(xlabel="bias-field strength s (log units)", ylabel="WT voxels on tumour-free slices (all cases)",
              yscale="log", title="False positives under shading")
    right.legend(fontsize=8)
    for axis in (left, right):
        axis.set_xticks(strengths, [f"{level}\n{s:g}" for level, s in zip(results, strengths)])
    figure.suptitle("Shading stress test on PHANTOM cases (not BraTS)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=REPO / "weights")
    parser.add_argument("--work", type=Path, default=REPO / "runs")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "shading_stress.md")
    parser.add_argument("--cases", type=int, default=8, help="the first N held-out cases")
    parser.add_argument("--no-tta", action="store_true", help="identity only instead of the 8 flips")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    args = parser.parse_args()
    # the ensemble infer runs: the manifest's weights, a model weighted 0 neither loaded nor run
    models, entries = load_ensemble(args.weights, skip_unweighted=True)
    row = f"ensemble of {len(entries)} models"
    rows = {row: (list(range(len(entries))), ensemble_weights(entries))}
    results = {}
    started = time.perf_counter()
    for level, strength in LEVELS.items():
        cases = level_cases(args.work, level, strength, args.cases)
        table = summary_table(score_set(cases, models, entries, args, rows))
        results[level] = {"strength": strength, "with": table[f"{row} w. cls"], "without": table[f"{row} w/o cls"],
                          "effect": suppression_effect(table, row)}
        print(f"{level}: mean Dice w. cls {results[level]['with']['mean_dice']:.4f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    ids = [case.case_id for case in level_cases(args.work, "none", 0.0, args.cases)]
    drop = results["none"]["with"]["mean_dice"] - results["strong"]["with"]["mean_dice"]
    header = (f"Shading stress test: the first {args.cases} held-out phantom cases (synth v{SYNTH_VERSION}, seed "
              f"{SETS['heldout']['seed']}: {', '.join(ids)}), each re-rendered at every level with the same anatomy, "
              f"tumour and noise; the shipped ensemble ({len(entries)} models, weighted as `infer` weighs them: "
              f"{', '.join(e['name'] for e in entries)}), {'1 flip' if args.no_tta else '8 flips'}, precision "
              f"{args.precision}. Phantom data, not BraTS.\n\n")
    footer = f"\n\nMean Dice (w. cls), no field minus strong: {drop:+.4f}.\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(header + markdown(results) + footer)
    write_json_atomically(args.out.with_suffix(".json"), {"cases": ids, "levels": results,
                                                          "mean_dice_drop_none_to_strong": drop})
    plot(results, args.out.with_suffix(".png"))
    print(header + markdown(results) + footer)


if __name__ == "__main__":
    main()
