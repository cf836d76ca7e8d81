"""``medseg train``: one run folder from a data folder and a configuration.

Loads and checks the data set, makes (or, on ``--resume``, reads) the subject-grouped split, writes the
run's files (see :mod:`medseg.runs`) and trains each fold with :func:`medseg.learn.fit.fit_fold`, telling the
progress of the whole run (:mod:`medseg.learn.run_progress`). :func:`plan_run` (``--dry-run``) does the same
up to the split, writes nothing, and estimates the run's time from a few timed steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from lightning.pytorch.callbacks import Callback
from pydantic import ValidationError

from medseg import __version__, runs
from medseg.config import MAX_FOLDS, Config, read_run_config, save_config
from medseg.data import exclusions, splits
from medseg.data.datasets import Dataset, load_dataset, require_clean
from medseg.data.inspector import FrameFacts, structure_facts, summarize
from medseg.data.samples import Sample, frame_digest, load_samples
from medseg.devices import idle_gpus_note
from medseg.errors import UsageError
from medseg.learn.estimate import FoldFrames, TrainingPlan, cpu_warning, may_stop_early, tell_warning, time_steps
from medseg.learn.fit import check_trainer, fit_fold, is_ddp_child
from medseg.learn.launch import agree_with_rank_zero, launched_together, telling_ranks, wait_for_rank_zero
from medseg.learn.models import check_model_config
from medseg.learn.pseudo import ENSEMBLE, PseudoLabels, save_examples
from medseg.learn.run_progress import RunProgress
from medseg.runs import EncoderWeights, FoldResult

__all__ = ["TrainRequest", "TrainedRun", "plan_run", "train_run"]


@dataclass(frozen=True)
class TrainRequest:
    """What ``medseg train`` trains.

    Attributes:
        data: The data folder.
        out: The run folder.
        config: Configuration (ignored on ``resume``: the run's own ``config.yaml`` is used).
        folds: Train every fold of an N-fold split, each in ``RUN/fold_K``.
        fold: Train one run whose validation fold is K (default: ``config.split.fold``); when resuming, train only fold
            K of the run's plan (folds in parallel: one process a fold).
        plan_only: Write the run folder (plan, split, configuration) and train no fold: each is then trained by its own
            process, resuming with ``fold``.
        pseudo: Frames without labels and a teacher's sure masks of them, added to every fold's training frames (never
            to a validation fold), each fold with the masks of a teacher model that did not train on its validation
            frames (:meth:`~medseg.learn.pseudo.PseudoLabels.source`); ``None``: the labelled frames alone.
        pseudo_record: What ``run.json`` records of them (:class:`~medseg.runs.PseudoRecord` without the folds' part).
    """

    data: Path
    out: Path
    config: Config
    folds: int | None = None
    fold: int | None = None
    plan_only: bool = False
    pseudo: PseudoLabels | None = None
    pseudo_record: dict | None = None


@dataclass(frozen=True)
class TrainedRun:
    """What :func:`train_run` resolved and trained.

    Attributes:
        path: The run folder.
        config: The configuration the run trained with (as ``config.yaml`` holds it).
        plan: The run's plan (``run.json``).
        results: One result per fold trained or already finished.
        samples: The training frames and masks, decoded, by id: ``tune`` and ``report`` at the end of ``train``
            use them instead of reading the data again.
    """

    path: Path
    config: Config
    plan: runs.RunPlan
    results: list[FoldResult]
    samples: dict[str, Sample]

    @property
    def fold_dirs(self) -> list[runs.FoldDir]:
        """The folders of every fold of the plan (trained here, by another process, or not yet)."""
        return runs.fold_dirs(self.path, self.plan.folds, self.plan.several)


def train_run(
    request: TrainRequest,
    *,
    resume: bool = False,
    force: bool = False,
    show_progress: bool = False,
    on_message: Callable[[str], None] = print,
    extra_callbacks: list[Callback] | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> TrainedRun:
    """Train a run folder.

    Args:
        request: The data, the run folder, the configuration and the folds.
        resume: Continue the run in ``request.out`` from its last checkpoints.
        force: Replace an existing run folder.
        show_progress: Show progress bars.
        on_message: Receives one line per event worth telling the user, and the whole-run line of each epoch
            (:class:`~medseg.learn.run_progress.RunProgress`) when no bars are shown.
        extra_callbacks: More Lightning callbacks for every fold.
        on_warning: Receives the warning for a GPU-sized run on the CPU (:func:`~medseg.learn.estimate.cpu_warning`);
            ``None``: ``on_message``, as ``warning: ...``.

    Returns:
        The run as trained: its configuration, plan, fold results and decoded frames.

    Raises:
        UsageError: If the arguments do not fit the run folder.
        DataError: If the data set has problems.
    """
    run, data = Path(request.out), request.data
    if request.plan_only and resume:
        raise UsageError("--plan-only writes a new run folder; drop --resume (train its folds with --resume --fold K)")
    child, launch = is_ddp_child(), launched_together()
    if child:  # another rank: only global rank 0 checks and writes the run folder (torchrun and srun: wait for it)
        wait_for_rank_zero(launch)
        config, plan, samples, split = _prepare_resumed(data, run)
    else:
        with telling_ranks(launch):
            config, plan, samples, split = _prepare_run_folder(request, resume, force, on_message, on_warning)
    chosen = _folds_to_train(request, resume, plan, run)
    extra = _pseudo_samples(request.pseudo, plan, run)
    results = _train_folds(run, config, plan, samples, split, chosen, show_progress, on_message, extra_callbacks, child, extra)
    return TrainedRun(run, config, plan, results, samples)


def _pseudo_samples(pseudo: PseudoLabels | None, plan: runs.RunPlan, run: Path) -> dict[int, dict[str, Sample]]:
    """Each fold's pseudo-labelled training frames, as the plan recorded their source (none for a run without them).

    Raises:
        UsageError: If the run trained on pseudo-labels and none (or others) are given, or the reverse.
    """
    if plan.pseudo is None and pseudo is None:
        return {}
    if plan.pseudo is None:
        raise UsageError(f"{run}: the run was not started with --unlabeled; it cannot learn from pseudo-labels when resumed")
    if pseudo is None:
        raise UsageError(f"{run}: the run trains on pseudo-labels of {plan.pseudo.frames}; resume it with `medseg train --resume`")
    if pseudo.ids != plan.pseudo.ids or [frame_digest(frame) for frame in pseudo.frames] != plan.pseudo.digests:
        raise UsageError(f"{run}: the frames of {plan.pseudo.frames} changed since the run started; start it again with --force")
    return {fold: pseudo.samples(source) for fold, source in plan.pseudo.sources.items()}


def _folds_to_train(request: TrainRequest, resume: bool, plan: runs.RunPlan, run: Path) -> list[int]:
    """The folds of the plan this process trains: none with ``plan_only``, fold K when resuming with ``fold`` K, else all.

    Raises:
        UsageError: If the fold to resume is not in the plan.
    """
    if request.plan_only:
        return []
    if not resume or request.fold is None:
        return list(plan.folds)
    if request.fold not in plan.folds:
        raise UsageError(
            f"{run}: fold {request.fold} is not in the run's plan (folds {', '.join(map(str, plan.folds))}); choose one of them"
        )
    return [request.fold]


def _prepare_run_folder(
    request: TrainRequest, resume: bool, force: bool, on_message: Callable[[str], None], on_warning: Callable[[str], None] | None
) -> tuple[Config, runs.RunPlan, dict[str, Sample], splits.Split]:
    """On global rank 0: check the run folder, then read it (``resume``) or write a new one, and what it trains."""
    run, data = Path(request.out), request.data
    runs.check_run_folder(run, force=force, resume=resume)
    if resume:
        return _prepare_resumed(data, run)
    fresh = _prepare(data, request.config, request.folds, request.fold, on_message)
    if request.pseudo is not None:
        fresh = _with_pseudo(fresh, request.pseudo, request.pseudo_record or {}, on_message)
    tell_warning(cpu_warning(fresh.config, len(fresh.plan.folds)), on_warning, on_message)
    _tell_idle_gpus(fresh.config, on_message)
    runs.replace_run_folder(run, force=force)  # only now, with the data loaded and split, is an earlier run replaced
    _write_run_files(run, fresh)
    if request.pseudo is not None and fresh.plan.pseudo is not None:
        save_examples(run / runs.PSEUDO_EXAMPLES_FILE, request.pseudo, fresh.plan.pseudo.sources[fresh.plan.folds[0]])
    _save_split(run, fresh.split, fresh.dataset, fresh.empty)
    return fresh.config, fresh.plan, fresh.samples, fresh.split


def plan_run(
    request: TrainRequest,
    *,
    force: bool = False,
    on_message: Callable[[str], None] = print,
    on_warning: Callable[[str], None] | None = None,
    steps: int = 2,
) -> TrainingPlan:
    """What :func:`train_run` with the same request would train, with a time estimate; writes nothing.

    The data are loaded and checked and split as a run does; ``steps`` training steps on real batches of
    the first fold, on the run's device, time the estimate (:func:`~medseg.learn.estimate.time_steps`).

    Args:
        request: As :func:`train_run`; its run folder is checked, not created.
        force: As :func:`train_run`: whether an existing run folder could be replaced.
        on_message: Receives one line per event worth telling the user.
        on_warning: Receives the warning for a GPU-sized run on the CPU, with the estimate; ``None``: ``on_message``.
        steps: Training steps to time.

    Raises:
        UsageError: If the arguments do not fit the run folder.
        DataError: If the data set has problems.
    """
    runs.check_run_folder(Path(request.out), force=force, resume=False)
    fresh = _prepare(request.data, request.config, request.folds, request.fold, on_message)
    frames = [FoldFrames(k, *(len(ids) for ids in fresh.split.train_val(k))) for k in fresh.plan.folds]
    train_ids, val_ids = fresh.split.train_val(fresh.plan.folds[0])
    on_message(f"timing {steps} training step(s) of fold {fresh.plan.folds[0]} for the estimate")
    times = time_steps(fresh.config, [fresh.samples[i] for i in train_ids], [fresh.samples[i] for i in val_ids], steps)
    result = TrainingPlan(fresh.plan.n_folds, frames, fresh.config, times)
    tell_warning(cpu_warning(fresh.config, len(frames), result.run_seconds), on_warning, on_message)
    _tell_idle_gpus(fresh.config, on_message)
    return result


def _tell_idle_gpus(config: Config, on_message: Callable[[str], None]) -> None:
    """Tell (as a ``note:`` line) that the machine has CUDA devices the run leaves idle (:func:`idle_gpus_note`)."""
    note = idle_gpus_note(config)
    if note is not None:
        on_message(f"note: {note}")


@dataclass(frozen=True)
class _Fresh:
    """A new run, checked and split, before anything is written."""

    config: Config
    plan: runs.RunPlan
    dataset: Dataset
    samples: dict[str, Sample]
    facts: list[FrameFacts]
    empty: dict[str, bool]
    split: splits.Split


def _with_pseudo(fresh: _Fresh, pseudo: PseudoLabels, record: dict, on_message: Callable[[str], None]) -> _Fresh:
    """The new run's plan with its pseudo-labels: which teacher model's masks each fold learns from, and how many.

    Raises:
        UsageError: If a frame without label is one of the labelled frames, or a fold has no teacher model that left
            its validation frames out (:meth:`~medseg.learn.pseudo.PseudoLabels.source`).
    """
    digests = {sample_id: frame_digest(frame) for sample_id, (frame, _) in fresh.samples.items()}  # each frame digested once
    labelled = {digest: sample_id for sample_id, digest in digests.items()}
    unlabeled = [(sample_id, frame_digest(frame)) for sample_id, frame in zip(pseudo.ids, pseudo.frames, strict=True)]
    twice = [(sample_id, labelled[digest]) for sample_id, digest in unlabeled if digest in labelled]
    if twice:
        raise UsageError(
            f"{len(twice)} frame(s) to pseudo-label are labelled frames of the data set (first: {twice[0][0]} is {twice[0][1]}); "
            "leave the labelled frames out of --unlabeled"
        )
    every = set(labelled)
    sources = {k: pseudo.source({digests[i] for i in fresh.split.train_val(k)[1]}, every, k) for k in fresh.plan.folds}
    kept = {k: pseudo.kept(source) for k, source in sources.items()}
    for k, source in sources.items():
        who = "the teacher's fold ensemble" if source == ENSEMBLE else f"the teacher's fold {source} model (it left out this fold's frames)"
        on_message(f"fold {k}: {kept[k]} pseudo-labelled frames from {who}, for training only")
    plan = fresh.plan.model_copy(update={"pseudo": runs.PseudoRecord(**record, sources=sources, kept=kept)})
    return dataclasses.replace(fresh, plan=plan)


def _prepare(data: Path, config: Config, folds: int | None, fold: int | None, on_message: Callable[[str], None]) -> _Fresh:
    """Check the settings, load and check the data of a new run, resolve its configuration and plan, and split it;
    writes nothing. The cheap checks (folds, model, trainer) come before the data are read."""
    plan = _plan(data, config, folds, fold)
    config = config.model_copy(update={"split": config.split.model_copy(update={"n_folds": plan.n_folds})})
    check_model_config(config.model)
    check_trainer(config)
    dataset = require_clean(load_dataset(data, config.data))
    config = config.model_copy(update={"data": dataset.options})  # the RLE dialect the data was read in, told from its table when not named
    excluded = _exclusions(config, dataset, on_message)
    dataset = exclusions.without(dataset, excluded)
    structures = max(1, len(dataset.classes))
    config = _with_structures(config, structures)
    _check_structures(config, structures)
    samples = load_samples(dataset.train, config.data)
    facts = _frame_facts(dataset, samples)
    empty = {item.record.id: item.area == 0 for item in facts}
    split = _new_split(dataset, facts, config, len(excluded))
    counted = {"train_non_empty": sum(not value for value in empty.values()), "excluded": excluded}
    plan = _checked_plan(plan.model_copy(update={**counted, **_structure_plan(dataset, facts)}), data)
    return _Fresh(config, plan, dataset, samples, facts, empty, split)


def _checked_plan(plan: runs.RunPlan, data: Path) -> runs.RunPlan:
    """The plan, validated as ``run.json`` will be read back (``model_copy`` does not validate), before it is written.

    Raises:
        UsageError: If it would not read back (e.g. a structure name that cannot become a file name).
    """
    try:
        return runs.RunPlan.model_validate(plan.model_dump())
    except ValidationError as error:
        raise UsageError(f"{data}: the run could not be read back ({runs.validation_errors(error)}); fix the data or the options") from None


def _prepare_resumed(data: Path, run: Path) -> tuple[Config, runs.RunPlan, dict[str, Sample], splits.Split]:
    """The configuration, plan, frames and split of a run being resumed (or of a DDP worker's run)."""
    config, plan = read_run_config(run / runs.CONFIG_FILE), runs.RunPlan.read(run / runs.RUN_FILE)
    _check_same_data(data, plan, run)
    check_trainer(config)
    dataset = exclusions.without(require_clean(load_dataset(data, config.data)), plan.excluded)
    _check_structures(config, max(1, len(dataset.classes)))
    samples = load_samples(dataset.train, config.data)
    split = splits.load_split(run / runs.SPLIT_FILE, expected_ids=[record.id for record in dataset.train])
    return config, plan, samples, split


def _exclusions(config: Config, dataset: Dataset, on_message: Callable[[str], None]) -> dict[str, str]:
    """The frames ``data.exclude`` names (none without it), checked against the data set.

    Raises:
        UsageError: If the file is missing.
        DataError: If it is malformed or names frames the data set does not have.
    """
    excluded = exclusions.read_for(config.data.exclude, dataset)
    if excluded:
        on_message(f"{len(excluded)} frame(s) listed in {config.data.exclude} left out of training, validation and tuning")
    return excluded


def _with_structures(config: Config, structures: int) -> Config:
    """The configuration with one output channel per structure of the data (``model.structures``)."""
    if config.model.structures not in (1, structures):
        return config  # _check_structures names the contradiction
    return config.model_copy(update={"model": config.model.model_copy(update={"structures": structures})})


def _frame_facts(dataset: Dataset, samples: dict[str, Sample]) -> list[FrameFacts]:
    """Each training frame's size and mask area (and, with several structures, each one's area and their overlaps)."""
    facts = []
    for record in dataset.train:
        image, mask = samples[record.id]
        if dataset.classes:
            facts.append(structure_facts(FrameFacts(record, size=image.shape), list(dataset.classes), mask.astype(bool)))
        else:
            facts.append(FrameFacts(record, size=image.shape, area=int(np.count_nonzero(mask))))
    return facts


def _structure_plan(dataset: Dataset, facts: list[FrameFacts]) -> dict:
    if not dataset.classes:
        return {}
    with_it = {name: sum(1 for item in facts if item.class_areas[name]) for name in dataset.classes}
    named = dataset.options.classes if dataset.layout == "rle-csv" and dataset.options.classes else {}
    labels = {name: str(named.get(name, name)) for name in dataset.classes}
    plan = {"classes": list(dataset.classes), "class_non_empty": with_it, "class_labels": labels}
    return plan | {"class_values": _class_index_values(dataset)}


def _class_index_values(dataset: Dataset) -> dict[str, int]:
    """The mask value of each structure when the masks are class-index files (the structures exclusive), else none."""
    class_index = dataset.layout == "folders" and not any(record.class_masks for record in dataset.train)
    return {name: int(value) for name, value in dataset.options.classes.items()} if class_index and dataset.options.classes else {}


def _plan(data: Path, config: Config, folds: int | None, fold: int | None) -> runs.RunPlan:
    if folds is not None and fold is not None:
        raise UsageError("--folds and --fold exclude each other: --folds N trains every fold, --fold K one")
    if folds is not None:
        if not 2 <= folds <= MAX_FOLDS:
            raise UsageError(f"--folds {folds}: use 2 to {MAX_FOLDS} folds, or --fold K for one run")
        return _new_plan(data, folds, list(range(folds)), several=True)
    if fold is None and config.split.fold is None:
        n_folds = config.split.n_folds
        return _new_plan(data, n_folds, list(range(n_folds)), several=True)
    chosen = config.split.fold if fold is None else fold
    if not 0 <= chosen < config.split.n_folds:
        option = "split.fold" if fold is None else "--fold"
        raise UsageError(f"{option} {chosen}: choose a fold from 0 to {config.split.n_folds - 1} (split.n_folds={config.split.n_folds})")
    return _new_plan(data, config.split.n_folds, [chosen], several=False)


def _check_structures(config: Config, structures: int) -> None:
    """The model's output channels and the loss's class weights must fit the data's structures.

    Raises:
        UsageError: Naming the key to drop or fix.
    """
    if config.model.structures != structures:
        raise UsageError(
            f"model.structures={config.model.structures} but the data has {structures} structure(s); "
            "the data sets it: drop --set model.structures"
        )
    weights = config.loss.class_weights
    if weights is not None and len(weights) != structures:
        raise UsageError(f"loss.class_weights has {len(weights)} weight(s) for {structures} structure(s); give one per structure")


def _new_plan(data: Path, n_folds: int, folds: list[int], several: bool) -> runs.RunPlan:
    return runs.RunPlan(data=str(Path(data).resolve()), n_folds=n_folds, folds=folds, several=several, medseg=__version__)


def _check_same_data(data: Path, plan: runs.RunPlan, run: Path) -> None:
    if str(Path(data).resolve()) != plan.data:
        raise UsageError(f"{run} was trained on {plan.data}, not {Path(data).resolve()}; resume it with the same DATA")


def _new_split(dataset: Dataset, facts: list[FrameFacts], config: Config, excluded: int = 0) -> splits.Split:
    """The subject-grouped split, balanced for empty frames (with several structures: each one's emptiness pattern).

    Frames left out (``excluded`` of them) are not in ``facts``: they are in no fold.
    """
    ids = [item.record.id for item in facts]
    subjects = [item.record.subject for item in facts]
    if dataset.classes:
        flags = [[item.class_areas[name] == 0 for name in dataset.classes] for item in facts]
    else:
        flags = [item.area == 0 for item in facts]
    try:
        return splits.grouped_kfold(ids, subjects, flags, n_folds=config.split.n_folds, seed=config.split.seed)
    except splits.SplitError as error:
        if not excluded:
            raise
        raise splits.SplitError(f"{error} (after leaving out the {excluded} frame(s) of {config.data.exclude})") from None


def _save_split(run: Path, split: splits.Split, dataset: Dataset, empty: dict[str, bool]) -> None:
    info = {
        "subjects": {record.id: record.subject for record in dataset.train},
        "empty_per_fold": [sum(empty[i] for i in fold) for fold in split.folds],
    }
    splits.save_split(split, run / runs.SPLIT_FILE, extra=info)


def _write_run_files(run: Path, fresh: _Fresh) -> None:
    """The run's files before its first fold: the plan first (``run.json`` marks the folder as medseg's, so that
    ``--force`` may replace even a run killed at its start), data summary, frame digests, configuration, versions."""
    fresh.plan.write(run / runs.RUN_FILE)
    runs.write_json(run / runs.DATA_SUMMARY_FILE, summarize(fresh.dataset, fresh.facts))
    digests = {sample_id: frame_digest(frame) for sample_id, (frame, _) in fresh.samples.items()}
    runs.TrainedFrames(digests=digests).write(run / runs.FRAMES_FILE)
    save_config(fresh.config, run / runs.CONFIG_FILE)
    runs.versions().write(run / runs.VERSIONS_FILE)


def _record_weights(run: Path, weights: EncoderWeights) -> None:
    path = run / runs.VERSIONS_FILE
    recorded = runs.Versions.read(path) if path.is_file() else runs.versions()
    recorded.model_copy(update={"encoder_weights": weights}).write(path)


_TRAIN, _SKIP = "train", "skip"  # rank 0's decisions on a fold; anything else is why it refuses the fold


def _claim(fold_dir: runs.FoldDir, held: contextlib.ExitStack) -> str:
    """On rank 0: whether to train a fold (its lock then held until ``held`` closes), skip it (trained already), or
    why not (another process trains it). ``done.json`` is read again once the lock is held: another process may have
    finished the fold in between."""
    if fold_dir.done:
        return _SKIP
    try:
        held.enter_context(runs.training_lock(fold_dir))
    except UsageError as error:
        return str(error)
    return _SKIP if fold_dir.done else _TRAIN


def _train_folds(
    run: Path,
    config: Config,
    plan: runs.RunPlan,
    samples: dict[str, Sample],
    split: splits.Split,
    chosen: list[int],
    show_progress: bool,
    on_message: Callable[[str], None],
    extra_callbacks: list[Callback] | None,
    child: bool,
    pseudo: dict[int, dict[str, Sample]],
) -> list[FoldResult]:
    """Train the ``chosen`` folds of the plan in turn, each under its training lock (on rank 0), skipping finished ones.

    Raises:
        UsageError: If another process trains a chosen fold.
    """
    results = []
    tracker = RunProgress(len(chosen), config.trainer.max_epochs, may_stop_early(config.trainer), on_message)
    try:
        for position, fold_dir in enumerate(runs.fold_dirs(run, chosen, plan.several)):
            with contextlib.ExitStack() as held:
                decision = agree_with_rank_zero(_claim(fold_dir, held) if not child else None, local=_TRAIN if not fold_dir.done else _SKIP)
                if decision == _SKIP:
                    results.append(fold_dir.result())
                    on_message(f"fold {fold_dir.fold}: already trained ({fold_dir.done_file}), skipped")
                    continue
                if decision != _TRAIN:
                    raise UsageError(decision)
                train_ids, val_ids = split.train_val(fold_dir.fold)
                extra = pseudo.get(fold_dir.fold, {})  # training frames only: never in val_ids
                more = f" (+{len(extra)} pseudo-labelled)" if pseudo else ""
                on_message(f"fold {fold_dir.fold}: {len(train_ids)}{more} training and {len(val_ids)} validation frames -> {fold_dir.path}")
                tracker.begin_fold(fold_dir.fold, position)
                callbacks = [tracker, *(extra_callbacks or [])]
                fold_samples = {**samples, **extra}
                result, weights = fit_fold(config, fold_dir, fold_samples, [*train_ids, *extra], val_ids, show_progress, callbacks)
            if weights is not None and not child:
                _record_weights(run, weights)
            results.append(result)
            on_message(
                f"fold {result.fold}: {result.epochs} epochs{' (stopped early)' if result.stopped_early else ''}, "
                f"best validation loss {result.best_val_loss:.4f}, score {result.best_val_score:.4f}"
            )
    finally:
        tracker.close()
    return results
