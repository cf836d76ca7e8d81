"""The typed configuration: cross-field rules as validators, every problem reported, one data-options type."""

from __future__ import annotations

import pytest
import yaml

from conftest import TINY_OVERRIDES, set_args
from medseg.cli import main
from medseg.config import Config, DataOptions, load_config, read_run_config
from medseg.data.datasets import Dataset, sample_data_path
from medseg.errors import UsageError


def test_blur_sigmas_out_of_order_are_a_config_error_for_every_backend():
    for backend in ("cpu", "gpu"):
        with pytest.raises(UsageError, match=r"config key 'augment.blur': sigma_min=2.0 is above sigma_max=1.0; swap them"):
            load_config("cpu", overrides=[f"augment.backend={backend}", "augment.blur.sigma_min=2", "augment.blur.sigma_max=1"])


def test_every_problem_is_reported_not_only_the_first():
    with pytest.raises(UsageError) as caught:
        load_config("cpu", overrides=["optim.lr=-1", "trainer.max_epochs=0", "input.height=33"])
    message = str(caught.value)
    for key in ("optim.lr", "trainer.max_epochs", "input.height"):
        assert f"config key '{key}'" in message, message
    assert "\n" not in message


def test_an_untrained_presence_head_is_a_config_error():
    with pytest.raises(UsageError, match="presence_head=true with loss.presence_weight=0"):
        load_config("cpu", overrides=["loss.presence_weight=0"])


def test_the_data_section_is_the_data_options_type():
    config = load_config("cpu", overrides=["data.mask_value=1", "data.rle_order=C"])
    assert type(config.data) is DataOptions and config.data == DataOptions(mask_value=1, rle_order="C")
    assert Config.model_fields["data"].annotation is DataOptions
    assert Dataset.__dataclass_fields__["options"].type in ("DataOptions", DataOptions)
    with pytest.raises(UsageError, match="mask_value and mask_threshold exclude each other"):
        load_config("cpu", overrides=["data.mask_value=1", "data.mask_threshold=127"])


def test_train_saves_its_data_flags_in_the_run_config(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", str(sample_data_path()), "--out", str(run), "--preset", "cpu", "--quiet", "--no-report", "--rle-order", "F"]
    assert (
        main([*args, "--csv", "train_masks.csv", *set_args(*TINY_OVERRIDES, "trainer.max_epochs=1", "trainer.limit_train_batches=1")]) == 0
    )
    saved = read_run_config(run / "config.yaml")
    assert saved.data.rle_order == "F" and saved.data.csv == "train_masks.csv"
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["csv"] == "train_masks.csv"


def test_a_wrong_data_flag_names_the_flag(tmp_path, capsys):
    code = main(["train", str(sample_data_path()), "--out", str(tmp_path / "run"), "--rle-order", "X"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "error: --rle-order: Input should be 'F' or 'C'", err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("order", "dialect"), [("F", "kaggle"), ("C", "row-major")])
def test_a_run_saved_before_rle_dialects_reads_back_in_the_dialect_it_was_trained_in(tmp_path, order, dialect):
    tree = Config(data=DataOptions(rle_order=order, csv="masks.csv")).model_dump(mode="json")
    del tree["data"]["rle_format"]  # what medseg wrote before rle_format was a key
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tree))
    saved = read_run_config(tmp_path / "config.yaml")
    assert saved.data.rle_order == order and saved.data.rle_format == dialect and saved.data.csv == "masks.csv"
    assert saved.data.named_dialect == dialect  # not None: no detection, decoded and written as before


def test_rle_format_is_a_data_key_and_row_major_sets_the_order():
    assert load_config("cpu", overrides=["data.rle_format=siim"]).data.rle_format == "siim"
    assert load_config("cpu", overrides=["data.rle_format=row-major"]).data.rle_order == "C"
    with pytest.raises(UsageError, match="rle_format=kaggle numbers pixels column-major but rle_order=C"):
        load_config("cpu", overrides=["data.rle_format=kaggle", "data.rle_order=C"])
