"""``medseg sweep``: an Optuna study over the configuration, each trial trained and tuned on subject-grouped folds.

Each trial draws its values from the search space (:mod:`medseg.sweep.space`) with Optuna's TPE sampler, trains
every fold of a subject-grouped split (:func:`medseg.learn.train.train_run`), tunes the post-processing out-of-fold
(:func:`medseg.infer.tune.tune_run`) and reports the cross-fitted score (each fold scored with the setting tuned
on the other folds) as its value, to maximise. Each fold's validation score is an intermediate value, so that
Optuna's median pruner stops a trial whose first folds score below the median of the earlier trials' same folds.
A trial whose configuration is refused (a value the configuration does not take, an unknown encoder, a
:class:`~medseg.errors.MedsegError` while training, CUDA out of memory) fails with its reason and the sweep goes on.

The study lives in an Optuna storage: by default ``STUDY/study.db`` (SQLite); ``--storage URL`` (e.g. PostgreSQL)
lets several ``medseg sweep`` processes on several machines add trials to one study. Running the command again
adds trials to the same study; a trial left running by a killed process is failed by Optuna's heartbeat once it
has been silent for :data:`GRACE_S` seconds (and not run again: the sampler draws anew).

``--outer-fold K`` keeps fold K of a subject-grouped split of the data (``--outer-folds N``) out of every trial
and, at the end, trains the best trial's configuration on the other frames and scores it on fold K: nested
cross-validation, the honest estimate beside the best trial's own value (optimistic: the best of N).

```
STUDY/
  sweep.json    the data, the storage and the study's name (a later sweep into STUDY must agree)
  study.db      the Optuna study (SQLite), unless --storage names another
  trials/NNN/   each trial's run folder: config, split, metrics per fold, postprocess.json (checkpoints deleted once scored)
  outer/        with --outer-fold: exclude.csv (the frames no trial sees), run/ (the best configuration trained on
                the other frames), outer.json (its score on the outer fold, per frame)
  trials.csv    every trial: state, value, score tuned on all frames, fold scores, minutes, reason, parameters
  best.yaml     the best trial's configuration, for medseg train DATA --config STUDY/best.yaml
  study.html    the study page
```
"""

from __future__ import annotations

import math
import platform
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from lightning.pytorch.callbacks import Callback
from optuna.trial import FrozenTrial, TrialState
from pydantic import BaseModel, ConfigDict, ValidationError

from medseg import __version__, runs
from medseg.config import MAX_FOLDS, SEED_MAX, Config, load_config
from medseg.data import exclusions, splits
from medseg.data.datasets import Dataset, load_dataset, require_clean
from medseg.data.samples import load_samples
from medseg.errors import MedsegError, UsageError
from medseg.files import first_line
from medseg.infer.heldout import held_out_frames
from medseg.infer.predict import read_postprocess
from medseg.infer.tune import TuneRequest, tune_run
from medseg.learn.estimate import cpu_warning, tell_warning
from medseg.learn.fit import check_trainer
from medseg.learn.run_progress import best_score
from medseg.learn.train import TrainRequest, train_run
from medseg.report.evaluate import score_frames, scores_summary
from medseg.sweep import outputs
from medseg.sweep.space import Space, load_space

SWEEP_FILE = "sweep.json"
STUDY_DB = "study.db"
TRIALS_DIR = "trials"
OUTER_DIR = "outer"
OUTER_FILE = "outer.json"
EXCLUDE_FILE = "exclude.csv"
PAGE_FILE = "study.html"
IDENTITY_ATTR = "medseg_sweep"  # the study's user attribute that fixes its folds and outer fold
OUTER_ATTR = "outer_result"
HEARTBEAT_S = 60  # a running trial's process writes a heartbeat this often
GRACE_S = 180  # a running trial silent this long is failed (its process was killed)
PRUNER_STARTUP_TRIALS = 2  # trials that complete before the median pruner stops any
MAX_TRIALS = 100_000  # trials one sweep process adds
_OURS = {SWEEP_FILE, STUDY_DB, f"{STUDY_DB}-journal", f"{STUDY_DB}-wal", f"{STUDY_DB}-shm", TRIALS_DIR, OUTER_DIR, PAGE_FILE}
_OURS |= {outputs.TRIALS_FILE, outputs.BEST_FILE}


