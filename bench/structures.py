"""Several structures: one two-structure model against two one-structure models, same input, encoder and budget.

On ``usgra-seg`` (class-index masks: 1 nerve, 2 vessel) three runs are trained on the same subject-grouped
folds (usgra-seg has no subject ids, so every frame is its own group, as ``bench/accuracy.py`` does today):

- ``joint``: ``--classes nerve=1,vessel=2``, one model with a channel per structure;
- ``nerve``: ``--mask-value 1``; ``vessel``: ``--mask-value 2``, one model each.

Each run is tuned out-of-fold with ``medseg tune``; the table shows each structure's score tuned on all
out-of-fold frames and cross-fitted (each fold scored with the setting tuned on the other folds: what to
expect on new subjects), the minutes each arm took, and the joint model's ratios to the separate models.

    python bench/structures.py --out /tmp/structures --folds 5 --preset cpu
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from medseg.config import load_config
from medseg.errors import MedsegError
from medseg.infer.tune import TuneRequest, tune_run
from medseg.learn.train import TrainRequest, train_run
from medseg.runs import StructuresTuning, write_json

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ARMS = {"joint": {"data.classes": {"nerve": 1, "vessel": 2}}, "nerve": {"data.mask_value": 1}, "vessel": {"data.mask_value": 2}}


def run_arm(name: str, data: Path, out: Path, preset: str, overrides: list[str], folds: int) -> dict:
    """Train and tune one arm; its per-structure scores and minutes."""
    start = time.perf_counter()
    config = load_config(preset, None, overrides, ARMS[name])
    request = TrainRequest(data, out / name, config, folds=folds)
    trained = train_run(request, force=True, on_message=lambda line: print(f"  {name} {line}", flush=True))
    tuning = tune_run(TuneRequest(out / name), force=True, on_message=lambda line: None, samples=trained.samples)
    minutes = (time.perf_counter() - start) / 60
    blocks = tuning.classes if isinstance(tuning, StructuresTuning) else {name: tuning}
    return {
        "arm": name,
        "minutes": round(minutes, 2),
        "structures": {key: {"tuned_on_all": block.score_after, "cross_fitted": block.cross_fitted} for key, block in blocks.items()},
        "mean_tuned_on_all": tuning.score_after,
        "mean_cross_fitted": tuning.cross_fitted,
    }


def table(results: dict[str, dict]) -> str:
    """Both sides per structure and their differences, and the time ratio."""
    lines = [f"{'structure':<10} {'arm':<9} {'tuned on all':>13} {'cross-fitted':>13} {'minutes':>8}"]
    for structure in ("nerve", "vessel"):
        for arm in ("joint", structure):
            if arm in results:
                scores, minutes = results[arm]["structures"][structure], results[arm]["minutes"]
                lines.append(f"{structure:<10} {arm:<9} {scores['tuned_on_all']:>13.3f} {scores['cross_fitted']:>13.3f} {minutes:>8.1f}")
        if "joint" in results and structure in results:
            delta = results["joint"]["structures"][structure]["cross_fitted"] - results[structure]["structures"][structure]["cross_fitted"]
            lines.append(f"{structure:<10} joint - separate, cross-fitted: {delta:+.3f}")
    if all(arm in results for arm in ARMS):
        joint, separate = results["joint"]["minutes"], results["nerve"]["minutes"] + results["vessel"]["minutes"]
        lines.append(f"time: joint {joint:.1f} min, separate {separate:.1f} min, ratio {joint / separate:.2f}x")
        lines.append(f"joint mean over (frame, structure), cross-fitted: {results['joint']['mean_cross_fitted']:.3f}")
    return "\n".join(lines)


def main() -> int:
    """Run the arms and print the table; exit 1 with one line on a data or usage problem."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the three runs and structures.json")
    parser.add_argument("--data", type=Path, default=SHARED / "usgra-seg", help="usgra-seg (class-index masks: 1 nerve, 2 vessel)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="a configuration override for every arm")
    parser.add_argument("--arms", default="joint,nerve,vessel")
    args = parser.parse_args()
    results: dict[str, dict] = {}
    try:
        for name in args.arms.split(","):
            results[name] = run_arm(name, args.data, args.out, args.preset, args.overrides, args.folds)
            write_json(
                args.out / "structures.json", {"folds": args.folds, "preset": args.preset, "overrides": args.overrides, "arms": results}
            )
            print(table(results), flush=True)
    except MedsegError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps({name: result["minutes"] for name, result in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
