"""The commands of the training stage: ``train`` (a run folder) and ``sweep`` (an Optuna study of configurations)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medseg.cli.options import DataArgument, DataFlags, NoReportOption, with_data_flags
from medseg.cli.printers import print_plan, print_sweep, print_trained, print_tuning, print_untrained, say, warn
from medseg.cli.report_commands import write_report
from medseg.config import PRESETS
from medseg.errors import MedsegError, UsageError


@with_data_flags
def train_command(
    data: DataArgument,
    out: Annotated[
        Path, typer.Option("--out", help="Run folder to create (checkpoints, metrics, config, split).", metavar="RUN", show_default=False)
    ],
    preset: Annotated[
        str,
        typer.Option(
            "--preset",
            help=f"Starting configuration: {', '.join(PRESETS)} "
            "(cpu: small input and encoder; kaggle: every fold of a 5-fold split, tuned out-of-fold).",
            metavar="NAME",
        ),
    ] = "default",
    config_file: Annotated[Path | None, typer.Option("--config", help="YAML file with configuration keys.", metavar="FILE")] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a key, e.g. --set trainer.max_epochs=2 (repeatable).", metavar="KEY=VALUE"),
    ] = None,
    folds: Annotated[int | None, typer.Option("--folds", help="Train every fold of an N-fold split, in RUN/fold_K.")] = None,
    fold: Annotated[
        int | None,
        typer.Option("--fold", help="Train one run validated on fold K (default: split.fold); with --resume, train fold K of RUN only."),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue a killed run from its last checkpoints.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing run folder.")] = False,
    devices: Annotated[str | None, typer.Option("--devices", help="Devices per machine for Lightning (e.g. 2, or auto).")] = None,
    num_nodes: Annotated[int | None, typer.Option("--num-nodes", help="Machines for Lightning's DDP.")] = None,
    strategy: Annotated[str | None, typer.Option("--strategy", help="Lightning strategy, e.g. ddp.")] = None,
    *,
    data_flags: DataFlags,
    exclude: Annotated[
        Path | None,
        typer.Option(
            "--exclude",
            help="Leave the frames of an exclusions file (id,reason; see inspect --write-exclusions) out of training, "
            "validation and tuning (data.exclude).",
            metavar="FILE",
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars or messages.")] = False,
    no_report: NoReportOption = False,
    plan_only: Annotated[
        bool,
        typer.Option(
            "--plan-only",
            help="Write the run folder (plan, split, configuration) and train nothing: then train each fold in its own process "
            "with --resume --fold K (a scheduler's array job, one GPU each) and tune RUN once all are done.",
        ),
    ] = False,
    unlabeled: Annotated[
        Path | None,
        typer.Option(
            "--unlabeled",
            help="Folder of frames without labels (e.g. test/): the --teacher run's sure masks of them join every fold's "
            "training frames, never a validation fold.",
            metavar="FRAMES",
        ),
    ] = None,
    teacher: Annotated[
        Path | None,
        typer.Option("--teacher", help="Run whose fold models pseudo-label --unlabeled (same structures and input size).", metavar="RUN"),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Load and check the data, print the plan (folds, frames, input, epochs, device, precision, augmentation) "
            "and a time estimate from a few timed training steps; write nothing.",
        ),
    ] = False,
) -> int:
    """Train a U-Net on DATA into the run folder --out (subject-grouped split, best checkpoint kept)."""
    from medseg.config import load_config
    from medseg.learn.fit import is_ddp_child, show_progress_default
    from medseg.learn.train import TrainRequest, plan_run, train_run

    shortcuts = {
        **data_flags.overrides(),
        "data.exclude": None if exclude is None else str(exclude),
        "trainer.devices": devices,
        "trainer.num_nodes": num_nodes,
        "trainer.strategy": strategy,
    }
    values = {key: value for key, value in shortcuts.items() if value is not None}
    if resume and (config_file or overrides or preset != "default" or values or unlabeled or teacher):
        raise UsageError(
            "--resume continues with RUN/config.yaml (and its pseudo-labels); drop --preset, --config, --set, --unlabeled, "
            "--teacher and the data and device options"
        )
    if (unlabeled is None) != (teacher is None):
        raise UsageError("--unlabeled FRAMES and --teacher RUN go together: the teacher run pseudo-labels the frames")
    config = load_config(preset, config_file, overrides, values)
    pseudo, record = _pseudo_labels(out, config, unlabeled, teacher, resume, dry_run, say(quiet))
    request = TrainRequest(data, out, config, folds, fold, plan_only, pseudo, record)
    if dry_run:
        if resume or plan_only:
            raise UsageError("--dry-run plans a new run and writes nothing; drop --resume and --plan-only")
        print_plan(plan_run(request, force=force, on_message=say(quiet), on_warning=warn), out)
        return 0
    trained = train_run(
        request,
        resume=resume,
        force=force,
        show_progress=not quiet and show_progress_default(),
        on_message=say(quiet),
        on_warning=warn,
    )
    if is_ddp_child():
        return 0
    print_trained(trained)
    untrained = [fold_dir.fold for fold_dir in trained.fold_dirs if not fold_dir.done]
    if untrained or (resume and fold is not None and len(trained.plan.folds) > 1):
        print_untrained(trained, untrained, data)  # one fold of several: the user tunes once all are done, not each process
        return 0
    if trained.config.trainer.tune_after:
        from medseg.infer.tune import TuneRequest, tune_run

        print_tuning(tune_run(TuneRequest(out), force=True, on_message=say(quiet), samples=trained.samples), out)
    write_report(out, no_report, quiet, samples=trained.samples)
    return 0


@with_data_flags
def sweep_command(
    data: DataArgument,
    out: Annotated[
        Path,
        typer.Option("--out", help="Study folder (trials, trials.csv, best.yaml, study.html; study.db by default).", metavar="STUDY"),
    ],
    preset: Annotated[
        str, typer.Option("--preset", help=f"Starting configuration of every trial: {', '.join(PRESETS)}.", metavar="NAME")
    ] = "default",
    config_file: Annotated[
        Path | None, typer.Option("--config", help="YAML file of configuration keys for every trial.", metavar="FILE")
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Fix a key for every trial, e.g. --set trainer.batch_size=16 (repeatable).", metavar="KEY=VALUE"),
    ] = None,
    trials: Annotated[int, typer.Option("--trials", help="Trials this process adds to the study.")] = 20,
    timeout: Annotated[float | None, typer.Option("--timeout", help="Start no trial after MIN minutes.", metavar="MIN")] = None,
    space: Annotated[
        Path | None,
        typer.Option(
            "--space", help="Search space: YAML of key: {low, high, log, step} or {choices: [...]} (default: README).", metavar="FILE"
        ),
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(
            "--storage",
            help="Optuna storage URL shared by several sweeps, e.g. postgresql://user:pw@host/db (default: STUDY/study.db).",
            metavar="URL",
        ),
    ] = None,
    study_name: Annotated[str, typer.Option("--study-name", help="The study's name in the storage.", metavar="NAME")] = "medseg",
    folds: Annotated[
        int | None, typer.Option("--folds", help="Folds of each trial's subject-grouped split (default: split.n_folds).")
    ] = None,
    outer_fold: Annotated[
        int | None,
        typer.Option(
            "--outer-fold",
            help="Keep fold K of an outer split out of every trial; score the best configuration on it at the end.",
            metavar="K",
        ),
    ] = None,
    outer_folds: Annotated[int, typer.Option("--outer-folds", help="Folds of the outer split (with --outer-fold).")] = 5,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the sampler (default: a fresh one per process).")] = None,
    keep_checkpoints: Annotated[
        bool, typer.Option("--keep-checkpoints", help="Keep each trial's checkpoints (deleted once scored).")
    ] = False,
    *,
    data_flags: DataFlags,
    quiet: Annotated[bool, typer.Option("--quiet", help="No line per trial.")] = False,
) -> int:
    """Search the configuration with Optuna: each trial trains every fold and scores its cross-fitted out-of-fold score."""
    from medseg.sweep.study import SweepRequest, run_sweep

    request = SweepRequest(
        data, out, preset, config_file, overrides or [], data_flags.overrides(), space, trials, timeout,
        storage, study_name, folds, outer_fold, outer_folds, seed, keep_checkpoints,
    )  # fmt: skip
    result = run_sweep(request, on_message=say(quiet), on_warning=warn)
    print_sweep(result)
    if result.best is None:
        raise MedsegError("no trial of the study completed; trials.csv and study.html give each one's reason")
    return 0


def _pseudo_labels(out: Path, config, unlabeled: Path | None, teacher: Path | None, resume: bool, dry_run: bool, on_message):
    """The teacher's pseudo-labels of ``--unlabeled`` (or, resuming, of the run's recorded frames), and their record."""
    from medseg.infer.pseudo import PseudoRequest, pseudo_label, resumed_pseudo

    if resume:
        return resumed_pseudo(out, on_message)
    if unlabeled is None or dry_run:
        return None, None
    return pseudo_label(PseudoRequest(teacher, unlabeled), config, on_message)