@dataclass
class SweepRequest:
    """What ``medseg sweep`` is asked to do.

    Attributes:
        data: The data folder.
        out: The study folder.
        preset: Starting configuration of every trial.
        config_file: A YAML file of configuration keys for every trial (the space's keys replace its values).
        overrides: ``key=value`` for every trial (a key the space searches is refused).
        values: Typed values by dotted key for every trial (the data flags).
        space_file: The search space (``None``: :data:`medseg.sweep.space.DEFAULT_SPACE`).
        trials: Trials this process adds.
        timeout_min: Start no trial after this many minutes.
        storage: An Optuna storage URL (``None``: ``STUDY/study.db``).
        study_name: The study's name in the storage.
        folds: Folds of each trial's subject-grouped split (``None``: the configuration's ``split.n_folds``).
        outer_fold: The fold of the outer split kept out of every trial and scored at the end (``None``: none).
        outer_folds: Folds of the outer split.
        seed: The sampler's seed (``None``: a fresh one, so that processes sharing a study draw different trials).
        keep_checkpoints: Keep every trial's checkpoints (else deleted once the trial is scored).
        pruner: An Optuna pruner (Python API; ``None``: the median pruner).
    """

    data: Path
    out: Path
    preset: str = "default"
    config_file: Path | None = None
    overrides: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)
    space_file: Path | None = None
    trials: int = 20
    timeout_min: float | None = None
    storage: str | None = None
    study_name: str = "medseg"
    folds: int | None = None
    outer_fold: int | None = None
    outer_folds: int = 5
    seed: int | None = None
    keep_checkpoints: bool = False
    pruner: optuna.pruners.BasePruner | None = None


@dataclass
class SweepResult:
    """How a sweep ended.

    Attributes:
        storage: The storage, its password hidden.
        study_name: The study's name.
        counts: Trials of the study by state (``COMPLETE``, ``PRUNED``, ``FAIL``, ``RUNNING``, ...).
        added: Trials this process ran.
        best: The best trial, or ``None`` when none completed.
        outer: The outer fold's result (``outer.json``), or ``None`` without ``--outer-fold``.
        written: The files written.
    """

    storage: str
    study_name: str
    counts: dict[str, int]
    added: int
    best: FrozenTrial | None
    outer: dict[str, Any] | None
    written: list[Path]


