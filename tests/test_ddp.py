"""Training past one process (issue 33), on this CPU: collectives on the module's device, a failed loss stopping every
rank together, validation counting each frame once under DDP, and DataLoader workers sized from the usable cores.

NCCL (DDP on CUDA) reduces only CUDA tensors; gloo, the only process group here, takes any. So the device rule is
tested with the module on PyTorch's ``meta`` device and a strategy that refuses a tensor on another device.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import cv2
import pytest
import torch

from conftest import TINY_OVERRIDES, set_args
from medseg import ranks, runs
from medseg.cli import main
from medseg.config import load_config
from medseg.data.datasets import sample_data_path
from medseg.learn import datamodule as datamodule_module
from medseg.learn import fit, launch
from medseg.learn.callbacks import EpochMetricsWriter
from medseg.learn.datamodule import EqualValidationSampler, num_workers, one_thread_per_worker
from medseg.learn.models import create_model
from medseg.learn.module import NonFiniteLossError, SegmentationModule


class DeviceCheckingStrategy:
    """A Lightning strategy's ``reduce``, refusing (as NCCL does) a tensor that is not on the module's device."""

    def __init__(self, device: torch.device, answer: torch.Tensor) -> None:
        self.device, self.answer, self.reduced = device, answer, []

    def reduce(self, tensor: torch.Tensor, reduce_op: str = "sum") -> torch.Tensor:
        assert tensor.device == self.device, f"a {tensor.device} tensor handed to a collective of a module on {self.device}"
        self.reduced.append(reduce_op)
        return self.answer


def meta_module(answer: torch.Tensor, device: str = "meta", **trainer: object) -> tuple[SegmentationModule, SimpleNamespace]:
    """A module on ``device`` (PyTorch's ``meta`` by default), attached to a stand-in trainer whose strategy checks devices."""
    config = load_config("cpu", overrides=[*TINY_OVERRIDES])
    module = SegmentationModule(create_model(config.model)[0], config).to(device)
    module._reset_epoch_sums()
    fake = SimpleNamespace(
        strategy=DeviceCheckingStrategy(module.device, answer),
        sanity_checking=False,
        current_epoch=0,
        callback_metrics={},
        optimizers=[SimpleNamespace(param_groups=[{"lr": 1e-3}])],
        is_global_zero=False,
        datamodule=None,
        **trainer,
    )
    module.trainer = fake
    return module, fake


def test_every_tensor_handed_to_a_collective_is_on_the_modules_device(tmp_path):
    module, trainer = meta_module(torch.tensor([0.0, 0.0]))
    assert module.device.type == "meta"
    EpochMetricsWriter(tmp_path / "metrics.csv").on_validation_end(trainer, module)  # the epoch's training loss, summed
    trainer.strategy.answer = torch.tensor(float("inf"))
    module._stop_if_training_loss_failed()  # whether any rank's loss failed
    trainer.strategy.answer = torch.zeros(4)
    module.on_validation_epoch_end()  # the validation sums
    assert trainer.strategy.reduced == ["sum", "min", "sum"]


def test_a_strategy_that_checks_devices_refuses_a_cpu_tensor():
    strategy = DeviceCheckingStrategy(torch.device("meta"), torch.zeros(2))
    with pytest.raises(AssertionError, match="a cpu tensor handed to a collective"):
        strategy.reduce(torch.tensor([1.0, 2.0]))


def test_a_failed_loss_on_another_rank_stops_this_one_at_the_same_check():
    module, _ = meta_module(torch.tensor(4.0), device="cpu", global_step=5)
    with pytest.raises(NonFiniteLossError, match="training loss is not finite on another process at epoch 1, step 5"):
        module._stop_if_training_loss_failed()


@pytest.mark.parametrize(("frames", "ranks"), [(5, 2), (6, 2), (7, 3), (2, 4), (1, 2)])
def test_validation_ranks_get_equal_batches_and_count_each_frame_once(frames, ranks):
    dataset = list(range(frames))
    samplers = [EqualValidationSampler(dataset, ranks, rank) for rank in range(ranks)]
    shares = [list(sampler) for sampler in samplers]
    assert len({len(share) for share in shares}) == 1  # DDP's forward syncs buffers: every rank runs the same batches
    real = [share[: sampler.real_samples] for share, sampler in zip(shares, samplers, strict=True)]
    assert sorted(index for share in real for index in share) == dataset  # each frame once, the padding last


def test_the_padding_of_a_validation_batch_is_left_out_of_the_sums():
    config = load_config("cpu", overrides=[*TINY_OVERRIDES, "trainer.batch_size=2"])
    module = SegmentationModule(create_model(config.model)[0], config).eval()
    module.trainer = SimpleNamespace(datamodule=SimpleNamespace(val_frames_here=3))
    frames, masks = torch.randint(0, 255, (2, 1, 64, 96), dtype=torch.uint8), torch.zeros(2, 1, 64, 96, dtype=torch.uint8)
    with torch.no_grad():
        for batch_idx in range(2):  # frames 0-1 real; of the second batch only the first: its second is padding
            module.validation_step((frames, masks), batch_idx)
    assert module.val_frames == 3 and sum(len(counts) for counts in module.val_counts) == 3


def test_workers_come_from_the_usable_cores_shared_among_the_ranks(monkeypatch):
    monkeypatch.setattr(datamodule_module, "uses_cuda", lambda config: True)
    monkeypatch.setattr(datamodule_module, "augments_on_device", lambda config: False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    config = load_config("default")
    assert num_workers(config) == 15 and num_workers(config, validation=True) == 2
    assert num_workers(config, local_ranks=8) == 1 and num_workers(config, local_ranks=16) == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)  # a container limited to 4 cores
    assert num_workers(config) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr(datamodule_module, "augments_on_device", lambda config: True)  # workers only batch uint8 frames
    assert num_workers(config) == 4
    assert num_workers(load_config("default", overrides=["trainer.num_workers=7"]), local_ranks=8) == 7


def test_the_cpu_trains_in_its_main_process():
    assert num_workers(load_config("cpu", overrides=["trainer.accelerator=cpu"])) == 0


def test_each_worker_runs_opencv_on_one_thread():
    threads = cv2.getNumThreads()
    try:
        one_thread_per_worker(0)
        assert cv2.getNumThreads() == 1
    finally:
        cv2.setNumThreads(threads)


NAN_ON_RANK_ONE = """
import os, sys
import medseg.learn.module as module

real = module.create_loss


def create(config):
    loss = real(config)

    def failing_on_rank_one(outputs, masks):
        value = loss(outputs, masks)
        return value * float("nan") if os.environ.get("LOCAL_RANK") == "1" else value

    return failing_on_rank_one


module.create_loss = create
from medseg.cli import entry

entry()
"""


def test_a_nan_loss_on_one_rank_stops_every_rank_within_seconds(tmp_path):
    script = tmp_path / "medseg_nan_on_rank_one.py"
    script.write_text(NAN_ON_RANK_ONE)
    run = tmp_path / "run"
    command = [sys.executable, str(script), "train", str(sample_data_path()), "--out", str(run), "--preset", "cpu", "--quiet"]
    command += ["--no-report", "--devices", "2", "--strategy", "ddp", *set_args(*TINY_OVERRIDES, "trainer.max_epochs=2")]
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "PL_DISABLE_FORK": "1"}, check=False)
    seconds = time.monotonic() - start
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert all("at epoch 1, step 1" in line and "training stopped" in line for line in errors), errors
    assert seconds < 120, f"{seconds:.0f} s: a rank waited for the others"
    assert not (Path(run) / "checkpoints" / "last.ckpt").exists()


