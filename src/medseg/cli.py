"""The ``medseg`` command line: thin commands that call the stages.

Exit codes: 0 success, 1 problems found or a data error, 2 a usage error. A user mistake is one line on
stderr, never a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from medseg import __version__, progress
from medseg.config import LAYOUTS, PRESETS, DataOptions, read_run_config
from medseg.data.datasets import load_dataset
from medseg.data.inspector import Inspection, inspect_dataset
from medseg.errors import MedsegError, UsageError
from medseg.files import Output, check_outputs, printable
from medseg.runs import CONFIG_FILE, POSTPROCESS_FILE, StructuresTuning, Tuning, installation_versions

EXIT_PROBLEMS = 1
EXIT_USAGE = 2

# The exceptions typer raises for command-line mistakes come from its own copy of click (typer >= 0.29
# vendors it as ``typer._click``) or from the click package (older typer): resolve them from typer itself.
_CLICK = sys.modules[typer.BadParameter.__module__]
ClickException = _CLICK.ClickException
NoArgsIsHelp = getattr(_CLICK, "NoArgsIsHelpError", None)

app = typer.Typer(
    name="medseg",
    help="Train U-Nets on grayscale medical images with Kaggle-style RLE masks; inspect, predict, check.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
stdout = Console(highlight=False, soft_wrap=True)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)

LayoutOption = Annotated[str | None, typer.Option("--layout", help=f"Data layout: {', '.join(LAYOUTS)}; detected when left out.")]
MaskValueOption = Annotated[
    int | None, typer.Option("--mask-value", help="Foreground class of class-index masks (e.g. 1 for the nerve in usgra-seg).")
]
MaskThresholdOption = Annotated[int | None, typer.Option("--mask-threshold", help="Binarise anti-aliased masks as mask > T (e.g. 127).")]
SubjectPatternOption = Annotated[
    str | None,
    typer.Option(
        "--subject-pattern", help="Regex whose group 'subject' (or first group) is the subject in an image name (folders, rle-csv)."
    ),
]
RleOrderOption = Annotated[
    str | None, typer.Option("--rle-order", help="RLE pixel numbering: F (Kaggle, column-major; the default) or C (row-major).")
]
RleFormatOption = Annotated[
    str | None,
    typer.Option(
        "--rle-format",
        help="RLE dialect: kaggle (absolute 1-based starts, column-major), row-major (UW-Madison; = --rle-order C) or siim "
        "(relative offsets, -1 for empty, rows of one frame OR-ed); told from the RLE table when left out.",
        metavar="NAME",
    ),
]
CsvOption = Annotated[str | None, typer.Option("--csv", help="RLE table of the rle-csv layout, relative to DATA.")]
IdColumnOption = Annotated[str | None, typer.Option("--id-column", help="Id column of the RLE table.")]
RleColumnOption = Annotated[str | None, typer.Option("--rle-column", help="RLE column of the RLE table.")]
ClassColumnOption = Annotated[
    str | None, typer.Option("--class-column", help="Class column of a long RLE table (one row per frame and class).")
]
ClassesOption = Annotated[
    str | None,
    typer.Option(
        "--classes",
        help="Several structures: NAME=LABEL,... (class-index mask values, e.g. nerve=1,vessel=2; masks/<LABEL>/ folders; "
        "a long table's class labels), or the labels alone; left out: one structure, or every class found.",
        metavar="NAME=LABEL,...",
    ),
]
MaxPixelsOption = Annotated[
    int | None,
    typer.Option(
        "--max-pixels",
        help="Most pixels a frame or mask may declare in its header (data.max_pixels; default 100,000,000): a larger one is "
        "refused before it is decoded.",
        metavar="N",
    ),
]
TtaOption = Annotated[bool, typer.Option("--tta/--no-tta", help="Average with the horizontally flipped frame.")]
VflipOption = Annotated[bool, typer.Option("--vflip", help="Also average with the vertically flipped frame (with --tta).")]
QuietOption = Annotated[bool, typer.Option("--quiet", help="No progress messages.")]
NoReportOption = Annotated[bool, typer.Option("--no-report", help="Do not write RUN/report.html at the end.")]
RunArgument = Annotated[Path, typer.Argument(help="Run folder written by medseg train.", metavar="RUN", show_default=False)]


def data_flags(
    layout: str | None,
    mask_value: int | None,
    mask_threshold: int | None,
    subject_pattern: str | None,
    rle_order: str | None,
    csv: str | None,
    id_column: str | None,
    rle_column: str | None,
    class_column: str | None = None,
    classes: str | None = None,
    rle_format: str | None = None,
    max_pixels: int | None = None,
) -> dict[str, Any]:
    """The data flags a command was given, by :class:`~medseg.config.DataOptions` field, checked.

    Flags left out are not in the result, so that they do not replace a configuration's or a run's values.

    Raises:
        UsageError: If a value cannot work; the message names the flag.
    """
    given = {key: value for key, value in locals().items() if value is not None}
    if given.get("rle_format") == "row-major" and given.get("rle_order") == "F":
        raise UsageError("--rle-format row-major numbers pixels row-major but --rle-order F column-major; drop --rle-order")
    data_options(given)
    return given


def data_options(flags: dict[str, Any]) -> DataOptions:
    """The data options of a command's flags (defaults for the ones left out).

    Raises:
        UsageError: If a value cannot work; the message names the flag.
    """
    try:
        return DataOptions.model_validate(flags)
    except ValidationError as error:
        problems = [f"{_flag(item['loc'])}{item['msg'].removeprefix('Value error, ')}" for item in error.errors()]
        raise UsageError("; ".join(problems)) from None


def _flag(location: tuple) -> str:
    return f"--{str(location[0]).replace('_', '-')}: " if location else ""


@app.callback(invoke_without_command=True)
def root(
    context: typer.Context,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="With --version: also Python, the platform and every dependency's version.")
    ] = False,
) -> None:
    """Segment structures in grayscale medical images whose masks come as Kaggle-style RLE."""
    if version:
        stdout.print(f"medseg {__version__}")
        if verbose:
            for name, installed in installation_versions().items():
                stdout.print(f"  {name} {installed}")
        raise typer.Exit()
    if verbose:
        raise UsageError("--verbose goes with --version: medseg --version --verbose")
    if context.invoked_subcommand is None:
        stdout.print(context.get_help())
        raise typer.Exit(EXIT_USAGE)


@app.command("inspect")
def inspect_command(
    data: Annotated[Path, typer.Argument(help="Data folder (kaggle, folders or rle-csv layout).", metavar="DATA", show_default=False)],
    layout: LayoutOption = None,
    mask_value: MaskValueOption = None,
    mask_threshold: MaskThresholdOption = None,
    subject_pattern: SubjectPatternOption = None,
    rle_order: RleOrderOption = None,
    rle_format: RleFormatOption = None,
    max_pixels: MaxPixelsOption = None,
    csv: CsvOption = None,
    id_column: IdColumnOption = None,
    rle_column: RleColumnOption = None,
    class_column: ClassColumnOption = None,
    classes: ClassesOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary and problems as JSON.")] = False,
    write_exclusions: Annotated[
        Path | None,
        typer.Option(
            "--write-exclusions",
            help="Write the frames to leave out of training (one of each near-duplicate pair whose masks contradict, "
            "with the reason) as a CSV for train --exclude.",
            metavar="FILE",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --write-exclusions file.")] = False,
) -> int:
    """Summarise a data set and list every problem with its file; exit 1 when there are problems."""
    flags = data_flags(
        layout, mask_value, mask_threshold, subject_pattern, rle_order, csv, id_column, rle_column, class_column, classes, rle_format,
        max_pixels,
    )  # fmt: skip
    if write_exclusions is not None:
        check_outputs([Output("--write-exclusions", write_exclusions)], force, inputs=[data])
    elif force:
        raise UsageError("--force replaces the --write-exclusions file; give --write-exclusions FILE or drop --force")
    inspection = inspect_dataset(load_dataset(data, data_options(flags)))
    if as_json:
        stdout.print_json(json.dumps(inspection_json(inspection)))
    else:
        print_inspection(inspection)
    if write_exclusions is not None:
        _write_exclusions(write_exclusions, inspection, data, stderr if as_json else stdout, force)
    return 0 if inspection.ok else EXIT_PROBLEMS


def _write_exclusions(path: Path, inspection: Inspection, data: Path, console: Console, force: bool) -> None:
    """Write the frames the exclusion rule leaves out (:mod:`medseg.data.exclusions`) and say how many."""
    from medseg.data import exclusions

    excluded = exclusions.leave_out(inspection.contradictions)
    exclusions.write_exclusions(path, excluded, source=str(Path(data).resolve()), exclusive=not force)
    pairs = len({(item.first.id, item.second.id) for item in inspection.contradictions})
    console.print(
        f"written: {escape(str(path))}: {len(excluded)} frame(s) to leave out of {pairs} contradicting near-duplicate pair(s); "
        f"train with --exclude {escape(str(path))}"
    )


def inspection_json(inspection: Inspection) -> dict:
    """The inspection as a JSON-serialisable dict."""
    return {
        "summary": inspection.summary,
        "problems": [{"kind": p.kind, "path": str(p.path), "message": p.message} for p in inspection.problems],
    }


def print_inspection(inspection: Inspection) -> None:
    """Print the summary table and the problems."""
    summary = inspection.summary
    table = Table(title=f"{summary['root']} ({summary['layout']} layout)", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    for label, value in _summary_rows(summary):
        table.add_row(label, value)
    stdout.print(table)
    if inspection.ok:
        stdout.print("[green]No problems found.[/green]")
        return
    stdout.print(f"[red]{len(inspection.problems)} problem(s):[/red]")
    for problem in inspection.problems:
        stdout.print(f"  [red]{problem.kind}[/red] {escape(str(problem.path))}: {escape(problem.message)}")


def _summary_rows(summary: dict) -> list[tuple[str, str]]:
    share = summary["empty_share"]
    area = summary["mask_area"]
    rows = [
        ("train images", str(summary["train_images"])),
        ("with a mask (non-empty)", str(summary["non_empty"])),
        ("empty masks", str(summary["empty"])),
        ("empty share", "-" if share is None else f"{share:.1%}"),
        ("subjects", "unknown" if summary["subjects"] is None else str(summary["subjects"])),
        ("image sizes (WxH)", ", ".join(f"{size}: {count}" for size, count in summary["image_sizes"].items()) or "-"),
        ("mask area min / median / max (px)", "-" if area is None else f"{area['min']} / {area['median']:g} / {area['max']}"),
        ("test images", str(summary["test_images"])),
    ]
    if summary["sample_submission"]:
        rows.append(("sample submission rows", str(summary["sample_submission_rows"])))
    for name, facts in (summary.get("classes") or {}).items():
        area = facts["mask_area"]
        areas = "" if area is None else f"; area {area['min']} / {area['median']:g} / {area['max']} px"
        rows.append((f"class {name}: with / without", f"{facts['with']} / {facts['without']}{areas}"))
    for pair, frames in (summary.get("overlapping_frames") or {}).items():
        rows.append((f"frames where {pair} overlap", str(frames)))
    return rows


@app.command("train")
def train_command(
    data: Annotated[Path, typer.Argument(help="Data folder (kaggle, folders or rle-csv layout).", metavar="DATA", show_default=False)],
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
    fold: Annotated[int | None, typer.Option("--fold", help="Train one run validated on fold K (default: split.fold).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue a killed run from its last checkpoints.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing run folder.")] = False,
    devices: Annotated[str | None, typer.Option("--devices", help="Devices per machine for Lightning (e.g. 2, or auto).")] = None,
    num_nodes: Annotated[int | None, typer.Option("--num-nodes", help="Machines for Lightning's DDP.")] = None,
    strategy: Annotated[str | None, typer.Option("--strategy", help="Lightning strategy, e.g. ddp.")] = None,
    layout: LayoutOption = None,
    mask_value: MaskValueOption = None,
    mask_threshold: MaskThresholdOption = None,
    subject_pattern: SubjectPatternOption = None,
    rle_order: RleOrderOption = None,
    rle_format: RleFormatOption = None,
    max_pixels: MaxPixelsOption = None,
    csv: CsvOption = None,
    id_column: IdColumnOption = None,
    rle_column: RleColumnOption = None,
    class_column: ClassColumnOption = None,
    classes: ClassesOption = None,
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
    from medseg.learn.train import plan_run, train_run

    flags = data_flags(
        layout, mask_value, mask_threshold, subject_pattern, rle_order, csv, id_column, rle_column, class_column, classes, rle_format,
        max_pixels,
    )  # fmt: skip
    shortcuts = {
        **{f"data.{key}": value for key, value in flags.items()},
        "data.exclude": None if exclude is None else str(exclude),
        "trainer.devices": devices,
        "trainer.num_nodes": num_nodes,
        "trainer.strategy": strategy,
    }
    values = {key: value for key, value in shortcuts.items() if value is not None}
    if resume and (config_file or overrides or preset != "default" or values):
        raise UsageError("--resume continues with RUN/config.yaml; drop --preset, --config, --set and the data and device options")
    config = load_config(preset, config_file, overrides, values)
    if dry_run:
        if resume:
            raise UsageError("--dry-run plans a new run; drop --resume (a resumed run continues the plan of RUN/run.json)")
        _print_plan(plan_run(data, out, config, folds, fold, force, on_message=_say(quiet), on_warning=_warn), out)
        return 0
    results = train_run(
        data,
        out,
        config,
        folds,
        fold,
        resume,
        force,
        show_progress=not quiet and show_progress_default(),
        on_message=_say(quiet),
        on_warning=_warn,
    )
    if is_ddp_child():
        return 0
    stdout.print(f"run folder: {out}")
    for result in results:
        stdout.print(
            f"  fold {result.fold}: best validation loss {result.best_val_loss:.4f}, "
            f"score {result.best_val_score:.4f} ({result.epochs} epochs)"
        )
    if read_run_config(Path(out) / CONFIG_FILE).trainer.tune_after:
        from medseg.infer.tune import tune_run

        _print_tuning(tune_run(out, on_message=_say(quiet), force=True), out)
    _report(out, no_report, quiet)
    return 0


def _print_plan(plan, out: Path) -> None:
    """The plan and estimate of ``train --dry-run``, one line each (:class:`~medseg.learn.estimate.TrainingPlan`)."""
    stdout.print(f"plan for {escape(str(out))} (--dry-run: nothing written)")
    for line in plan.lines():
        stdout.print(f"  {escape(line)}")


def _warn(line: str) -> None:
    """One ``warning:`` line on stderr, shown with --quiet too."""
    stderr.print(f"[yellow]warning:[/yellow] {escape(line)}")


def _setting(tuning: Tuning) -> str:
    presence = f", presence above {tuning.presence_threshold:.2f}" if tuning.presence_head else ""
    return f"threshold {tuning.threshold:.2f}, minimum area {tuning.min_area} px{presence}"


def _report(run: Path, skip: bool, quiet: bool) -> None:
    if skip:
        return
    from medseg.report.page import build_report

    stdout.print(f"report: {build_report(run, on_message=_say(quiet))}")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    stderr.print(f"[yellow]warning:[/yellow] {escape(str(message))}")


def _tta(tta: bool, vflip: bool) -> str:
    if vflip and not tta:
        raise UsageError("--vflip adds to the horizontal flip; drop --no-tta")
    return "hvflip" if vflip else "hflip" if tta else "none"


def _say(quiet: bool):
    return (lambda line: None) if quiet else (lambda line: stderr.print(escape(line)))


@app.command("tune")
def tune_command(
    run: RunArgument,
    tta: TtaOption = True,
    vflip: VflipOption = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier tuning of the run.")] = False,
    quiet: QuietOption = False,
    no_report: NoReportOption = False,
) -> int:
    """Choose the threshold, minimum mask area and presence threshold that maximise the score on validation (out-of-fold) frames."""
    from medseg.infer.tune import tune_run

    _print_tuning(tune_run(run, _tta(tta, vflip), on_message=_say(quiet), force=force), run)
    _report(run, no_report, quiet)
    return 0


def _print_tuning(tuning: Tuning | StructuresTuning, run: Path) -> None:
    frames = f"{tuning.frames} {'out-of-fold' if tuning.out_of_fold else 'validation'} frames"
    if isinstance(tuning, StructuresTuning):
        for name, block in tuning.classes.items():
            stdout.print(f"{name}: {_setting(block)}: score {block.score_after:.4f} (untuned {block.score_before:.4f}{_honest(block)})")
        overall = f"{tuning.score_after:.4f} (untuned {tuning.score_before:.4f}{_honest(tuning)})"
        stdout.print(f"mean over (frame, structure) on {frames}: {overall}")
    else:
        untuned = ", presence above 0.5" if tuning.presence_head else ""
        stdout.print(
            f"{_setting(tuning)}: score {tuning.score_after:.4f} on {frames} "
            f"(untuned: threshold 0.5, no minimum area{untuned}: {tuning.score_before:.4f}{_honest(tuning)})"
        )
    stdout.print(f"written: {Path(run) / POSTPROCESS_FILE}")


def _honest(tuning: Tuning | StructuresTuning) -> str:
    if tuning.cross_fitted is None:
        return ""
    return f"; cross-fitted, what to expect on new subjects: {tuning.cross_fitted:.4f}"


@app.command("report")
def report_command(
    run: RunArgument,
    tta: TtaOption = True,
    vflip: VflipOption = False,
    quiet: QuietOption = False,
) -> int:
    """Write RUN/report.html: warnings, headline scores, curves, tuning, held-out evaluation, overlays (worst first)."""
    from medseg.report.page import build_report

    stdout.print(f"report: {build_report(run, _tta(tta, vflip), on_message=_say(quiet))}")
    return 0


@app.command("predict")
def predict_command(
    run: RunArgument,
    images: Annotated[
        Path, typer.Argument(help="Folder of frames (e.g. test/), or a Kaggle data folder.", metavar="IMAGES", show_default=False)
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Submission CSV to write (img,pixels; a row per frame and structure, as the sample, for several).",
            metavar="FILE.csv",
        ),
    ] = None,
    masks_dir: Annotated[
        Path | None,
        typer.Option(
            "--masks-dir",
            help="Folder for PNG masks (0/255) per frame; several structures: a class-index PNG, or DIR/<structure>/ if they overlap.",
            metavar="DIR",
        ),
    ] = None,
    sample: Annotated[
        Path | None,
        typer.Option("--sample", help="Sample submission (ids and order); found beside the frames if left out.", metavar="FILE"),
    ] = None,
    tta: TtaOption = True,
    vflip: VflipOption = False,
    save_probs: Annotated[bool, typer.Option("--save-probs", help="Also keep float16 probability maps (.npz).")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Frames per forward pass.", min=1)] = 16,
    force: Annotated[bool, typer.Option("--force", help="Replace existing outputs.")] = False,
    allow_degenerate: Annotated[
        bool, typer.Option("--allow-degenerate", help="Write a submission the validator finds degenerate.")
    ] = False,
    engine: Annotated[
        str, typer.Option("--engine", help="torch (checkpoints, CUDA when there) or onnx (ONNX Runtime on the CPU).", metavar="NAME")
    ] = "torch",
    onnx_file: Annotated[
        Path | None,
        typer.Option("--onnx", help="Exported model for --engine onnx (default RUN/model.onnx, exported on first use).", metavar="FILE"),
    ] = None,
    max_pixels: Annotated[
        int | None,
        typer.Option(
            "--max-pixels", help="Most pixels a frame may declare in its header (default: the run's data.max_pixels).", metavar="N"
        ),
    ] = None,
    quiet: QuietOption = False,
) -> int:
    """Predict masks for IMAGES with the run's fold ensemble and tuned post-processing; write a checked submission."""
    from medseg.infer.outputs import PredictRequest, predict_folder

    request = PredictRequest(
        run, images, out, masks_dir, sample, _tta(tta, vflip), save_probs, force, allow_degenerate, batch_size, engine, onnx_file,
        data_options({"max_pixels": max_pixels}).max_pixels if max_pixels is not None else None,
    )  # fmt: skip
    result = predict_folder(request, on_message=_say(quiet))
    stdout.print(f"{result['frames']} frames, {result['empty']} empty masks; written: {', '.join(result['written'])}")
    return 0