class SweepFolder(BaseModel):
    """``STUDY/sweep.json``: what the study folder belongs to.

    Attributes:
        format: The file's format.
        data: The data folder (absolute).
        storage: The storage URL, its password hidden (``None``: ``STUDY/study.db``).
        study_name: The study's name in the storage.
        medseg: The medseg version that started it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: int = 1
    data: str
    storage: str | None
    study_name: str
    medseg: str


@dataclass(frozen=True)
class _Context:
    """What every trial of one process shares."""

    request: SweepRequest
    space: Space
    folds: int
    exclude: Path | None  # the outer fold's exclusions file


def run_sweep(
    request: SweepRequest, on_message: Callable[[str], None] = print, on_warning: Callable[[str], None] | None = None
) -> SweepResult:
    """Run a sweep: add trials to the study, then write ``trials.csv``, ``best.yaml``, the outer fold's score and ``study.html``.

    Args:
        request: What to do.
        on_message: Receives one line per trial (and per outer-fold step).
        on_warning: Receives the warning of a GPU-sized sweep about to train on the CPU (``on_message``, after
            ``warning:``, when ``None``).

    Returns:
        The study's state at the end.

    Raises:
        UsageError: On a mistake in the request, the space, the storage or the study folder, before any trial.
        DataError: If the data set has problems.
    """
    _check_request(request)
    space = load_space(request.space_file)
    base = _base_config(request, space)
    folds = request.folds or base.split.n_folds
    tell_warning(cpu_warning(base, folds, trials=request.trials), on_warning, on_message)
    dataset = require_clean(load_dataset(request.data, base.data))
    left_out = exclusions.read_for(base.data.exclude, dataset)  # read once, checked like train's
    marker = _check_folder(request)
    with _quiet_optuna():
        study, identity = _open_sweep(request, marker, dataset, base, folds, left_out, space)
        exclude = _write_outer_exclusions(request, dataset, identity["outer_ids"], left_out) if identity["outer_ids"] else None
        context = _Context(request, space, folds, exclude)
        progress = _Progress(request, folds, on_message)
        study.optimize(
            _Objective(context),
            n_trials=request.trials,
            timeout=None if request.timeout_min is None else request.timeout_min * 60,
            catch=(MedsegError,),
            callbacks=[progress],
            gc_after_trial=True,
        )
        outer = None
        try:
            outer = _evaluate_outer(study, context, identity, on_message) if identity["outer_ids"] else None
        finally:  # the trials' outputs are written even when the outer fold's run fails
            written = _write_outputs(study, request.out, folds, outer, space)
    counts = outputs.state_counts(study)
    return SweepResult(storage_label(request), request.study_name, counts, progress.done, outputs.best_trial(study), outer, written)


def _open_sweep(
    request: SweepRequest,
    marker: SweepFolder | None,
    dataset: Dataset,
    base: Config,
    folds: int,
    left_out: dict[str, str],
    space: Space,
) -> tuple[optuna.Study, dict[str, Any]]:
    """Open the storage and the study, check that its trials can go on with ``space``, settle its folds and outer
    fold, then write ``sweep.json`` (a new STUDY's).

    Only once the storage works and the study takes this sweep is STUDY bound to them: a mistake binds nothing.
    """
    option = f"--storage {storage_label(request)}" if request.storage else str(Path(request.out) / STUDY_DB)
    study = _open_study(open_storage(storage_url(request), option), request)
    _check_space_fits(study, space, request)
    identity = _settle_identity(
        study,
        request,
        folds,
        lambda: _outer_ids(dataset, base, request, left_out),
        lambda ids: _check_folds(dataset, base, folds, ids, left_out),
    )
    if marker is not None:
        runs.write_json(Path(request.out) / SWEEP_FILE, marker.model_dump(mode="json"))
    study.sampler = optuna.samplers.TPESampler(seed=_seed(request, study), constant_liar=True)
    return study, identity


def _check_space_fits(study: optuna.Study, space: Space, request: SweepRequest) -> None:
    """Refuse a space the study's recorded trials cannot go on with (else every new trial would fail alike).

    Raises:
        UsageError: Naming the first parameter that clashes and the two ways out.
    """
    clashes = space.clashes_with_study(study)
    if clashes:
        raise UsageError(
            f"the search space ({space.source}) does not fit study {request.study_name!r}: {clashes[0]}; keep the "
            "study's kinds, scales and choices (a range may widen or narrow), or start a new study (another --out or --study-name)"
        )


def _check_request(request: SweepRequest) -> None:
    if not 1 <= request.trials <= MAX_TRIALS:
        raise UsageError(f"--trials {request.trials}: run at least 1 trial (at most {MAX_TRIALS:,}), e.g. --trials 20")
    if request.timeout_min is not None and not 0 < request.timeout_min < math.inf:
        raise UsageError(f"--timeout {request.timeout_min:g}: give the minutes after which no trial starts, above 0")
    if request.folds is not None and not 2 <= request.folds <= MAX_FOLDS:
        raise UsageError(f"--folds {request.folds}: each trial needs 2 or more folds for its cross-fitted score (at most {MAX_FOLDS})")
    if not 2 <= request.outer_folds <= MAX_FOLDS:
        raise UsageError(f"--outer-folds {request.outer_folds}: split the data into 2 or more outer folds (at most {MAX_FOLDS})")
    if request.seed is not None and not 0 <= request.seed <= SEED_MAX:
        raise UsageError(f"--seed {request.seed}: give a seed from 0 to {SEED_MAX} (what numpy and Optuna take)")
    if request.outer_fold is not None and not 0 <= request.outer_fold < request.outer_folds:
        raise UsageError(
            f"--outer-fold {request.outer_fold}: choose a fold from 0 to {request.outer_folds - 1} (--outer-folds {request.outer_folds})"
        )
    if not request.study_name.strip():
        raise UsageError("--study-name: give the study a name")


def _base_config(request: SweepRequest, space: Space) -> Config:
    """Every trial's configuration before the space's values, checked; a ``--set`` key the space searches is refused."""
    given = [text.partition("=")[0].strip() for text in request.overrides]
    clashes = space.clashes(given)
    if clashes:
        mine, theirs = clashes[0]
        raise UsageError(f"--set {theirs} and the search space ({space.source}) both set {mine}; drop one of them")
    config = load_config(request.preset, request.config_file, request.overrides, request.values)
    trainer = config.trainer
    if trainer.num_nodes > 1 or str(trainer.devices) not in ("auto", "1") or "ddp" in trainer.strategy:
        raise UsageError(
            "a sweep trains each trial on one device (drop --set trainer.devices, trainer.num_nodes, trainer.strategy); "
            "for several GPUs run one medseg sweep per GPU (CUDA_VISIBLE_DEVICES=K), all with the same --out or --storage"
        )
    check_trainer(_run_config(config, None))  # settings Lightning refuses would fail every trial alike
    return config


def trial_config(request: SweepRequest, values: dict[str, Any]) -> Config:
    """A trial's configuration: the request's, with the space's values.

    Raises:
        UsageError: If a drawn value is not one the configuration takes (the trial fails with it).
    """
    return load_config(request.preset, request.config_file, request.overrides, {**request.values, **values})


def storage_url(request: SweepRequest) -> str:
    """The storage's URL: ``--storage``, or the SQLite file ``STUDY/study.db``."""
    return request.storage or f"sqlite:///{(Path(request.out) / STUDY_DB).resolve()}"


def storage_label(request: SweepRequest) -> str:
    """The storage's URL with its password hidden, for messages and files."""
    url = storage_url(request)
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url


def _check_folder(request: SweepRequest) -> SweepFolder | None:
    """Check that STUDY is this sweep's (or new) and create it.

    Returns:
        The ``sweep.json`` to write once the study opens, or ``None`` when STUDY has it already.

    Raises:
        UsageError: If STUDY is a file, a folder of something else, or a sweep of other data or another storage.
    """
    out = Path(request.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder; choose another --out")
    marker = out / SWEEP_FILE
    wanted = SweepFolder(
        data=str(Path(request.data).resolve()),
        storage=None if request.storage is None else storage_label(request),
        study_name=request.study_name,
        medseg=__version__,
    )
    if marker.is_file():
        _check_same_sweep(marker, wanted)
        return None
    foreign = [entry.name for entry in out.iterdir() if entry.name not in _OURS and not entry.name.startswith(".")] if out.is_dir() else []
    if foreign:
        raise UsageError(
            f"--out {out}: the folder holds other files ({', '.join(sorted(foreign)[:3])}) and no {SWEEP_FILE}; "
            "choose a new or empty folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    return wanted


def _check_same_sweep(marker: Path, wanted: SweepFolder) -> None:
    try:
        saved = SweepFolder.model_validate(runs.read_json(marker))
    except ValidationError as error:
        raise UsageError(f"{marker}: not a medseg sweep file ({runs.validation_errors(error)}); choose another --out") from None
    folder = marker.parent
    if saved.data != wanted.data:
        raise UsageError(f"--out {folder}: a sweep of {saved.data}, not {wanted.data}; sweep the same DATA or choose another --out")
    if saved.storage != wanted.storage:
        was = f"--storage {saved.storage}" if saved.storage else f"its own {STUDY_DB} (no --storage)"
        raise UsageError(f"--out {folder}: its study is in {was}; give the same storage again or choose another --out")
    if saved.study_name != wanted.study_name:
        raise UsageError(
            f"--out {folder}: its study is named {saved.study_name!r}; give --study-name {saved.study_name} or choose another --out"
        )


def open_storage(url: str, option: str, attempts: int = 5) -> optuna.storages.RDBStorage:
    """An Optuna RDB storage with heartbeats (:data:`HEARTBEAT_S`, :data:`GRACE_S`).

    Several processes may create one SQLite study at once: a locked database or a table another process is
    creating is retried.

    Args:
        url: A SQLAlchemy URL (``sqlite:///FILE``, ``postgresql://user:password@host/db``, ...).
        option: The option or file it came from, for messages.
        attempts: Tries on a locked database.

    Raises:
        UsageError: If the URL is malformed, its database driver is missing or the database cannot be opened.
    """
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError) as error:
            busy = any(word in str(error) for word in ("locked", "already exists", "UNIQUE constraint"))
            if not busy or attempt == attempts - 1:
                raise UsageError(
                    f"{option}: cannot open the study's database ({first_line(error)}); check the URL, the server and the permissions"
                ) from None
            time.sleep(1 + attempt)
        except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError, ValueError) as error:
            raise UsageError(
                f"{option}: not a storage URL Optuna can use ({first_line(error)}); give e.g. sqlite:///study.db or postgresql://user:password@host/db"
            ) from None
        except ImportError:
            raise UsageError(
                f"{option}: the database driver for this URL is not installed (for postgresql://: pip install 'medseg[postgres]')"
            ) from None
        except sqlalchemy.exc.SQLAlchemyError as error:
            raise UsageError(f"{option}: cannot open the study's database ({first_line(error)})") from None
    raise AssertionError("unreachable")


def _open_study(storage: optuna.storages.RDBStorage, request: SweepRequest) -> optuna.Study:
    pruner = request.pruner or optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=0)
    try:
        study = optuna.create_study(
            storage=storage, study_name=request.study_name, direction="maximize", load_if_exists=True, pruner=pruner
        )
    except ValueError as error:
        raise UsageError(f"--study-name {request.study_name}: {error}") from None
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise UsageError(
            f"--study-name {request.study_name}: the study in {storage_label(request)} minimises; "
            "medseg's studies maximise the score, use another name"
        )
    return study