# Runs the console script in a process started by torchrun or as a SLURM task, recording each file it moves into place
# (every write of medseg and of its checkpoints ends in os.replace) in MEDSEG_TEST_WRITES.RANK.
RECORDING_WRITES = """
import os, sys
rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
real_replace = os.replace

def recording(source, target, *args, **kwargs):
    with open(os.environ["MEDSEG_TEST_WRITES"] + "." + rank, "a") as log:
        log.write(f"{target}\\n")
    return real_replace(source, target, *args, **kwargs)

os.replace = recording
from medseg.cli import entry

sys.argv[0] = "medseg"
entry()
"""
EPOCHS = 2


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train_arguments(run: Path, *extra: str) -> list[str]:
    arguments = ["train", str(sample_data_path()), "--out", str(run), "--preset", "cpu", "--quiet", "--no-report", *extra]
    return arguments + set_args(*TINY_OVERRIDES, f"trainer.max_epochs={EPOCHS}", "trainer.early_stopping_patience=50")


def two_nodes(tmp_path: Path, launch: Callable[[int, int], tuple[list[str], dict[str, str]]]) -> Path:
    """Train one run as two one-process "nodes" on loopback, each started by ``launch(node, port)`` (its command and
    environment); check both exit 0 and that only rank 0 wrote a file."""
    script, run, writes = tmp_path / "medseg_recording.py", tmp_path / "run", tmp_path / "writes"
    script.write_text(RECORDING_WRITES)
    port = free_port()
    processes = []
    for node in (0, 1):
        command, environment = launch(node, port)
        environment = {**os.environ, **environment, "MEDSEG_TEST_WRITES": str(writes), "PL_DISABLE_FORK": "1"}
        command = [arg.replace("SCRIPT", str(script)).replace("RUN", str(run)) for arg in command]
        processes.append(subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], "\n".join(output[-2000:] for output in outputs)
    written = Path(f"{writes}.0").read_text().splitlines()
    assert str(run / "run.json") in written and str(run / "checkpoints" / "last.ckpt") in written
    assert not Path(f"{writes}.1").exists(), f"rank 1 wrote {Path(f'{writes}.1').read_text()}"
    return run


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory) -> Path:
    """The same run trained by one process with twice the batch (two ranks of 8 frames average their gradients)."""
    run = tmp_path_factory.mktemp("one") / "run"
    result = subprocess.run(
        [sys.executable, "-m", "medseg.cli", *train_arguments(run, "--set", "trainer.batch_size=16")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return run


def assert_like_one_process(run: Path, one: Path) -> None:
    """The same files, split and epochs as a one-process run, and scores within 0.25: BatchNorm's statistics come
    from 8 frames a rank there against 16, and the random initial weights are the same."""
    assert sorted(path.name for path in run.iterdir() if path.name != "tensorboard") == sorted(
        path.name for path in one.iterdir() if path.name != "tensorboard"
    )
    assert (run / "split.json").read_bytes() == (one / "split.json").read_bytes()
    rows, single = runs.read_metrics(run / "metrics.csv"), runs.read_metrics(one / "metrics.csv")
    assert [row["epoch"] for row in rows] == [row["epoch"] for row in single] == [str(e) for e in range(1, EPOCHS + 1)]
    for row, other in zip(rows, single, strict=True):
        assert abs(float(row["val_score"]) - float(other["val_score"])) <= 0.25, (row, other)
        assert math.isfinite(float(row["val_loss"])) and math.isfinite(float(row["train_loss"]))
    runs.FoldResult.read(run / runs.DONE_FILE)
    for checkpoint in (run / "checkpoints").glob("*.ckpt"):
        assert "state_dict" in torch.load(checkpoint, map_location="cpu", weights_only=False)


def test_two_nodes_started_by_torchrun_write_the_run_once_and_train_it_like_one_process(tmp_path, one_process_run):
    def torchrun(node: int, port: int) -> tuple[list[str], dict[str, str]]:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node)]
        launcher += ["--master-addr", "127.0.0.1", "--master-port", str(port), "SCRIPT"]
        return [*launcher, *train_arguments(Path("RUN"), "--devices", "1", "--num-nodes", "2", "--strategy", "ddp")], {}

    assert_like_one_process(two_nodes(tmp_path, torchrun), one_process_run)


