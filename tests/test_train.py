"""`medseg train` end to end on the CPU with tiny settings: run files, resume, force, NaN, DDP."""

from __future__ import annotations

import csv
import itertools
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from conftest import constant_loss
from medseg import devices, runs
from medseg.cli import main
from medseg.config import load_config, read_run_config
from medseg.data.datasets import sample_data_path
from medseg.learn import fit
from medseg.learn import module as engine_module
from medseg.learn.module import NonFiniteLossError
from medseg.learn.train import TrainRequest, train_run

TINY = ["input.height=64", "input.width=96", "trainer.batch_size=8", "model.encoder_weights=none", "trainer.accelerator=cpu"]


def tiny_config(*extra: str):
    return load_config("cpu", overrides=[*TINY, *extra])


def metric_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def uns_mini_run(tiny_uns_run):
    return tiny_uns_run


def test_train_writes_every_run_file(uns_mini_run):
    for name in ("config.yaml", "split.json", "metrics.csv", "versions.json", "run.json", "done.json"):
        assert (uns_mini_run / name).is_file(), name
    assert (uns_mini_run / "checkpoints" / "best.ckpt").is_file()
    assert (uns_mini_run / "checkpoints" / "last.ckpt").is_file()
    rows = metric_rows(uns_mini_run / "metrics.csv")
    assert [row["epoch"] for row in rows] == ["1", "2"]
    for row in rows:
        for column in ("train_loss", "val_loss", "val_score", "lr", "images_per_s"):
            assert math.isfinite(float(row[column])), column
        assert 0.0 <= float(row["val_score"]) <= 1.0
    optim = read_run_config(uns_mini_run / "config.yaml").optim
    assert optim.schedule == "cosine"
    floor = optim.lr * optim.cosine_floor
    assert [float(row["lr"]) for row in rows] == pytest.approx([floor + (optim.lr - floor) / 2, floor])


