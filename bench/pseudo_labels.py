"""Learning from frames without labels: a teacher run, then a student trained with the teacher's sure pseudo-labels.

Two comparisons, each a teacher and a student from one run of this script, with the cpu preset, the same folds and the
same budget per model (``trainer.max_epochs``):

- ``kaggle-uns-nerve256`` (real Kaggle UNS frames that all show a nerve, 256x256): the first ``--labelled`` subjects
  (natural order) are the labelled frames, the last ``--test`` subjects the "test" frames, whose labels are used only
  to score. The teacher trains on the labelled subjects; it pseudo-labels the test frames (``train --unlabeled
  --teacher``, the rule of :class:`medseg.infer.pseudo.ConfidenceRule`); the student trains on the labelled subjects
  and the sure pseudo-labels. Both runs are tuned out-of-fold and scored on the test subjects with ``medseg
  evaluate``: mean Dice (no frame of this set is empty, so the competition score is the mean Dice).
- ``uns-mini``: its labelled frames, with its 53 test frames (no labels) as the frames to pseudo-label; teacher and
  student are scored out-of-fold on the labelled frames (the cross-fitted score of ``medseg tune``).

Target (issue 35): the student beats the teacher by at least 0.02 mean Dice on the nerve256 test subjects, trains in
at most twice the teacher's time, and is not worse on uns-mini.

    python bench/pseudo_labels.py --out /tmp/pseudo-bench      # about half an hour on 2 cores
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from accuracy import DATASETS, first_subjects, link_frames
from medseg.config import Config, load_config
from medseg.data.datasets import load_dataset
from medseg.infer.pseudo import PseudoRequest, pseudo_label
from medseg.infer.tune import TuneRequest, tune_run
from medseg.learn.train import TrainRequest, train_run
from medseg.report.evaluate import EvaluateRequest, evaluate_run

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def say(line: str) -> None:
    print(f"  {line}", flush=True)


def trained(data: Path, run: Path, config: Config, folds: int, pseudo=None, record=None) -> float:
    """Train (and tune) a run; its training time in seconds."""
    start = time.perf_counter()
    train_run(TrainRequest(data, run, config, folds=folds, pseudo=pseudo, pseudo_record=record), force=True, on_message=say)
    seconds = time.perf_counter() - start
    tune_run(TuneRequest(run), force=True, on_message=say)
    return seconds


def nerve256(args: argparse.Namespace) -> dict:
    """Teacher and student on the labelled subjects, scored on the test subjects."""
    name, options = DATASETS["kaggle-uns-nerve256"]
    config = load_config("cpu", None, args.set, options)
    dataset = load_dataset(args.data_root / name, config.data)
    subjects = sorted({record.subject for record in dataset.train}, key=lambda text: int(text))
    labelled, test = set(subjects[: args.labelled]), set(subjects[-args.test :])
    assert labelled == first_subjects(dataset, args.labelled) and not labelled & test
    root = args.out / "nerve256"
    labelled_data, test_data = link_frames(dataset, labelled, root / "labelled"), link_frames(dataset, test, root / "test")
    frames = test_data / "images"
    print(f"nerve256: labelled subjects {sorted(labelled, key=int)}, test subjects {sorted(test, key=int)}", flush=True)
    teacher_s = trained(labelled_data, root / "teacher", config, args.folds)
    labels, record = pseudo_label(PseudoRequest(root / "teacher", frames), config, on_message=say)
    student_s = trained(labelled_data, root / "student", config, args.folds, labels, record)
    scores = {arm: evaluate_run(EvaluateRequest(root / arm, test_data), force=True, on_message=say) for arm in ("teacher", "student")}
    return {
        "labelled_subjects": len(labelled),
        "test_subjects": len(test),
        "labelled_frames": sum(1 for _ in (labelled_data / "images").iterdir()),
        "test_frames": sum(1 for _ in frames.iterdir()),
        "pseudo_kept": json.loads((root / "student" / "run.json").read_text())["pseudo"]["kept"],
        "teacher": {"train_s": round(teacher_s, 1), "mean_dice": scores["teacher"]["score"]},
        "student": {"train_s": round(student_s, 1), "mean_dice": scores["student"]["score"]},
    }


def uns_mini(args: argparse.Namespace) -> dict:
    """Teacher and student on uns-mini's labelled frames, its test frames pseudo-labelled, scored out-of-fold."""
    data = args.data_root / "uns-mini"
    config = load_config("cpu", None, args.set)
    root = args.out / "uns-mini"
    teacher_s = trained(data, root / "teacher", config, args.folds)
    labels, record = pseudo_label(PseudoRequest(root / "teacher", data / "test"), config, on_message=say)
    student_s = trained(data, root / "student", config, args.folds, labels, record)
    tuned = {arm: json.loads((root / arm / "postprocess.json").read_text()) for arm in ("teacher", "student")}
    return {
        "pseudo_kept": json.loads((root / "student" / "run.json").read_text())["pseudo"]["kept"],
        "teacher": {"train_s": round(teacher_s, 1), "cross_fitted": tuned["teacher"]["cross_fitted"]},
        "student": {"train_s": round(student_s, 1), "cross_fitted": tuned["student"]["cross_fitted"]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs and pseudo_labels.json")
    parser.add_argument("--data-root", type=Path, default=SHARED, help="folder holding the data sets")
    parser.add_argument("--labelled", type=int, default=15, help="nerve256: labelled subjects (the first ones)")
    parser.add_argument("--test", type=int, default=8, help="nerve256: test subjects (the last ones)")
    parser.add_argument("--folds", type=int, default=2, help="folds of teacher and student")
    parser.add_argument("--datasets", default="kaggle-uns-nerve256,uns-mini")
    parser.add_argument("--set", action="append", default=[], help="a configuration override for every run (repeatable)")
    args = parser.parse_args()
    args.set = [*args.set, "model.encoder_weights=none"]
    results = {}
    for name, arm in (("kaggle-uns-nerve256", nerve256), ("uns-mini", uns_mini)):
        if name in args.datasets.split(","):
            results[name] = arm(args)
            print(json.dumps({name: results[name]}, indent=1), flush=True)
    (args.out / "pseudo_labels.json").write_text(json.dumps(results, indent=1))
    print_verdict(results)


def print_verdict(results: dict) -> None:
    """The figures beside the target."""
    print("\n| data | teacher | student | gain | teacher train s | student train s | time ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, result in results.items():
        key = "mean_dice" if "mean_dice" in result["teacher"] else "cross_fitted"
        teacher, student = result["teacher"], result["student"]
        gain = student[key] - teacher[key]
        ratio = student["train_s"] / teacher["train_s"]
        times = f"{teacher['train_s']} | {student['train_s']} | {ratio:.2f}x"
        print(f"| {name} ({key}) | {teacher[key]:.4f} | {student[key]:.4f} | {gain:+.4f} | {times} |")


if __name__ == "__main__":
    main()