def _settle_identity(
    study: optuna.Study,
    request: SweepRequest,
    folds: int,
    outer_ids: Callable[[], list[str]],
    check: Callable[[list[str] | None], None],
) -> dict[str, Any]:
    """The folds and outer fold the study scores its trials on: set by its first sweep (once ``check`` passes), then checked.

    Args:
        study: The study.
        request: What the sweep is asked.
        folds: Folds of each trial.
        outer_ids: Makes the outer fold's frame ids (a new study with ``--outer-fold``).
        check: Raises if the trials' frames cannot be split into ``folds`` (given the outer fold's ids).

    Raises:
        UsageError: If the request's ``--folds``, ``--outer-fold`` or ``--outer-folds`` differ from the study's.
    """
    found = study.user_attrs.get(IDENTITY_ATTR)
    outer = None if request.outer_fold is None else request.outer_folds
    if found is None:
        found = {"folds": folds, "outer_fold": request.outer_fold, "outer_folds": outer, "outer_ids": None, "medseg": __version__}
        if request.outer_fold is not None:
            found["outer_ids"] = outer_ids()
        check(found["outer_ids"])  # before the study is bound to these folds
        study.set_user_attr(IDENTITY_ATTR, found)
        return found
    if found["folds"] != folds:
        raise UsageError(
            f"--folds {folds}: the study's trials are scored on {found['folds']} folds (set by its first sweep); "
            f"use --folds {found['folds']}"
        )
    if found["outer_fold"] is None and request.outer_fold is not None:
        raise UsageError(
            f"--outer-fold {request.outer_fold}: the study's trials saw every frame, so none can be held out now; "
            "start a new study (another --out or --study-name) with --outer-fold"
        )
    if found["outer_fold"] is not None and (request.outer_fold, outer) != (found["outer_fold"], found["outer_folds"]):
        raise UsageError(
            f"the study keeps outer fold {found['outer_fold']} of {found['outer_folds']} out of every trial; "
            f"give --outer-fold {found['outer_fold']} --outer-folds {found['outer_folds']}"
        )
    check(found["outer_ids"])
    return found


