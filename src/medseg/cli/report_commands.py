"""The commands of the report stage: ``report``, ``evaluate`` and ``demo`` (the whole workflow on the sample)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from medseg.cli.options import (
    DataFlags,
    NoReportOption,
    QuietOption,
    ReportTtaOption,
    RunArgument,
    TtaOption,
    VflipOption,
    tta_mode,
    with_data_flags,
)
from medseg.cli.printers import print_evaluation, say, stdout

if TYPE_CHECKING:
    from medseg.data.samples import Sample


def report_command(
    run: RunArgument,
    tta: ReportTtaOption = None,
    vflip: VflipOption = False,
    quiet: QuietOption = False,
) -> int:
    """Write RUN/report.html: warnings, headline scores, curves, tuning, held-out evaluation, overlays (worst first)."""
    from medseg.report.page import ReportRequest, build_report

    mode = None if tta is None and not vflip else tta_mode(True if tta is None else tta, vflip)
    stdout.print(f"report: {build_report(ReportRequest(run, mode), on_message=say(quiet))}")
    return 0


def write_report(run: Path, skip: bool, quiet: bool, samples: Mapping[str, Sample] | None = None) -> None:
    """Write the run's report at the end of a command and print where, unless ``skip`` (``--no-report``).

    Args:
        run: The run folder.
        skip: ``--no-report``.
        quiet: ``--quiet``.
        samples: The run's frames and masks, already decoded by the command (``train``), so that they are not read again.
    """
    if skip:
        return
    from medseg.report.page import ReportRequest, build_report

    stdout.print(f"report: {build_report(ReportRequest(run), on_message=say(quiet), samples=samples)}")


@with_data_flags
def evaluate_command(
    run: RunArgument,
    data: Annotated[Path, typer.Argument(help="Labelled data folder (any layout).", metavar="DATA", show_default=False)],
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default RUN/evaluation/<DATA name>).", metavar="DIR")] = None,
    tta: TtaOption = True,
    vflip: VflipOption = False,
    *,
    data_flags: DataFlags,
    skip_excluded: Annotated[
        bool,
        typer.Option("--skip-excluded", help="Do not score the frames the run left out of training (scored by the ensemble by default)."),
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing evaluation.")] = False,
    quiet: QuietOption = False,
) -> int:
    """Score a run on labelled DATA: per-image CSV and summary (held-out frames only on the run's own data)."""
    from medseg.report.evaluate import EvaluateRequest, evaluate_run

    request = EvaluateRequest(run, data, data_flags.options() if data_flags.given() else None, tta_mode(tta, vflip), out, skip_excluded)
    summary = evaluate_run(request, force=force, on_message=say(quiet))
    print_evaluation(summary)
    return 0


def demo_command(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo's outputs.", metavar="DIR")] = Path("medseg-demo"),
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier demo in --out.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="Only the final list of outputs.")] = False,
    no_report: NoReportOption = False,
) -> int:
    """Run the whole workflow (inspect, train, tune, predict, evaluate, report) on the bundled sample data."""
    from medseg.demo import run_demo

    outputs = run_demo(out, force, on_message=say(quiet), with_report=not no_report)
    stdout.print("[green]demo finished[/green]; outputs:")
    for label, path in outputs.items():
        stdout.print(f"  {label}: {path}")
    return 0
