"""The options and arguments that several commands share, each declared once.

The data flags (how to read a data folder) are one bundle, :class:`DataFlags`: a field per flag, whose
annotation is the flag's typer declaration. :func:`with_data_flags` gives a command all of them and passes
the command a ``DataFlags``, so that every command that reads a data folder takes them the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError

from medseg.config import LAYOUTS, DataOptions
from medseg.errors import UsageError

DataArgument = Annotated[Path, typer.Argument(help="Data folder (kaggle, folders or rle-csv layout).", metavar="DATA", show_default=False)]
RunArgument = Annotated[Path, typer.Argument(help="Run folder written by medseg train.", metavar="RUN", show_default=False)]
TtaOption = Annotated[bool, typer.Option("--tta/--no-tta", help="Average with the horizontally flipped frame.")]
ReportTtaOption = Annotated[
    bool | None,
    typer.Option(
        "--tta/--no-tta",
        help="Average with the horizontally flipped frame (default: as the run was tuned; on before tuning).",
        show_default=False,
    ),
]
VflipOption = Annotated[bool, typer.Option("--vflip", help="Also average with the vertically flipped frame (with --tta).")]
QuietOption = Annotated[bool, typer.Option("--quiet", help="No progress messages.")]
EngineOption = Annotated[
    str, typer.Option("--engine", help="torch (checkpoints, CUDA when there) or onnx (ONNX Runtime on the CPU).", metavar="NAME")
]
OnnxOption = Annotated[
    Path | None,
    typer.Option("--onnx", help="Exported model for --engine onnx (default RUN/model.onnx, exported on first use).", metavar="FILE"),
]
RunMaxPixelsOption = Annotated[
    int | None,
    typer.Option("--max-pixels", help="Most pixels a frame may declare in its header (default: the run's data.max_pixels).", metavar="N"),
]
NoReportOption = Annotated[bool, typer.Option("--no-report", help="Do not write RUN/report.html at the end.")]

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
MaxPixelsOption = Annotated[
    int | None,
    typer.Option(
        "--max-pixels",
        help="Most pixels a frame or mask may declare in its header (data.max_pixels; default 100,000,000): a larger one is "
        "refused before it is decoded.",
        metavar="N",
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


@dataclasses.dataclass(frozen=True)
class DataFlags:
    """The data flags of a command, ``None`` where left out; fields in the order ``--help`` lists them.

    Each field is named as its :class:`~medseg.config.DataOptions` field and annotated with its typer
    declaration, which :func:`with_data_flags` gives the command.
    """

    layout: LayoutOption = None
    mask_value: MaskValueOption = None
    mask_threshold: MaskThresholdOption = None
    subject_pattern: SubjectPatternOption = None
    rle_order: RleOrderOption = None
    rle_format: RleFormatOption = None
    max_pixels: MaxPixelsOption = None
    csv: CsvOption = None
    id_column: IdColumnOption = None
    rle_column: RleColumnOption = None
    class_column: ClassColumnOption = None
    classes: ClassesOption = None

    def given(self) -> dict[str, Any]:
        """The flags given, by :class:`~medseg.config.DataOptions` field, checked.

        Flags left out are not in the result, so that they do not replace a configuration's or a run's values.

        Raises:
            UsageError: If a value cannot work, or two flags contradict each other; the message names the flag.
        """
        self.options()
        return self._present()

    def options(self) -> DataOptions:
        """The data options of the flags (defaults for the ones left out).

        Raises:
            UsageError: If a value cannot work, or two flags contradict each other; the message names the flag.
        """
        present = self._present()
        if present.get("rle_format") == "row-major" and present.get("rle_order") == "F":
            raise UsageError("--rle-format row-major numbers pixels row-major but --rle-order F column-major; drop --rle-order")
        return data_options(present)

    def overrides(self) -> dict[str, Any]:
        """The flags given as configuration overrides: ``{"data.KEY": value}``, checked as :meth:`given`."""
        return {f"data.{key}": value for key, value in self.given().items()}

    def _present(self) -> dict[str, Any]:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self) if getattr(self, field.name) is not None}


def data_options(flags: dict[str, Any]) -> DataOptions:
    """The data options of flags given by :class:`~medseg.config.DataOptions` field (defaults for the others).

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


Command = TypeVar("Command", bound=Callable[..., Any])
DATA_FLAGS_PARAMETER = "data_flags"


def with_data_flags(command: Command) -> Command:
    """Give a command every data flag, and its body the flags as one :class:`DataFlags`.

    The command declares a keyword-only parameter ``data_flags: DataFlags`` where the flags go in its
    ``--help``; the returned command's signature (which typer reads) has the flags in its place, and calling
    it collects them into a ``DataFlags`` for the body.

    Raises:
        TypeError: If the command has no ``data_flags`` parameter.
    """
    signature = inspect.signature(command, eval_str=True)
    names = list(signature.parameters)
    if DATA_FLAGS_PARAMETER not in names:
        raise TypeError(f"{command.__qualname__} has no parameter {DATA_FLAGS_PARAMETER}: DataFlags for with_data_flags to fill")
    place = names.index(DATA_FLAGS_PARAMETER)
    own = [parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY) for parameter in signature.parameters.values()]
    parameters = [*own[:place], *_flag_parameters(), *own[place + 1 :]]

    @functools.wraps(command)
    def command_with_data_flags(**arguments: Any) -> Any:
        flags = DataFlags(**{field.name: arguments.pop(field.name) for field in dataclasses.fields(DataFlags)})
        return command(**arguments, **{DATA_FLAGS_PARAMETER: flags})

    command_with_data_flags.__signature__ = signature.replace(parameters=parameters)
    command_with_data_flags.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
    if signature.return_annotation is not inspect.Signature.empty:
        command_with_data_flags.__annotations__["return"] = signature.return_annotation
    return typing.cast(Command, command_with_data_flags)


def _flag_parameters() -> list[inspect.Parameter]:
    """A keyword-only parameter per data flag, annotated with its typer declaration and defaulting to ``None``."""
    declarations = typing.get_type_hints(DataFlags, include_extras=True)
    return [
        inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=field.default, annotation=declarations[field.name])
        for field in dataclasses.fields(DataFlags)
    ]


def run_max_pixels(value: int | None) -> int | None:
    """``--max-pixels`` of a command on a run, checked as ``data.max_pixels`` is; ``None``: the run's own."""
    return None if value is None else DataFlags(max_pixels=value).options().max_pixels


def tta_mode(tta: bool, vflip: bool) -> str:
    """The test-time augmentation of ``--tta/--no-tta`` and ``--vflip``: ``none``, ``hflip`` or ``hvflip``.

    Raises:
        UsageError: If ``--vflip`` is given with ``--no-tta``.
    """
    if vflip and not tta:
        raise UsageError("--vflip adds to the horizontal flip; drop --no-tta")
    return "hvflip" if vflip else "hflip" if tta else "none"