def _outer_ids(dataset: Dataset, config: Config, request: SweepRequest, left_out: dict[str, str]) -> list[str]:
    """The frames of the outer fold: fold K of a subject-grouped split of the frames (balanced for empty masks).

    Raises:
        UsageError: If the data have fewer subjects than outer folds.
    """
    records = [record for record in dataset.train if record.id not in left_out]
    samples = load_samples(records, dataset.options)
    empty = [_empty(samples[record.id][1], bool(dataset.classes)) for record in records]
    try:
        split = splits.grouped_kfold(
            [record.id for record in records], [record.subject for record in records], empty, request.outer_folds, config.split.seed
        )
    except splits.SplitError as error:
        raise UsageError(f"--outer-folds {request.outer_folds}: {str(error).replace('--folds', '--outer-folds')}") from None
    return list(split.folds[request.outer_fold])


def _check_folds(dataset: Dataset, config: Config, folds: int, outer_ids: list[str] | None, excluded: dict[str, str]) -> None:
    """Check that the frames the trials train on (the outer fold and ``data.exclude`` left out) split into ``folds``.

    Raises:
        UsageError: If there are fewer subjects than folds, naming ``--folds`` (else every trial would fail alike).
    """
    left_out = set(outer_ids or ()) | set(excluded)
    records = [record for record in dataset.train if record.id not in left_out]
    try:
        splits.grouped_kfold([r.id for r in records], [r.subject for r in records], [False] * len(records), folds, config.split.seed)
    except splits.SplitError as error:
        raise UsageError(f"--folds {folds}: {error}{' (outside the outer fold)' if outer_ids else ''}") from None


