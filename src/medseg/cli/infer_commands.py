"""The commands of the inference stage: ``tune`` (post-processing), ``predict`` (a checked submission) and ``export`` (ONNX)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medseg.cli.options import (
    EngineOption,
    NoReportOption,
    OnnxOption,
    QuietOption,
    RunArgument,
    RunMaxPixelsOption,
    TtaOption,
    VflipOption,
    run_max_pixels,
    tta_mode,
)
from medseg.cli.printers import print_tuning, say, stdout
from medseg.cli.report_commands import write_report


def tune_command(
    run: RunArgument,
    tta: TtaOption = True,
    vflip: VflipOption = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier tuning of the run.")] = False,
    quiet: QuietOption = False,
    no_report: NoReportOption = False,
) -> int:
    """Choose the threshold, minimum mask area and presence threshold that maximise the score on validation (out-of-fold) frames."""
    from medseg.infer.tune import TuneRequest, tune_run

    print_tuning(tune_run(TuneRequest(run, tta_mode(tta, vflip)), force=force, on_message=say(quiet)), run)
    write_report(run, no_report, quiet)  # with the tuning's TTA: what tune just predicted and kept
    return 0


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
    engine: EngineOption = "torch",
    onnx_file: OnnxOption = None,
    max_pixels: RunMaxPixelsOption = None,
    quiet: QuietOption = False,
) -> int:
    """Predict masks for IMAGES with the run's fold ensemble and tuned post-processing; write a checked submission."""
    from medseg.infer.outputs import PredictRequest, predict_folder

    request = PredictRequest(
        run, images, out, masks_dir, sample, tta_mode(tta, vflip), save_probs, force, allow_degenerate, batch_size, engine, onnx_file,
        run_max_pixels(max_pixels),
    )  # fmt: skip
    result = predict_folder(request, on_message=say(quiet))
    stdout.print(f"{result['frames']} frames, {result['empty']} empty masks; written: {', '.join(result['written'])}")
    return 0


def export_command(
    run: RunArgument,
    onnx_file: Annotated[
        Path, typer.Option("--onnx", help="ONNX file to write; its settings go beside it as .json.", metavar="FILE", show_default=False)
    ],
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset.", min=11)] = 17,
    force: Annotated[bool, typer.Option("--force", help="Replace existing files.")] = False,
) -> int:
    """Export the run's fold ensemble as one ONNX model (dynamic batch) with its pre/post-processing settings."""
    from medseg.infer.export import ExportRequest, export_onnx

    model, settings = export_onnx(ExportRequest(run, onnx_file, opset), force=force)
    stdout.print(f"written: {model} and {settings}")
    return 0
