"""Processes a launcher outside medseg started together (torchrun, SLURM's ``srun``): rank 0 prepares the run folder,
the others wait for it and then read it.

Lightning's own launcher starts the other processes only when training begins, after rank 0 has written the run
folder, so they need not wait. torchrun and ``srun`` start every process at once: without a word from rank 0, the
others would read a run folder being replaced, or not yet written. So they join the launch's process group early (the
one Lightning's DDP then uses: :func:`join`), and rank 0 tells them, in one broadcast, that the folder is ready or
why it stopped (:func:`telling_ranks`); they stop with the same reason instead of waiting for the collective timeout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment, TorchElasticEnvironment

from medseg.errors import MedsegError
from medseg.files import first_line
from medseg.ranks import srun_tasks

TIMEOUT = timedelta(minutes=30)  # how long a rank waits for rank 0 to load and split the data and write the run folder


def launched_together() -> ClusterEnvironment | None:
    """The cluster environment of a launch of several processes by torchrun or ``srun``, else ``None``.

    A SLURM batch script that runs medseg without ``srun`` is one process, whatever ``SLURM_NTASKS`` its job asked for
    (Lightning's SLURM detection looks at that variable alone): it joins nothing.
    """
    if TorchElasticEnvironment.detect():
        found = TorchElasticEnvironment()
    elif SLURMEnvironment.detect() and srun_tasks() > 1:
        found = SLURMEnvironment()
    else:
        return None
    return found if found.world_size() > 1 else None


def join(environment: ClusterEnvironment) -> None:
    """Join the launch's process group (Lightning's DDP then uses it instead of making its own).

    Collectives of CPU tensors go through gloo and of CUDA tensors through NCCL where there is CUDA.
    """
    if dist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(
        backend,
        init_method=f"tcp://{environment.main_address}:{environment.main_port}",
        rank=environment.global_rank(),
        world_size=environment.world_size(),
        timeout=TIMEOUT,
    )


@contextlib.contextmanager
def telling_ranks(environment: ClusterEnvironment | None) -> Iterator[None]:
    """On rank 0: run the block (checking and writing the run folder), then tell the other ranks it is ready, or why it
    stopped (and stop here too). Nothing to tell without a launch of several processes."""
    if environment is None:
        yield
        return
    join(environment)
    try:
        yield
    except BaseException as error:
        _broadcast(first_line(error) if isinstance(error, Exception) else type(error).__name__)
        raise
    _broadcast(None)


def wait_for_rank_zero(environment: ClusterEnvironment | None) -> None:
    """On the other ranks: wait until rank 0 has the run folder ready.

    Raises:
        MedsegError: With rank 0's reason, when it stopped.
    """
    if environment is None:
        return
    join(environment)
    reason = _broadcast(None)
    if reason is not None:
        raise MedsegError(f"rank 0 stopped before training: {reason}")


def _broadcast(reason: str | None) -> str | None:
    """Rank 0's ``reason`` (``None``: the run folder is ready), on every rank."""
    message = [reason]
    dist.broadcast_object_list(message, src=0)
    return message[0]


def agree_with_rank_zero(decision: str | None, local: str) -> str:
    """Rank 0's ``decision`` on every rank, so that all train the same fold or all stop.

    Broadcast when a process group exists (torchrun and srun ranks join one before training; Lightning's own launcher's
    ranks have one from their first fold on). Before that, Lightning's launcher has started no other process yet: rank
    0 decides alone, and a process without a group (one that decides nothing) takes ``local``.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _broadcast(decision)
    return local if decision is None else decision