def _empty(mask: Any, several: bool) -> bool | list[bool]:
    return [not channel.any() for channel in mask] if several else not mask.any()


def _write_outer_exclusions(request: SweepRequest, dataset: Dataset, outer_ids: list[str], left_out: dict[str, str]) -> Path:
    """``STUDY/outer/exclude.csv``: the outer fold's frames (and those ``data.exclude`` names), for every trial's ``data.exclude``.

    Raises:
        UsageError: If the data lack a frame of the study's outer fold (a study shared with other data).
    """
    known = {record.id for record in dataset.train}
    missing = [frame for frame in outer_ids if frame not in known]
    if missing:
        raise UsageError(f"{request.data}: has no frame {missing[0]} of the study's outer fold; sweep the data the study started with")
    reason = f"outer fold {request.outer_fold} of {request.outer_folds}: kept out of every trial of the sweep, scored at its end"
    excluded = {**left_out, **{frame: reason for frame in outer_ids}}
    path = Path(request.out) / OUTER_DIR / EXCLUDE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    exclusions.write_exclusions(path, excluded, source=str(Path(request.data).resolve()))
    return path.resolve()


def _seed(request: SweepRequest, study: optuna.Study) -> int | None:
    """The sampler's seed: the request's, moved on by the trials the study holds (a resumed sweep does not draw its first trials again)."""
    return None if request.seed is None else (request.seed + len(study.get_trials(deepcopy=False))) % (SEED_MAX + 1)


def _run_config(config: Config, exclude: Path | None) -> Config:
    """What a trial (or the outer fold's run) trains with: one device (``auto`` would take every GPU, with DDP), and
    the outer fold's exclusions file as ``data.exclude``."""
    trainer = config.trainer.model_copy(update={"devices": 1}) if config.trainer.devices == "auto" else config.trainer
    data = config.data if exclude is None else config.data.model_copy(update={"exclude": str(exclude)})
    return config.model_copy(update={"trainer": trainer, "data": data})


class FoldReporter(Callback):
    """Reports each fold's validation score (at its lowest validation loss) to the trial, and prunes it when Optuna says so.

    Passed to every fold of a trial's :func:`~medseg.learn.train.train_run`; the step of fold K's value is K. The last
    fold is never pruned: its training is done, and the trial's value is worth having.

    Args:
        trial: The trial.
        folds: Folds the trial trains.
    """

    def __init__(self, trial: optuna.Trial, folds: int) -> None:
        self.trial = trial
        self.folds = folds
        self.scores: list[float] = []
        self.step = 0

    def on_fit_end(self, trainer, pl_module) -> None:
        step, score = self.step, best_score(trainer)  # the fold's best checkpoint's score, as its summary line says
        self.step += 1
        if not math.isfinite(score):
            return
        self.scores.append(score)
        self.trial.set_user_attr(outputs.FOLD_SCORES_ATTR, self.scores)
        self.trial.report(score, step)
        if step < self.folds - 1 and self.trial.should_prune():
            message = f"pruned after fold {step}: its validation score {score:.4f} is below what the pruner asks at that fold"
            self.trial.set_user_attr(outputs.REASON_ATTR, message)
            raise optuna.TrialPruned(message)