@app.command("export")
def export_command(
    run: RunArgument,
    onnx_file: Annotated[
        Path, typer.Option("--onnx", help="ONNX file to write; its settings go beside it as .json.", metavar="FILE", show_default=False)
    ],
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset.", min=11)] = 17,
    force: Annotated[bool, typer.Option("--force", help="Replace existing files.")] = False,
) -> int:
    """Export the run's fold ensemble as one ONNX model (dynamic batch) with its pre/post-processing settings."""
    from medseg.infer.export import export_onnx

    model, settings = export_onnx(run, onnx_file, opset, force)
    stdout.print(f"written: {model} and {settings}")
    return 0


@app.command("check-submission")
def check_submission_command(
    file: Annotated[
        Path,
        typer.Argument(help="Submission CSV (img,pixels, or id,class,rle for several structures).", metavar="FILE", show_default=False),
    ],
    sample: Annotated[
        Path | None, typer.Option("--sample", help="Sample submission whose ids must each appear once.", metavar="SAMPLE")
    ] = None,
    shape: Annotated[
        tuple[int, int] | None, typer.Option("--shape", help="Frame height and width, to check RLE bounds.", metavar="H W")
    ] = None,
    allow_degenerate: Annotated[bool, typer.Option("--allow-degenerate", help="Report degenerate output as a warning only.")] = False,
    rle_format: Annotated[
        str | None,
        typer.Option(
            "--rle-format",
            help="RLE dialect of the file: kaggle, row-major or siim; told from the file when left out (kaggle where it does not tell).",
            metavar="NAME",
        ),
    ] = None,
) -> int:
    """Validate a submission: every id once, valid RLE within the frame, no degenerate output."""
    from medseg.infer import submission

    dialect = data_options({"rle_format": rle_format}).rle_format
    report = submission.validate_file(file, sample=sample, sizes=shape, dialect=dialect)
    submission.check_or_raise(report, allow_degenerate, warn=lambda line: stderr.print(f"[yellow]warning:[/yellow] {escape(line)}"))
    for note in report.notes:
        stderr.print(f"note: {escape(note)}")
    bounds = "" if report.bounds_checked else " (RLE bounds not checked: give --shape H W)"
    stdout.print(f"[green]{file}: valid[/green], {report.rows} rows, {report.empty} empty masks{bounds}")
    return 0


