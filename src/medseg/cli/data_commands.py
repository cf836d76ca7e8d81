"""The commands of the data stage: ``inspect`` (a data folder) and ``check-submission`` (a submission CSV)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

from medseg.cli.exits import EXIT_PROBLEMS
from medseg.cli.options import DataArgument, DataFlags, with_data_flags
from medseg.cli.printers import inspection_json, print_inspection, stderr, stdout, warn
from medseg.errors import UsageError
from medseg.files import Output, check_outputs

if TYPE_CHECKING:
    from medseg.data.inspector import Inspection


@with_data_flags
def inspect_command(
    data: DataArgument,
    *,
    data_flags: DataFlags,
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
    from medseg.data.datasets import load_dataset
    from medseg.data.inspector import inspect_dataset

    options = data_flags.options()
    if write_exclusions is not None:
        check_outputs([Output("--write-exclusions", write_exclusions)], force, inputs=[data])
    elif force:
        raise UsageError("--force replaces the --write-exclusions file; give --write-exclusions FILE or drop --force")
    inspection = inspect_dataset(load_dataset(data, options))
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

    dialect = DataFlags(rle_format=rle_format).options().rle_format
    report = submission.validate_file(file, sample=sample, sizes=shape, dialect=dialect)
    submission.check_or_raise(report, allow_degenerate, warn=warn)
    for note in report.notes:
        stderr.print(f"note: {escape(note)}")
    bounds = "" if report.bounds_checked else " (RLE bounds not checked: give --shape H W)"
    stdout.print(f"[green]{file}: valid[/green], {report.rows} rows, {report.empty} empty masks{bounds}")
    return 0