class _Objective:
    """One trial: draw, train every fold, tune, and return the cross-fitted score."""

    def __init__(self, context: _Context) -> None:
        self.context = context

    def __call__(self, trial: optuna.Trial) -> float:
        folder = Path(self.context.request.out) / TRIALS_DIR / f"{trial.number:03d}"
        trial.set_user_attr(outputs.HOST_ATTR, platform.node())
        trial.set_user_attr(outputs.FOLDER_ATTR, str(folder.resolve()))
        try:
            return self._score(trial, folder)
        except optuna.TrialPruned:
            raise
        except BaseException as error:
            trial.set_user_attr(outputs.REASON_ATTR, _failure(error))
            raise
        finally:
            if not self.context.request.keep_checkpoints:
                _delete_checkpoints(folder)

    def _score(self, trial: optuna.Trial, folder: Path) -> float:
        context = self.context
        values = context.space.suggest(trial)
        config = trial_config(context.request, values)
        trial.set_user_attr(outputs.CONFIG_ATTR, config.model_dump(mode="json"))
        reporter = FoldReporter(trial, context.folds)
        try:
            trained = train_run(
                TrainRequest(context.request.data, folder, _run_config(config, context.exclude), folds=context.folds),
                force=True,
                on_message=_silent,
                extra_callbacks=[reporter],
            )
        except _out_of_memory() as error:
            raise MedsegError(f"out of memory ({first_line(error)}); a smaller input, encoder or batch fits") from None
        tuning = tune_run(TuneRequest(folder), force=True, on_message=_silent, samples=trained.samples)
        trial.set_user_attr(outputs.TUNED_ATTR, tuning.score_after)
        if tuning.cross_fitted is None or not math.isfinite(tuning.cross_fitted):
            raise MedsegError(f"the cross-fitted score is {tuning.cross_fitted}: the folds gave no score to tune on")
        return float(tuning.cross_fitted)


def _out_of_memory() -> tuple[type[BaseException], ...]:
    import torch

    return (torch.cuda.OutOfMemoryError,)


