"""Accuracy: the recipe as written against medseg's defaults, by subject-grouped K-fold cross-validation.

Every data set is split into K subject-grouped folds (the split ``medseg train`` makes). Each frame is then
predicted by a model that did not train on it, and the out-of-fold predictions are scored with the
competition score (mean per-frame Dice, an empty frame scores 1 only if predicted empty), the Dice of the
frames that have a structure, and the presence accuracy (is the mask empty when the truth is).

- ``medseg``: the product's own path, ``medseg train DATA --preset kaggle`` (every fold, the fold itself
  validating its model) and its out-of-fold predictions with flip TTA. Two scores: ``tuned on all`` uses
  the post-processing ``medseg tune`` chooses on all out-of-fold frames (what the run reports, flattered by
  tuning on the frames it scores); ``cross-fitted`` scores each fold with the setting tuned on the other
  folds' frames only: the honest estimate for new subjects.
- ``recipe``: the recipe as written (DESIGN.md) for each fold: its training frames split 80/20 at random
  by frame (that fifth picks the best epoch), threshold 0.6, no minimum area, no presence head, no TTA.

Both arms use the same input size, encoder, batch size and epoch budget (``--preset``). Prints one table
and writes ``OUT/accuracy.json``.

``kaggle-uns-nerve256`` holds 1,918 real Kaggle UNS frames of 38 subjects, all with a nerve (256x256 JPEG, masks
binarised above 127, the subject the number before ``_``): its score is the mean Dice, and it measures how well
masks are drawn, not the empty-frame decision. Both arms of it at ``--preset cpu`` take hours here: size the run
with ``--folds 3`` (issue 19 asks about 90 minutes).

``usgra-seg-both`` is usgra-seg with both structures (1 nerve, 2 vessel): one two-structure model against one
model per structure, each tuned out-of-fold per structure (``bench/structures.py``, which prints its own
table with the differences and the time ratio); its rows give each arm's cross-fitted and tuned-on-all score
per structure (the per-frame columns do not apply and show ``-``). ``--preset cpu`` runs on a 2-core CPU; ``--preset default`` on a GPU.

    python bench/accuracy.py --preset cpu --out /tmp/accuracy
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg import runs
from medseg.config import Config, load_config
from medseg.data import splits
from medseg.data.datasets import Dataset, load_dataset, require_clean
from medseg.data.samples import load_samples
from medseg.devices import device_for
from medseg.errors import MedsegError, UsageError
from medseg.infer.predict import PostProcess, load_fold_model, predict_frames
from medseg.infer.tune import (
    MIN_AREAS,
    PRESENCE_THRESHOLDS,
    THRESHOLDS,
    best_point,
    cross_fitted_counts,
    frame_counts,
    grids,
    oof_predictions,
    score_cube,
)
from medseg.learn import metrics
from medseg.learn.fit import fit_fold
from medseg.learn.train import TrainRequest, train_run
from medseg.runs import Run, open_run

sys.path.insert(0, str(Path(__file__).resolve().parent))
import structures  # bench/structures.py: one two-structure model against one model per structure

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATASETS = {
    "uns-mini": ("uns-mini", {}),
    "usgra-seg": ("usgra-seg", {"data.mask_value": 1}),
    "montgomery-cxr": ("montgomery-cxr", {"data.mask_threshold": 127}),
    "usgra-seg-both": ("usgra-seg", {}),
    "kaggle-uns-nerve256": ("kaggle-uns-nerve256", {"data.mask_threshold": 127, "data.subject_pattern": r"^(\d+)_"}),
}
RECIPE = {
    "model.presence_head": False,
    "model.dropout": 0.3,
    "loss.name": "dice_bce",
    "loss.dice_weight": 0.5,
    "loss.bce_weight": 0.5,
    "loss.per_image_dice": False,
    "optim.lr": 1e-4,
    "optim.weight_decay": 1e-4,
    "optim.schedule": "plateau",
    "optim.plateau_factor": 0.5,
    "optim.plateau_patience": 5,
    "trainer.early_stopping_patience": 10,
    "augment.elastic.p": 0.25,
    "augment.elastic.alpha": 120.0,
    "augment.elastic.sigma": 6.0,
    "augment.blur.p": 0.2,
    "augment.hflip.p": 0.5,
    "augment.brightness_contrast.p": 0.5,
    "augment.coarse_dropout.p": 0.3,
}
RECIPE_THRESHOLD = 0.6
RECIPE_VAL_SHARE = 0.2


@dataclass
class Score:
    """One arm's out-of-fold result on one data set."""

    dataset: str
    arm: str
    counts: np.ndarray
    minutes: float
    extra: dict = field(default_factory=dict)

    def row(self) -> dict:
        """The JSON-ready figures."""
        summary = metrics.summary(self.counts)
        return {
            "dataset": self.dataset,
            "arm": self.arm,
            "score": summary["score"],
            "dice_nonempty": summary["dice_nonempty"],
            "presence_accuracy": summary["presence_accuracy"],
            "all_empty_score": summary["n_empty_truth"] / summary["n_images"],
            "frames": summary["n_images"],
            "minutes": round(self.minutes, 2),
            **self.extra,
        }


