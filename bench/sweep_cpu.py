"""Re-choose the ``cpu`` preset: ``medseg sweep`` on real Kaggle frames and uns-mini together (issue 19).

The sweep's data set is one folders-layout folder of symbolic links: every uns-mini training frame (25 subjects,
35% empty) and the frames of the first ``--subjects`` subjects of ``kaggle-uns-nerve256`` (real Kaggle frames,
each with a nerve), their names prefixed ``mini-`` and ``n256-`` so that ids and subjects stay apart (subject
pattern ``^([a-z0-9]+-\\d+)_``; masks binarised above 127, which keeps uns-mini's 0/255 masks as they are). Each
trial is the ``cpu`` preset with the values of ``bench/cpu_space.yaml``, trained on ``--folds`` subject-grouped
folds; its value is the cross-fitted out-of-fold score over both sets' frames. The study's first trial is the
preset itself, so the search's figures have their baseline at the same fidelity.

The study lives in ``--storage`` (default ``OUT/study.db``): running the script again with the same storage
adds trials, which is how a search longer than one session is run. Prints the sweep's lines and ends with the
preset's value and the best one.

    python bench/sweep_cpu.py --out /tmp/sweep-cpu --subjects 6 --folds 3 --timeout 100 --set model.encoder_weights=none

The study of record is ``bench/sweeps/cpu-preset/study.db`` (its ``trials.csv`` beside it): resume it with
``--storage sqlite:///bench/sweeps/cpu-preset/study.db`` and the same ``--subjects`` and ``--folds``, then copy
the new ``OUT/study/trials.csv`` beside it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import optuna
import yaml

from medseg.config import load_config
from medseg.data.datasets import load_dataset, require_clean
from medseg.errors import MedsegError
from medseg.sweep import outputs
from medseg.sweep.space import load_space

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import DATASETS, SHARED, first_subjects, link_frames  # bench/accuracy.py

optuna.logging.set_verbosity(optuna.logging.WARNING)
SPACE = Path(__file__).resolve().parent / "cpu_space.yaml"
SUBJECT_PATTERN = r"^([a-z0-9]+-\d+)_"
NERVE256_VALUES = DATASETS["kaggle-uns-nerve256"][1]  # its data flags, as the accuracy bench reads it
MASK_THRESHOLD = NERVE256_VALUES["data.mask_threshold"]
STUDY_NAME = "cpu-preset"


def combined_data(data_root: Path, subjects: int, target: Path) -> Path:
    """The sweep's data set: links to every uns-mini training frame and the first ``subjects`` subjects of kaggle-uns-nerve256.

    Raises:
        UsageError: If a data set is missing or has fewer subjects.
    """
    if target.exists():
        return target
    mini = require_clean(load_dataset(data_root / "uns-mini"))
    nerve = require_clean(load_dataset(data_root / "kaggle-uns-nerve256", load_config(values=NERVE256_VALUES).data))
    staging = target.with_name(target.name + ".partial")
    link_frames(mini, {record.subject for record in mini.train}, staging, prefix="mini-")
    link_frames(nerve, first_subjects(nerve, subjects), staging, prefix="n256-")
    staging.rename(target)
    return target


def enqueue_preset(storage: str, space_file: Path) -> None:
    """Make the ``cpu`` preset's own values the study's first trial (once: only while the study has no trials)."""
    study = optuna.create_study(storage=storage, study_name=STUDY_NAME, direction="maximize", load_if_exists=True)
    if not study.trials:
        values = load_space(space_file).drawn_for(load_config("cpu"))
        study.enqueue_trial(values, user_attrs={"medseg_note": "the cpu preset as it was"})


def sweep_command(data: Path, args: argparse.Namespace, storage: str) -> list[str]:
    """The ``medseg sweep`` command line of the search."""
    command = [sys.executable, "-m", "medseg", "sweep", str(data), "--out", str(args.out / "study"), "--preset", "cpu"]
    command += ["--space", str(args.space), "--storage", storage, "--study-name", STUDY_NAME, "--folds", str(args.folds)]
    command += ["--trials", str(args.trials), "--mask-threshold", str(MASK_THRESHOLD), "--subject-pattern", SUBJECT_PATTERN]
    if args.timeout is not None:
        command += ["--timeout", str(args.timeout)]
    for override in args.overrides:
        command += ["--set", override]
    return command


def summary(storage: str) -> str:
    """The preset's value and the best one, from the study."""
    study = optuna.load_study(storage=storage, study_name=STUDY_NAME)
    best = outputs.best_trial(study)
    if best is None:
        return "no trial completed yet"
    done = [trial for trial in study.trials if trial.state == optuna.trial.TrialState.COMPLETE]
    preset = next((trial for trial in done if "medseg_note" in trial.user_attrs), None)
    lines = [f"{len(study.trials)} trials, {len(done)} completed"]
    if preset is not None:
        lines.append(f"cpu preset (trial {preset.number}): {preset.value:.4f}")
    lines.append(f"best (trial {best.number}): {best.value:.4f} with {yaml.safe_dump(best.params, default_flow_style=True).strip()}")
    return "\n".join(lines)


def main() -> None:
    """Build the data set, enqueue the preset, run the sweep and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the data links and the study")
    parser.add_argument("--data-root", type=Path, default=SHARED, help="folder holding uns-mini and kaggle-uns-nerve256")
    parser.add_argument("--subjects", type=int, default=6, help="subjects of kaggle-uns-nerve256 in the search")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=100, help="trials this run adds (bounded by --timeout)")
    parser.add_argument("--timeout", type=float, default=None, help="start no trial after MIN minutes")
    parser.add_argument("--space", type=Path, default=SPACE)
    parser.add_argument("--storage", default=None, help="Optuna storage URL (default: OUT/study.db); the same URL resumes")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="fixed for every trial, e.g. trainer.batch_size=16")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    storage = args.storage or f"sqlite:///{(args.out / 'study.db').resolve()}"
    data = combined_data(args.data_root, args.subjects, args.out / f"data-{args.subjects}")
    enqueue_preset(storage, args.space)
    done = subprocess.run(sweep_command(data, args, storage), check=False)
    print(summary(storage))
    sys.exit(done.returncode)


if __name__ == "__main__":
    try:
        main()
    except MedsegError as error:
        sys.exit(f"error: {error}")