def _failure(error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    if isinstance(error, MedsegError):
        return first_line(error, 400)
    return f"{type(error).__name__}: {first_line(error, 400)}"


def _delete_checkpoints(folder: Path) -> None:
    """Delete a trial's checkpoints and the held-out predictions they made (its metrics, split, config and tuning stay)."""
    for checkpoints in [*folder.glob(f"fold_*/{runs.CHECKPOINTS}"), folder / runs.KEPT_DIR]:
        shutil.rmtree(checkpoints, ignore_errors=True)


class _Progress:
    """After each trial: ``trials.csv`` and ``best.yaml`` written again, and one line with its value, the best so far and the ETA."""

    def __init__(self, request: SweepRequest, folds: int, on_message: Callable[[str], None]) -> None:
        self.request = request
        self.folds = folds
        self.on_message = on_message
        self.started = time.monotonic()
        self.done = 0

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.done += 1
        out = Path(self.request.out)
        outputs.write_trials(study, out / outputs.TRIALS_FILE)
        outputs.write_best(study, out / outputs.BEST_FILE, self.folds)
        self.on_message(self.line(study, trial))

    def line(self, study: optuna.Study, trial: FrozenTrial) -> str:
        """``trial 3/10 (#2): 0.6120 (best 0.6400, trial #1), 2.1 min, ETA 15 min``."""
        if trial.state == TrialState.COMPLETE:
            outcome = f"{trial.value:.4f}"
        elif trial.state == TrialState.PRUNED:
            outcome = outputs.reason(trial)
        else:
            outcome = f"failed: {outputs.reason(trial)}"
        best = outputs.best_trial(study)
        standing = f"best {best.value:.4f}, trial #{best.number}" if best else "no trial completed yet"
        took = outputs.minutes(trial) or 0.0
        return f"trial {self.done}/{self.request.trials} (#{trial.number}): {outcome} ({standing}), {took:.1f} min, ETA {self.eta()}"

    def eta(self) -> str:
        """The time the trials left take at this process's pace so far (no more than the timeout leaves)."""
        elapsed = time.monotonic() - self.started
        left = (self.request.trials - self.done) * elapsed / self.done
        if self.request.timeout_min is not None:
            left = min(left, max(0.0, self.request.timeout_min * 60 - elapsed))
        return "none: done" if left <= 0 else f"{left / 60:.1f} min" if left < 600 else f"{left / 60:.0f} min"


def _evaluate_outer(study: optuna.Study, context: _Context, identity: dict[str, Any], on_message: Callable[[str], None]) -> dict | None:
    """Train the best trial's configuration on every frame outside the outer fold and score it on the outer fold.

    Done once per best trial: ``outer.json`` of the same trial is kept.
    """
    best = outputs.best_trial(study)
    if best is None:
        return None
    folder = Path(context.request.out) / OUTER_DIR
    path = folder / OUTER_FILE
    if path.is_file():
        previous = runs.read_json(path)
        if isinstance(previous, dict) and previous.get("trial") == best.number:
            return previous
    ids = identity["outer_ids"]
    config = outputs.best_config(best, context.folds)
    where = f"outer fold {identity['outer_fold']} of {identity['outer_folds']}"
    on_message(f"{where}: training trial #{best.number}'s configuration on the frames outside it, then scoring its {len(ids)} frames")
    run = folder / "run"
    request = TrainRequest(context.request.data, run, _run_config(config, context.exclude), folds=context.folds)
    trained = train_run(request, force=True, on_message=_silent)
    tuning = tune_run(TuneRequest(run), force=True, on_message=_silent, samples=trained.samples)
    for last in run.glob(f"fold_*/{runs.CHECKPOINTS}/{runs.LAST}"):
        last.unlink()  # the run is finished: its best checkpoints predict, nothing resumes it
    rows, summary = _score_outer(run, context.request.data, ids)
    result = {
        "trial": best.number,
        "best_value": best.value,
        "outer_fold": identity["outer_fold"],
        "outer_folds": identity["outer_folds"],
        "frames": ids,
        "score": summary["score"],
        "summary": summary,
        "inner_cross_fitted": tuning.cross_fitted,
        "run": str(run.resolve()),
        "per_frame": rows,
    }
    runs.write_json(path, result)
    study.set_user_attr(
        OUTER_ATTR, {key: result[key] for key in ("trial", "best_value", "outer_fold", "outer_folds", "score")} | {"frames": len(ids)}
    )
    on_message(f"{where} ({len(ids)} frames no trial saw): {summary['score']:.4f}")
    return result


def _score_outer(run_folder: Path, data: Path, ids: list[str]) -> tuple[list[dict], dict]:
    """Per-frame rows and the summary of the outer fold's frames, each predicted by the run's fold ensemble with its
    tuned post-processing."""
    run = runs.open_run(run_folder)
    dataset = load_dataset(data, run.config.data)
    wanted = set(ids)
    held_out = exclusions.without(dataset, [record.id for record in dataset.train if record.id not in wanted])
    frames = held_out_frames(run, held_out, out_of_fold=False, tta=run.tuned_tta(), on_message=_silent)
    rows, counts = score_frames(frames, read_postprocess(run), classes=run.classes)
    return rows, scores_summary(rows, counts, run.classes)


def _write_outputs(study: optuna.Study, out: Path, folds: int, outer: dict | None, space: Space) -> list[Path]:
    from medseg.sweep.page import write_page

    written = [outputs.write_trials(study, out / outputs.TRIALS_FILE)]
    best = outputs.write_best(study, out / outputs.BEST_FILE, folds)
    written += [best] if best else []
    written.append(write_page(study, out / PAGE_FILE, outer, space))
    return written


@contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Optuna's log lines off (one line per trial replaces them, and a failed trial's log holds a traceback),
    and its warnings about experimental arguments."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(level)


def _silent(line: str) -> None:
    pass