def medseg_arm(name: str, data: Path, config: Config, out: Path, folds: int) -> list[Score]:
    """Train every fold with medseg's defaults and score the out-of-fold predictions, tuned two ways."""
    start = time.perf_counter()
    run_path = out / name / "medseg"
    config = config.model_copy(update={"split": config.split.model_copy(update={"n_folds": folds, "fold": None})})
    train_run(TrainRequest(data, run_path, config), force=True, on_message=_say)
    run = open_run(run_path)
    thresholds, min_areas, presence_thresholds = grids(config.model.presence_head, THRESHOLDS, MIN_AREAS, PRESENCE_THRESHOLDS)
    oof = oof_predictions(run, thresholds, "hflip", on_message=_say)
    minutes = (time.perf_counter() - start) / 60
    chosen = best_point(score_cube(oof, min_areas, presence_thresholds), thresholds, min_areas, presence_thresholds)
    split = splits.load_split(run_path / runs.SPLIT_FILE)
    fold_of = {i: k for k, fold in enumerate(split.folds) for i in fold}
    order = np.argsort(oof.ids)
    tuned_on_all = frame_counts(oof, chosen, thresholds)[order]
    honest = cross_fitted_counts(oof, fold_of, thresholds, min_areas, presence_thresholds)[order]
    setting = {"threshold": chosen.threshold, "min_area": chosen.min_area, "presence_threshold": chosen.presence_threshold}
    return [
        Score(name, "medseg, tuned on all", tuned_on_all, minutes, {"setting": setting}),
        Score(name, "medseg, cross-fitted", honest, minutes),
    ]


def recipe_arm(name: str, data: Path, config: Config, out: Path, folds: int) -> Score:
    """The recipe as written, trained once per fold on the other folds, scored on the fold."""
    start = time.perf_counter()
    dataset = require_clean(load_dataset(data, config.data))
    samples = load_samples(dataset.train, config.data)
    split = _split(dataset, samples, config, folds)
    device = device_for(config)
    post = PostProcess(threshold=RECIPE_THRESHOLD)
    counts: dict[str, np.ndarray] = {}
    for k in range(folds):
        train_ids, test_ids = split.train_val(k)
        rng = np.random.default_rng(config.trainer.seed + k)
        shuffled = [train_ids[i] for i in rng.permutation(len(train_ids))]
        n_val = max(1, round(RECIPE_VAL_SHARE * len(shuffled)))
        fold_dir = runs.FoldDir(k, out / name / "recipe" / f"fold_{k}")
        _say(f"recipe fold {k}: {len(shuffled) - n_val} training, {n_val} random validation, {len(test_ids)} scored frames")
        fit_fold(config, fold_dir, samples, shuffled[n_val:], shuffled[:n_val])
        plan = runs.RunPlan(data=str(Path(data).resolve()), n_folds=folds, folds=[k], several=False)
        model = load_fold_model(Run(fold_dir.path, config, plan, [fold_dir]), fold_dir, device)
        frames = [samples[i][0] for i in test_ids]
        for sample_id, prediction in zip(test_ids, predict_frames([model], frames, config, tta="none")):
            counts[sample_id] = metrics.confusion_counts(prediction.mask([post]), samples[sample_id][1].astype(bool)[None])[0]
    ordered = np.stack([counts[i] for i in sorted(counts)])
    return Score(name, "recipe", ordered, (time.perf_counter() - start) / 60)


def _split(dataset, samples, config: Config, folds: int) -> splits.Split:
    """The subject-grouped split ``medseg train`` makes of this data (same function, same inputs)."""
    ids = [record.id for record in dataset.train]
    empty = [not samples[i][1].any() for i in ids]
    return splits.grouped_kfold(ids, [record.subject for record in dataset.train], empty, n_folds=folds, seed=config.split.seed)


def _say(line: str) -> None:
    print(f"  {line}", file=sys.stderr, flush=True)


def subject_subset(data: Path, config: Config, subjects: int, target: Path) -> Path:
    """A folders-layout copy (symbolic links) of the frames of a data set's first ``subjects`` subjects, in natural order.

    Raises:
        UsageError: If the data set is not of the folders layout or has fewer subjects.
    """
    dataset = require_clean(load_dataset(data, config.data))
    if dataset.layout != "folders":
        raise UsageError(f"{data}: --subjects takes folders-layout data sets (images/ and masks/), not {dataset.layout}")
    kept = first_subjects(dataset, subjects)
    if target.exists():
        shutil.rmtree(target)
    return link_frames(dataset, kept, target)


def first_subjects(dataset: Dataset, subjects: int) -> set[str]:
    """The first ``subjects`` subjects of a data set, in natural order (``2`` before ``10``).

    Raises:
        UsageError: If the data set has fewer subjects.
    """
    known = sorted({record.subject for record in dataset.train if record.subject}, key=lambda subject: (len(subject), subject))
    if len(known) < subjects:
        raise UsageError(f"{dataset.root}: {len(known)} subjects, fewer than {subjects}")
    return set(known[:subjects])


