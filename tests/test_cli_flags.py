"""The data flags as one bundle: :class:`~medseg.cli.options.DataFlags`, its conversions, and every command that
reads a data folder taking the same flags through :func:`~medseg.cli.options.with_data_flags`.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

from medseg.cli import DataFlags, app, main, with_data_flags
from medseg.config import DataOptions
from medseg.errors import MedsegError, UsageError

FLAGS = [
    "--layout",
    "--mask-value",
    "--mask-threshold",
    "--subject-pattern",
    "--rle-order",
    "--rle-format",
    "--max-pixels",
    "--csv",
    "--id-column",
    "--rle-column",
    "--class-column",
    "--classes",
]
CONTRADICTION = "error: --rle-format row-major numbers pixels row-major but --rle-order F column-major; drop --rle-order"


def data_command_args(command: str, tmp_path) -> list[str]:
    """A command line of ``command`` that reads a data folder, with paths in ``tmp_path`` that do not exist."""
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    return {
        "inspect": ["inspect", data],
        "train": ["train", data, "--out", out],
        "evaluate": ["evaluate", str(tmp_path / "run"), data],
        "sweep": ["sweep", data, "--out", out],
    }[command]


DATA_COMMANDS = ["inspect", "train", "evaluate", "sweep"]


def test_one_field_per_flag_each_a_data_option():
    names = [field.name for field in dataclasses.fields(DataFlags)]
    assert ["--" + name.replace("_", "-") for name in names] == FLAGS
    assert set(names) <= set(DataOptions.model_fields)


def test_no_flag_given():
    flags = DataFlags()
    assert flags.given() == {} and flags.overrides() == {}
    assert flags.options() == DataOptions()


def test_the_three_conversions():
    flags = DataFlags(mask_value=1, rle_order="C", csv="masks.csv")
    assert flags.given() == {"mask_value": 1, "rle_order": "C", "csv": "masks.csv"}
    assert flags.overrides() == {"data.mask_value": 1, "data.rle_order": "C", "data.csv": "masks.csv"}
    assert flags.options() == DataOptions(mask_value=1, rle_order="C", csv="masks.csv")


def test_the_bundle_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DataFlags().layout = "kaggle"


@pytest.mark.parametrize("conversion", ["given", "options", "overrides"])
def test_row_major_with_column_major_order_is_a_contradiction(conversion):
    with pytest.raises(UsageError, match=r"^--rle-format row-major numbers pixels row-major but --rle-order F column-major"):
        getattr(DataFlags(rle_format="row-major", rle_order="F"), conversion)()


@pytest.mark.parametrize("conversion", ["given", "options", "overrides"])
def test_a_wrong_value_names_the_flag(conversion):
    with pytest.raises(UsageError, match=r"^--rle-order: Input should be 'F' or 'C'$"):
        getattr(DataFlags(rle_order="X"), conversion)()


def test_values_that_exclude_each_other_are_a_usage_error():
    with pytest.raises(UsageError, match="mask_value and mask_threshold exclude each other"):
        DataFlags(mask_value=1, mask_threshold=127).options()


def test_typer_reads_the_flags_a_decorated_command_declares():
    seen = {}
    program = typer.Typer(add_completion=False)

    @program.command()
    @with_data_flags
    def probe(
        first: Annotated[str, typer.Argument()],
        *,
        data_flags: DataFlags,
        last: Annotated[int, typer.Option("--last")] = 0,
    ) -> None:
        seen.update(first=first, data_flags=data_flags, last=last)

    result = CliRunner().invoke(program, ["x", "--mask-value", "3", "--rle-format", "siim", "--last", "7"])
    assert result.exit_code == 0, result.output
    assert seen == {"first": "x", "data_flags": DataFlags(mask_value=3, rle_format="siim"), "last": 7}
    options = [parameter.name for parameter in typer.main.get_command(program).params]
    assert options == ["first", *(field.name for field in dataclasses.fields(DataFlags)), "last"]


def test_a_command_without_the_bundle_is_refused():
    def no_bundle(data: str) -> None:
        """Takes no data flags."""

    with pytest.raises(TypeError, match="no parameter data_flags"):
        with_data_flags(no_bundle)


@pytest.mark.parametrize("command", DATA_COMMANDS)
def test_every_data_command_lists_the_flags_together_in_one_order(command):
    group = typer.main.get_command(app)
    names = [option for parameter in group.commands[command].params for option in parameter.opts]
    start = names.index(FLAGS[0])
    assert names[start : start + len(FLAGS)] == FLAGS


@pytest.mark.parametrize("command", DATA_COMMANDS)
def test_every_data_command_refuses_the_contradiction(command, tmp_path, capsys):
    code = main([*data_command_args(command, tmp_path), "--rle-format", "row-major", "--rle-order", "F"])
    assert (code, capsys.readouterr().err.strip()) == (2, CONTRADICTION)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", DATA_COMMANDS)
def test_every_data_command_refuses_a_column_major_dialect_in_row_major_order(command, tmp_path, capsys):
    code = main([*data_command_args(command, tmp_path), "--rle-format", "siim", "--rle-order", "C"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: rle_format=siim numbers pixels column-major but rle_order=C row-major"), err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", DATA_COMMANDS)
def test_every_data_command_names_a_wrong_flag_value(command, tmp_path, capsys):
    code = main([*data_command_args(command, tmp_path), "--rle-order", "X"])
    assert (code, capsys.readouterr().err.strip()) == (2, "error: --rle-order: Input should be 'F' or 'C'")


def stop_and_record(recorded: dict, **pick):
    """A stand-in for a stage function: records what ``pick`` takes from its arguments, then fails."""

    def stage(*args, **kwargs):
        recorded.update({name: take(args, kwargs) for name, take in pick.items()})
        raise MedsegError("stopped")

    return stage


GIVEN = ["--mask-value", "1", "--csv", "masks.csv"]


def test_inspect_reads_the_data_with_the_flags(tmp_path, monkeypatch, capsys):
    recorded = {}
    monkeypatch.setattr("medseg.data.datasets.load_dataset", stop_and_record(recorded, options=lambda args, kwargs: args[1]))
    assert main([*data_command_args("inspect", tmp_path), *GIVEN]) == 1
    assert recorded["options"] == DataOptions(mask_value=1, csv="masks.csv")


def test_train_gives_the_flags_as_data_overrides(tmp_path, monkeypatch, capsys):
    recorded = {}
    monkeypatch.setattr("medseg.config.load_config", stop_and_record(recorded, values=lambda args, kwargs: args[3]))
    assert main([*data_command_args("train", tmp_path), *GIVEN]) == 1
    assert recorded["values"] == {"data.mask_value": 1, "data.csv": "masks.csv"}


@pytest.mark.parametrize(("given", "options"), [([], None), (GIVEN, DataOptions(mask_value=1, csv="masks.csv"))])
def test_evaluate_gives_data_options_only_when_a_flag_is_given(given, options, tmp_path, monkeypatch, capsys):
    recorded = {}
    monkeypatch.setattr("medseg.report.evaluate.evaluate_run", stop_and_record(recorded, options=lambda args, kwargs: args[0].options))
    assert main([*data_command_args("evaluate", tmp_path), *given]) == 1
    assert recorded["options"] == options


def test_sweep_gives_the_flags_as_data_values_of_every_trial(tmp_path, monkeypatch, capsys):
    recorded = {}
    monkeypatch.setattr("medseg.sweep.study.run_sweep", stop_and_record(recorded, values=lambda args, kwargs: args[0].values))
    assert main([*data_command_args("sweep", tmp_path), *GIVEN]) == 1
    assert recorded["values"] == {"data.mask_value": 1, "data.csv": "masks.csv"}


def test_check_submission_and_predict_check_their_own_data_flag(tmp_path, capsys):
    assert main(["check-submission", str(tmp_path / "sub.csv"), "--rle-format", "nosuch"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --rle-format: ")
    assert main(["predict", str(tmp_path / "run"), str(tmp_path / "images"), "--max-pixels", "0"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --max-pixels: ")