@app.command("evaluate")
def evaluate_command(
    run: RunArgument,
    data: Annotated[Path, typer.Argument(help="Labelled data folder (any layout).", metavar="DATA", show_default=False)],
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default RUN/evaluation/<DATA name>).", metavar="DIR")] = None,
    tta: TtaOption = True,
    vflip: VflipOption = False,
    layout: LayoutOption = None,
    mask_value: MaskValueOption = None,
    mask_threshold: MaskThresholdOption = None,
    subject_pattern: SubjectPatternOption = None,
    rle_order: RleOrderOption = None,
    rle_format: RleFormatOption = None,
    max_pixels: MaxPixelsOption = None,
    csv: CsvOption = None,
    id_column: IdColumnOption = None,
    rle_column: RleColumnOption = None,
    class_column: ClassColumnOption = None,
    classes: ClassesOption = None,
    skip_excluded: Annotated[
        bool,
        typer.Option("--skip-excluded", help="Do not score the frames the run left out of training (scored by the ensemble by default)."),
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing evaluation.")] = False,
    quiet: QuietOption = False,
) -> int:
    """Score a run on labelled DATA: per-image CSV and summary (held-out frames only on the run's own data)."""
    from medseg.report.evaluate import evaluate_run

    flags = data_flags(
        layout, mask_value, mask_threshold, subject_pattern, rle_order, csv, id_column, rle_column, class_column, classes, rle_format,
        max_pixels,
    )  # fmt: skip
    options = data_options(flags) if flags else None
    summary = evaluate_run(run, data, options, _tta(tta, vflip), out, force, on_message=_say(quiet), skip_excluded=skip_excluded)
    print_evaluation(summary)
    return 0