def test_run_files_hold_the_resolved_config_split_and_versions(uns_mini_run):
    config = yaml.safe_load((uns_mini_run / "config.yaml").read_text())
    assert config["trainer"]["max_epochs"] == 2 and config["model"]["encoder"] == "resnet18"
    assert config["input"] == {"height": 64, "width": 96}
    split = runs.read_json(uns_mini_run / "split.json")
    assert split["n_folds"] == 5 and sum(len(fold) for fold in split["folds"]) == 253
    assert runs.read_json(uns_mini_run / "run.json")["excluded"] == {} and config["data"]["exclude"] is None
    versions = runs.read_json(uns_mini_run / "versions.json")
    for key in ("python", "torch", "segmentation-models-pytorch", "lightning", "cuda", "gpu"):
        assert key in versions
    assert versions["encoder_weights"]["used"] == "random"
    checkpoint = torch.load(uns_mini_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["epoch"] == 1 and checkpoint["hyper_parameters"]["config"]["input"]["height"] == 64
    best_epoch = min(range(2), key=lambda e: float(metric_rows(uns_mini_run / "metrics.csv")[e]["val_loss"]))
    best = torch.load(uns_mini_run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert best["epoch"] == best_epoch and "optimizer_states" not in best and "optimizer_states" in checkpoint
    assert (uns_mini_run / "checkpoints" / "best.ckpt").stat().st_size < (uns_mini_run / "checkpoints" / "last.ckpt").stat().st_size / 2


def test_non_empty_run_folder_needs_force(uns_mini_run, capsys):
    sample = str(sample_data_path())
    args = ["train", sample, "--out", str(uns_mini_run), "--preset", "cpu", "--quiet"]
    assert main(args) == 2
    assert "--force" in capsys.readouterr().err
    assert (uns_mini_run / "checkpoints" / "last.ckpt").is_file()


def test_force_replaces_the_run(tiny_sample_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_sample_run, run)  # the earlier run: 2 epochs on the sample
    assert len(metric_rows(run / "metrics.csv")) == 2
    base = ["train", str(sample_data_path()), "--out", str(run), "--preset", "cpu", "--quiet", "--no-report"]
    base += [item for override in [*TINY, "trainer.max_epochs=1"] for item in ("--set", override)]
    (run / "postprocess.json").write_text('{"threshold": 0.5, "min_area": 0}\n')  # the earlier run's tuning: medseg's own file
    assert main(base) == 2
    assert main([*base, "--force"]) == 0
    assert not (run / "postprocess.json").exists()
    assert len(metric_rows(run / "metrics.csv")) == 1


def test_force_refuses_to_delete_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["train", str(sample_data_path()), "--out", str(tmp_path), "--force", "--quiet"]) == 2
    assert "not a medseg run folder" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me"


class StopAfterFirstEpoch(Callback):
    """Stands for a killed process: raises as the second epoch starts, the first one's checkpoint on disk."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            raise RuntimeError("killed after epoch 1")


class FirstEpochSeen(Callback):
    def __init__(self):
        self.first = None

    def on_train_epoch_start(self, trainer, pl_module):
        if self.first is None:
            self.first = trainer.current_epoch


def test_resume_continues_from_the_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    config = tiny_config("trainer.max_epochs=3")
    with pytest.raises(RuntimeError, match="killed"):
        train_run(TrainRequest(sample_data_path(), run, config), on_message=lambda line: None, extra_callbacks=[StopAfterFirstEpoch()])
    assert len(metric_rows(run / "metrics.csv")) == 1 and not (run / "done.json").exists()
    seen = FirstEpochSeen()
    trained = train_run(TrainRequest(sample_data_path(), run, config), resume=True, on_message=lambda line: None, extra_callbacks=[seen])
    results = trained.results
    assert seen.first == 1  # epoch 2 of 3: not from scratch
    assert [row["epoch"] for row in metric_rows(run / "metrics.csv")] == ["1", "2", "3"]
    assert results[0].epochs == 3 and (run / "done.json").is_file()


def test_resume_of_a_finished_fold_skips_it(two_fold_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_fold_run, run)  # both folds trained for their one epoch
    config = tiny_config("trainer.max_epochs=1")
    assert (run / "fold_0" / "done.json").is_file() and (run / "fold_1" / "done.json").is_file()
    written = sorted((path, path.stat().st_mtime_ns) for path in run.rglob("*.ckpt"))
    messages = []
    train_run(TrainRequest(two_fold_run.parent / "data", run, config), resume=True, on_message=messages.append)
    assert sorted((path, path.stat().st_mtime_ns) for path in run.rglob("*.ckpt")) == written  # no checkpoint written again
    assert sum("already trained" in line and "skipped" in line for line in messages) == 2
    split = runs.read_json(run / "split.json")
    assert split["n_folds"] == 2


class PoisonWeights(Callback):
    """Makes every weight NaN at the start of the second epoch."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            with torch.no_grad():
                for parameter in pl_module.model.parameters():
                    parameter.fill_(float("nan"))


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    config = tiny_config("trainer.max_epochs=3")
    with pytest.raises(NonFiniteLossError, match="loss is nan at epoch 2"):
        train_run(TrainRequest(sample_data_path(), run, config), on_message=lambda line: None, extra_callbacks=[PoisonWeights()])
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["epoch"] == 0
    assert all(torch.isfinite(value).all() for value in checkpoint["state_dict"].values() if value.is_floating_point())
    assert not (run / "done.json").exists()


def test_nan_through_the_cli_is_one_line(tmp_path, capsys, monkeypatch):

    monkeypatch.setattr(engine_module, "create_loss", constant_loss(float("inf")))
    args = ["train", str(sample_data_path()), "--out", str(tmp_path / "run"), "--preset", "cpu", "--quiet"]
    args += [item for override in TINY for item in ("--set", override)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "training loss is inf" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("override", "message"),
    [("trainer.max_epoch=2", "unknown config key 'trainer.max_epoch'"), ("trainer.max_epochs=two", "valid integer")],
)
def test_config_mistakes_are_usage_errors(tmp_path, capsys, override, message):
    assert main(["train", str(sample_data_path()), "--out", str(tmp_path / "r"), "--set", override]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_data_problems_stop_training_before_it_starts(tmp_path, capsys, small_kaggle_copy):
    root = small_kaggle_copy()
    (root / "train" / "1_1_mask.tif").unlink()
    rows = (root / "train_masks.csv").read_text().splitlines()
    (root / "train_masks.csv").write_text("\n".join(line for line in rows if not line.startswith("1,1,")) + "\n")
    assert main(["train", str(root), "--out", str(tmp_path / "run"), "--preset", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "1_1.tif" in err and "medseg inspect" in err


def test_auto_weights_offline_train_from_random_init_and_record_why(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    config = load_config("cpu", overrides=[*TINY[:-2], "trainer.accelerator=cpu", "trainer.max_epochs=1", "model.encoder_weights=auto"])
    with pytest.warns(UserWarning, match="random initialisation"):
        train_run(TrainRequest(sample_data_path(), tmp_path / "run", config), on_message=lambda line: None)
    weights = runs.read_json(tmp_path / "run" / "versions.json")["encoder_weights"]
    assert weights["requested"] == "auto" and weights["used"] == "random"
    assert "random initialisation" in weights["warning"]


def test_two_process_ddp_on_cpu(tmp_path):
    run = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "medseg.cli",
        "train",
        str(sample_data_path()),
        "--out",
        str(run),
        "--preset",
        "cpu",
        "--quiet",
        "--no-report",
    ]
    command += ["--devices", "2", "--strategy", "ddp"]
    command += [item for override in [*TINY, "trainer.max_epochs=1"] for item in ("--set", override)]
    env = {**os.environ, "PL_DISABLE_FORK": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = metric_rows(run / "metrics.csv")
    assert len(rows) == 1 and math.isfinite(float(rows[0]["val_loss"]))
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_gpu_fast_path_settings_run_on_cpu_tensors(tmp_path):
    config = tiny_config("trainer.max_epochs=1", "trainer.precision=bf16-mixed", "trainer.channels_last=true", "trainer.gradient_clip=1.0")
    results = train_run(TrainRequest(sample_data_path(), tmp_path / "run", config), on_message=lambda line: None).results
    assert results[0].epochs == 1 and math.isfinite(results[0].best_val_loss)
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert all(value.dtype == torch.float32 for value in checkpoint["state_dict"].values() if value.is_floating_point())


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_precision_and_layout_on_a_cpu_follow_its_native_bf16(monkeypatch, native_bf16):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native_bf16)
    config = load_config("cpu", overrides=["trainer.accelerator=cpu"])
    assert devices.precision(config) == ("bf16-mixed" if native_bf16 else "32-true")
    assert devices.uses_channels_last(config) is native_bf16
    pinned = load_config("cpu", overrides=["trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.channels_last=false"])
    assert devices.precision(pinned) == "32-true" and devices.uses_channels_last(pinned) is False


def test_native_bf16_check_agrees_with_the_cpu_flags_the_kernel_reports():
    cpuinfo = Path("/proc/cpuinfo")
    flags_lines = [line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")] if cpuinfo.is_file() else []
    flags = set(flags_lines[0].split(":", 1)[1].split()) if flags_lines else set()
    assert devices.cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})


def test_batch_augmentation_on_the_device_trains_on_cpu_tensors(tmp_path):
    config = tiny_config("trainer.max_epochs=1", "augment.backend=gpu", "augment.elastic.p=1", "augment.coarse_dropout.p=1")
    results = train_run(TrainRequest(sample_data_path(), tmp_path / "run", config), on_message=lambda line: None).results
    assert results[0].epochs == 1 and math.isfinite(results[0].best_val_loss)
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert not any(key.startswith("batch_augment") for key in checkpoint["state_dict"])


def test_cosine_schedule_decays_the_learning_rate_to_its_floor_over_max_epochs():
    from medseg.learn.models import create_model
    from medseg.learn.module import SegmentationModule

    config = tiny_config("optim.schedule=cosine", "optim.lr=1e-3", "optim.cosine_floor=0.01", "trainer.max_epochs=4")
    module = SegmentationModule(create_model(config.model)[0], config)
    settings = module.configure_optimizers()
    optimizer, scheduler = settings["optimizer"], settings["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(4):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert all(a > b for a, b in itertools.pairwise(rates))
    assert rates[-1] == pytest.approx(1e-5)
    assert "monitor" not in settings["lr_scheduler"]


@pytest.mark.parametrize(("epochs_run", "stopped_epoch", "early"), [(17, 16, True), (25, 24, False), (25, 0, False)])
def test_a_fold_stopped_early_only_when_epochs_were_left(tmp_path, epochs_run, stopped_epoch, early):
    """Early stopping that fires on the last epoch of the budget ends nothing early."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import EarlyStopping

    fold_dir = runs.FoldDir(0, tmp_path)
    with open(fold_dir.metrics, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "val_loss", "val_score"])
        writer.writerows([epoch, 1.0 / epoch, 0.5] for epoch in range(1, epochs_run + 1))
    stopper = EarlyStopping("val_loss")
    stopper.stopped_epoch = stopped_epoch
    result = fit._fold_result(SimpleNamespace(callbacks=[stopper], max_epochs=25), fold_dir)
    assert result.epochs == epochs_run and result.stopped_early is early