def link_frames(dataset: Dataset, subjects: set[str], target: Path, prefix: str = "") -> Path:
    """Add symbolic links to the frames and mask files of ``subjects`` to the folders layout at ``target``.

    Args:
        dataset: A data set whose frames have mask files (the folders or kaggle layout).
        subjects: The subjects whose frames are linked.
        target: The folders-layout data set (``images/``, ``masks/``), created if missing.
        prefix: Put before every file name, so that several data sets' ids and subjects stay apart.
    """
    for folder in ("images", "masks"):
        (target / folder).mkdir(parents=True, exist_ok=True)
    for record in dataset.train:
        if record.subject in subjects:
            (target / "images" / f"{prefix}{record.image_path.name}").symlink_to(record.image_path.resolve())
            mask_name = f"{prefix}{record.id}{record.mask_path.suffix}"
            (target / "masks" / mask_name).symlink_to(record.mask_path.resolve())
    return target


def structures_rows(name: str, data: Path, args: argparse.Namespace) -> list[dict]:
    """One two-structure model and one model per structure, on the same folds and budget: a row per arm and structure."""
    results = {arm: structures.run_arm(arm, data, args.out / name, args.preset, args.overrides, args.folds) for arm in structures.ARMS}
    print(structures.table(results), flush=True)
    rows = []
    for arm, result in results.items():
        for structure, scores in result["structures"].items():
            for kind, words in (("cross_fitted", "cross-fitted"), ("tuned_on_all", "tuned on all")):
                label = f"{arm} {structure}, {words}"
                empty = {"dice_nonempty": None, "presence_accuracy": None, "all_empty_score": None, "frames": 0}
                rows.append({"dataset": name, "arm": label, "score": scores[kind], **empty, "minutes": result["minutes"]})
    return rows


def print_table(rows: list[dict]) -> None:
    """Both arms per data set, and the ratio of the honest medseg score to the recipe's."""
    print(f"{'data set':<15} {'arm':<30} {'score':>6} {'Dice>0':>7} {'presence':>8} {'empty':>6} {'frames':>6} {'min':>6}")
    for row in rows:
        print(
            f"{row['dataset']:<15} {row['arm']:<30} {_fmt(row['score'])} {_fmt(row['dice_nonempty'], 7)} "
            f"{_fmt(row['presence_accuracy'], 8)} {_fmt(row['all_empty_score'])} {row['frames']:>6} {row['minutes']:>6.1f}"
        )
    for dataset in dict.fromkeys(row["dataset"] for row in rows):
        by_arm = {row["arm"]: row["score"] for row in rows if row["dataset"] == dataset}
        if by_arm.get("recipe") and by_arm.get("medseg, cross-fitted") is not None:
            print(f"{dataset}: medseg cross-fitted / recipe = {by_arm['medseg, cross-fitted'] / by_arm['recipe']:.2f}x")


def _fmt(value: float | None, width: int = 6) -> str:
    return f"{value:>{width}.3f}" if value is not None else f"{'-':>{width}}"


def main() -> None:
    """Run the arms on the chosen data sets and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu", choices=("cpu", "default"), help="model size and epoch budget of both arms")
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs and accuracy.json")
    parser.add_argument("--data-root", type=Path, default=SHARED, help="folder holding the data sets")
    parser.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated, of {', '.join(DATASETS)}")
    parser.add_argument("--arms", default="recipe,medseg", help="comma-separated: recipe, medseg")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument(
        "--subjects", type=int, default=None, help="only the first N subjects of each data set (folders layout), to size a run"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="override for both arms' budget, e.g. trainer.max_epochs=12"
    )
    parser.add_argument(
        "--medseg-set", action="append", default=[], help="override for the medseg arm only (to measure a candidate default)"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.datasets.split(","):
        folder, values = DATASETS[name]
        data = args.data_root / folder
        if not data.is_dir():
            raise UsageError(f"{data}: no such data set folder; point --data-root at the folder that holds {folder}/")
        if args.subjects:
            data = subject_subset(data, load_config(args.preset, None, args.overrides, values), args.subjects, args.out / "subsets" / name)
        if name == "usgra-seg-both":
            rows += structures_rows(name, data, args)
        elif "medseg" in args.arms:
            config = load_config(args.preset, None, args.overrides + args.medseg_set, values)
            rows += [score.row() for score in medseg_arm(name, data, config, args.out, args.folds)]
        if "recipe" in args.arms and name != "usgra-seg-both":
            config = load_config(args.preset, None, args.overrides, {**RECIPE, **values})
            rows.append(recipe_arm(name, data, config, args.out, args.folds).row())
        print_table(rows)
        runs.write_json(
            args.out / "accuracy.json",
            {"preset": args.preset, "folds": args.folds, "overrides": args.overrides, "medseg_overrides": args.medseg_set, "rows": rows},
        )


if __name__ == "__main__":
    try:
        main()
    except MedsegError as error:
        sys.exit(f"error: {error}")