@app.command("demo")
def demo_command(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo's outputs.", metavar="DIR")] = Path("medseg-demo"),
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier demo in --out.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="Only the final list of outputs.")] = False,
    no_report: NoReportOption = False,
) -> int:
    """Run the whole workflow (inspect, train, tune, predict, evaluate, report) on the bundled sample data."""
    from medseg.demo import run_demo

    outputs = run_demo(out, force, on_message=_say(quiet), with_report=not no_report)
    stdout.print("[green]demo finished[/green]; outputs:")
    for label, path in outputs.items():
        stdout.print(f"  {label}: {path}")
    return 0


@app.command("sweep")
def sweep_command(
    data: Annotated[Path, typer.Argument(help="Data folder (kaggle, folders or rle-csv layout).", metavar="DATA", show_default=False)],
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
    layout: LayoutOption = None,
    mask_value: MaskValueOption = None,
    mask_threshold: MaskThresholdOption = None,
    subject_pattern: SubjectPatternOption = None,
    rle_order: RleOrderOption = None,
    rle_format: RleFormatOption = None,
    max_pixels: MaxPixelsOption = None,
    csv: CsvOption = None,
    id_column: IdColumnOption = None,
    rle_column: RleColumnOption = None,
    class_column: ClassColumnOption = None,
    classes: ClassesOption = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No line per trial.")] = False,
) -> int:
    """Search the configuration with Optuna: each trial trains every fold and scores its cross-fitted out-of-fold score."""
    from medseg.sweep.study import SweepRequest, run_sweep

    flags = data_flags(
        layout, mask_value, mask_threshold, subject_pattern, rle_order, csv, id_column, rle_column, class_column, classes, rle_format,
        max_pixels,
    )  # fmt: skip
    request = SweepRequest(
        data, out, preset, config_file, overrides or [], {f"data.{key}": value for key, value in flags.items()}, space, trials, timeout,
        storage, study_name, folds, outer_fold, outer_folds, seed, keep_checkpoints,
    )  # fmt: skip
    _print_sweep(run_sweep(request, on_message=_say(quiet), on_warning=_warn))
    return 0


