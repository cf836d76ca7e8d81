"""Which process of a distributed training this is, from the variables its launcher set; no PyTorch needed.

Launchers name a process's place differently: torchrun sets ``RANK`` (and ``GROUP_RANK`` for its machine), SLURM's
``srun`` sets ``SLURM_PROCID`` for each of the ``SLURM_STEP_NUM_TASKS`` tasks of its job step (a batch script run
without ``srun`` is one task, whatever ``SLURM_NTASKS`` the job asked for), and Lightning's own launcher starts the other
processes of a machine with ``LOCAL_RANK`` and the other machines' first processes with ``NODE_RANK``. Only global
rank 0 writes a run folder; the others read what it wrote.
"""

from __future__ import annotations

import os


def _number(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() else None


def global_rank() -> int | None:
    """This process's global rank where a launcher says it directly (``RANK``, or ``SLURM_PROCID`` of an ``srun`` step
    of several tasks), else ``None``."""
    rank = _number("RANK")
    if rank is not None:
        return rank
    return _number("SLURM_PROCID") if srun_tasks() > 1 else None


def srun_tasks() -> int:
    """The tasks of the SLURM job step this process is one of (``srun``); 1 outside SLURM or in a batch script."""
    return _number("SLURM_STEP_NUM_TASKS") or 1


def is_rank_zero() -> bool:
    """Whether this process is global rank 0: the one that checks, writes and reports the run (also when no launcher
    started it: a plain ``medseg train``)."""
    rank = global_rank()
    if rank is not None:
        return rank == 0
    return all(_number(name) in (None, 0) for name in ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK"))


def rank_prefix() -> str:
    """``rank K: `` for a process other than rank 0 (so that its lines are told from rank 0's), else nothing."""
    if is_rank_zero():
        return ""
    rank = global_rank()
    if rank is not None:
        return f"rank {rank}: "
    return f"node {_number('NODE_RANK') or _number('GROUP_RANK') or 0}, local rank {_number('LOCAL_RANK') or 0}: "