def test_two_slurm_tasks_write_the_run_once_and_train_it_like_one_process(tmp_path, one_process_run):
    def slurm_task(node: int, port: int) -> tuple[list[str], dict[str, str]]:
        environment = {
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NAME": "medseg-test",
            "SLURM_NTASKS": "2",
            "SLURM_STEP_NUM_TASKS": "2",
            "SLURM_NTASKS_PER_NODE": "1",
            "SLURM_PROCID": str(node),
            "SLURM_LOCALID": "0",
            "SLURM_NODEID": str(node),
            "SLURM_NODELIST": "127.0.0.1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        command = [sys.executable, "SCRIPT", *train_arguments(Path("RUN"), "--devices", "1", "--num-nodes", "2", "--strategy", "ddp")]
        return command, environment

    assert_like_one_process(two_nodes(tmp_path, slurm_task), one_process_run)


LAUNCH_VARIABLES = ("RANK", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


@pytest.mark.parametrize(
    ("variables", "zero", "prefix"),
    [
        ({}, True, ""),
        ({"RANK": "0", "LOCAL_RANK": "0"}, True, ""),
        ({"RANK": "3", "LOCAL_RANK": "1"}, False, "rank 3: "),
        ({"SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "2"}, False, "rank 2: "),
        ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, True, ""),  # one sbatch task: no srun launch of several
        ({"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}, True, ""),  # a batch script of a 4-task job, without srun
        ({"LOCAL_RANK": "1"}, False, "node 0, local rank 1: "),  # a process Lightning's launcher started
        ({"NODE_RANK": "1"}, False, "node 1, local rank 0: "),  # the first process of the second machine
        ({"GROUP_RANK": "1", "LOCAL_RANK": "0"}, False, "node 1, local rank 0: "),
    ],
)
def test_the_launchers_variables_tell_rank_zero_from_the_others(variables, zero, prefix, monkeypatch):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert ranks.is_rank_zero() is zero and fit.is_ddp_child() is not zero
    assert ranks.rank_prefix() == prefix


def test_another_ranks_error_line_says_which_rank(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("RANK", "1")
    assert main(["tune", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: rank 1: ")


def test_a_batch_script_of_a_multi_task_job_joins_no_process_group(monkeypatch):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "4")  # sbatch --ntasks 4, and medseg run in the script without srun
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    assert launch.launched_together() is None and ranks.is_rank_zero()