def _print_sweep(result) -> None:
    tally = ", ".join(f"{count} {state.lower()}" for state, count in sorted(result.counts.items()))
    stdout.print(
        f"study {escape(result.study_name)} in {escape(result.storage)}: "
        f"{sum(result.counts.values())} trials ({tally}); {result.added} added now"
    )
    completed = result.counts.get("COMPLETE", 0)
    if result.best is not None:
        stdout.print(f"best trial #{result.best.number}: cross-fitted score {result.best.value:.4f} (optimistic: the best of {completed})")
    if result.outer is not None:
        outer = result.outer
        stdout.print(
            f"outer fold {outer['outer_fold']} of {outer['outer_folds']} ({len(outer['frames'])} frames no trial saw): {outer['score']:.4f}"
        )
    stdout.print(f"written: {', '.join(escape(str(path)) for path in result.written)}")
    if result.best is None:
        raise MedsegError("no trial of the study completed; trials.csv and study.html give each one's reason")


def print_evaluation(summary: dict) -> None:
    """Print the evaluation summary as a table."""
    post = summary["postprocess"]
    table = Table(title=f"{summary['data']}: {summary['mode']}", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    rows = [
        ("frames (empty truth)", f"{summary['n_images']} ({summary['n_empty_truth']})"),
        ("competition score", _number(summary["score"])),
        ("Dice on non-empty truths", _number(summary["dice_nonempty"])),
        ("IoU", _number(summary["iou"])),
        ("presence precision / recall", f"{_number(summary['presence_precision'])} / {_number(summary['presence_recall'])}"),
        ("false positives on empty frames", f"{summary['presence_empty_false_positives']} of {summary['n_empty_truth']}"),
    ]
    if "classes" in summary:
        rows[0] = ("(frame, structure) pairs (empty truth)", rows[0][1])
        for name, facts in summary["classes"].items():
            rows.append((f"{name}: score / Dice on non-empty", f"{_number(facts['score'])} / {_number(facts['dice_nonempty'])}"))
            rows.append((f"{name}: post-processing", _post_text(post[name])))
    else:
        rows.append(("post-processing", _post_text(post)))
    if "left_out" in summary:
        left_out = summary["left_out"]
        scored = "scored, by the ensemble of all folds" if left_out["scored"] else "not scored (--skip-excluded)"
        rows.append(("frames left out of training", f"{left_out['frames']} ({scored})"))
    for label, value in rows:
        table.add_row(label, value)
    stdout.print(table)
    stdout.print(f"written: {summary['out']}/per_image.csv, summary.json")


def _post_text(post: dict) -> str:
    return f"threshold {post['threshold']:.2f}, min area {post['min_area']} px{'' if post['tuned'] else ' (not tuned)'}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return its exit code instead of exiting.

    Warnings are shown as one ``warning:`` line each, without the source line.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.
    """
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)
    warnings.showwarning = _show_warning
    arguments = sys.argv[1:] if argv is None else argv
    bars = progress.shown(stderr) if stderr.is_terminal and "--quiet" not in arguments else contextlib.nullcontext()
    try:
        with bars:
            result = app(args=argv, prog_name="medseg", standalone_mode=False)
    except typer.Exit as stop:
        return stop.exit_code
    except ClickException as error:
        return show_click_error(error, arguments)
    except typer.Abort:
        stderr.print("Aborted.")
        return 130
    except UsageError as error:
        stderr.print(f"[red]error:[/red] {escape(printable(error))}")
        return EXIT_USAGE
    except MedsegError as error:
        stderr.print(f"[red]error:[/red] {escape(printable(error))}")
        return EXIT_PROBLEMS
    except OSError as error:
        stderr.print(f"[red]error:[/red] {escape(printable(os_error_line(error)))}")
        return EXIT_PROBLEMS
    return result if isinstance(result, int) else 0


def show_click_error(error: Exception, arguments: list[str]) -> int:
    """Show a command-line mistake the parser found as the command's usage line and one ``error:`` line.

    Args:
        error: The parser's exception.
        arguments: The command line, without the program name.

    Returns:
        The exit code click gives it: 2 for a usage error.
    """
    if NoArgsIsHelp is not None and isinstance(error, NoArgsIsHelp):
        error.show()
        return error.exit_code
    context = getattr(error, "ctx", None) or _command_context(arguments)
    stderr.print(escape(context.get_usage()))
    stderr.print(f"[red]error:[/red] {escape(error.format_message())} (see '{escape(context.command_path)} --help')")
    return error.exit_code


def _command_context(arguments: list[str]) -> typer.Context:
    """A context of the command named in ``arguments`` (of the program when none is), for its usage line.

    The parser raises some mistakes (an option given too few values) without the context they happened in.
    """
    group = typer.main.get_command(app)
    context = typer.Context(group, info_name="medseg")
    name = next((argument for argument in arguments if not argument.startswith("-")), None)
    command = group.get_command(context, name) if name else None
    return typer.Context(command, info_name=name, parent=context) if command is not None else context


def os_error_line(error: OSError) -> str:
    """One line for a failed read or write (a full disk, a missing permission), with the fix."""
    where = f"{error.filename}: " if error.filename else ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"{where}disk full ({error.strerror}); free space or write elsewhere, then run again (with --resume for train); "
            "files written before are intact"
        )
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{where}{error.strerror}; check the folder's permissions or write elsewhere"
    return f"{where}{error.strerror or error}"


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
