"""What a sweep writes beside its study: ``trials.csv`` (every trial, its state, value and reason) and ``best.yaml``
(the best trial's whole configuration, for ``medseg train DATA --config STUDY/best.yaml``).

Both are written from the study's storage, so they hold the trials of every process that shares the study.
"""

from __future__ import annotations

import csv
import io as text_io
import math
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from pydantic import ValidationError

from medseg.config import Config, save_config
from medseg.errors import UsageError
from medseg.files import atomic_write, spreadsheet_safe

TRIALS_FILE = "trials.csv"
BEST_FILE = "best.yaml"
COLUMNS = ("trial", "state", "value", "tuned_on_all", "fold_scores", "minutes", "reason", "host", "folder")
# user attributes of a trial (set by medseg.sweep.study)
CONFIG_ATTR = "config"
REASON_ATTR = "reason"
FOLD_SCORES_ATTR = "fold_scores"
TUNED_ATTR = "tuned_on_all"
HOST_ATTR = "host"
FOLDER_ATTR = "folder"
INTERRUPTED = "interrupted: its process stopped before the trial ended (Optuna fails a trial whose heartbeat stops)"
RUNNING = "running, or its process stopped and Optuna will fail it once its heartbeat is stale"


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The completed trial of the highest value (the first of equals), or ``None`` before one completed."""
    done = [trial for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if _finite(trial.value)]
    return max(done, key=lambda trial: (trial.value, -trial.number), default=None)


def state_counts(study: optuna.Study) -> dict[str, int]:
    """The study's trials by state name (``COMPLETE``, ``PRUNED``, ``FAIL``, ``RUNNING``, ...)."""
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def reason(trial: FrozenTrial) -> str:
    """Why a trial did not complete (empty for a completed one)."""
    if trial.state == TrialState.COMPLETE:
        return ""
    if trial.state == TrialState.RUNNING:
        return RUNNING
    given = trial.user_attrs.get(REASON_ATTR)
    if given:
        return str(given)
    return INTERRUPTED if trial.state == TrialState.FAIL else trial.state.name.lower()


def minutes(trial: FrozenTrial) -> float | None:
    """How long a finished trial ran, in minutes."""
    return None if trial.duration is None else trial.duration.total_seconds() / 60


def trial_rows(study: optuna.Study) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per trial of the study (:data:`COLUMNS`, then one column per searched key), and the keys."""
    trials = study.get_trials(deepcopy=False)
    keys = sorted({key for trial in trials for key in trial.params})
    rows = []
    for trial in trials:
        scores = trial.user_attrs.get(FOLD_SCORES_ATTR) or []
        took = minutes(trial)
        rows.append(
            {
                "trial": trial.number,
                "state": trial.state.name,
                "value": _text(trial.value),
                "tuned_on_all": _text(trial.user_attrs.get(TUNED_ATTR)),
                "fold_scores": ";".join(_text(score) for score in scores),
                "minutes": "" if took is None else f"{took:.2f}",
                "reason": reason(trial),
                "host": trial.user_attrs.get(HOST_ATTR, ""),
                "folder": trial.user_attrs.get(FOLDER_ATTR, ""),
                **{key: trial.params.get(key, "") for key in keys},
            }
        )
    return rows, keys


def write_trials(study: optuna.Study, path: Path) -> Path:
    """Write ``trials.csv`` atomically; text that a spreadsheet would run as a formula is neutralised."""
    rows, keys = trial_rows(study)
    buffer = text_io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*COLUMNS, *keys], lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: spreadsheet_safe(value) for key, value in row.items()} for row in rows)
    with atomic_write(path) as stream:
        stream.write(buffer.getvalue())
    return path


def best_config(trial: FrozenTrial, folds: int) -> Config:
    """The configuration a trial was scored with, as ``medseg train`` reproduces it: every fold of ``folds``, then tuned.

    Raises:
        UsageError: If the trial holds no configuration medseg can read (a study written by another program or version).
    """
    try:
        config = Config.model_validate(trial.user_attrs[CONFIG_ATTR])
    except (KeyError, ValidationError) as error:
        raise UsageError(f"trial #{trial.number} of the study holds no configuration this medseg reads ({type(error).__name__})") from None
    split = config.split.model_copy(update={"n_folds": folds, "fold": None})
    trainer = config.trainer.model_copy(update={"tune_after": True})
    return config.model_copy(update={"split": split, "trainer": trainer})


def write_best(study: optuna.Study, path: Path, folds: int) -> Path | None:
    """Write the best trial's configuration as ``best.yaml`` (nothing before a trial completed)."""
    trial = best_trial(study)
    if trial is None:
        return None
    save_config(best_config(trial, folds), path)
    return path


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _text(value: Any) -> str:
    return "" if value is None else f"{value:.6f}" if isinstance(value, float) else str(value)
