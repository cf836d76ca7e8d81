"""Three ways to train the folds of one run, side by side: one process (``train --folds N``), N-process DDP on each fold
(``--devices N --strategy ddp``, each rank half the batch so that a step sees the same frames), and one process per
fold in parallel (``--plan-only``, then ``--resume --fold K`` at once). Each arm trains the same data and settings and
is then tuned; the table gives the wall time of the training and the cross-fitted score of the tuning.

On a CPU the processes share its cores (each parallel process gets ``cores / N`` PyTorch threads): what parallelism
buys here is small, the point is that each way is correct. On a machine with a GPU per process it is what scales.

    python bench/parallel_training.py --folds 2 --set trainer.max_epochs=10   # about 10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def medseg(*args: str, threads: int) -> subprocess.Popen:
    """A ``medseg`` process with ``threads`` PyTorch threads; its output goes to the bench's log."""
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "src"), "PL_DISABLE_FORK": "1"}
    command = [sys.executable, "-m", "medseg.cli", *args]
    return subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait(processes: list[subprocess.Popen], log: Path) -> None:
    """Wait for every process; stop the bench with its output when one failed."""
    with open(log, "a") as stream:
        for process in processes:
            output = process.communicate()[0]
            stream.write(output)
            if process.returncode != 0:
                raise SystemExit(f"{' '.join(process.args[2:])} failed:\n{output[-3000:]}")


def arm(name: str, data: Path, run: Path, folds: int, settings: list[str], log: Path, cores: int) -> dict:
    """Train ``run`` one way, tune it, and give the training's wall time and the cross-fitted score."""
    train = ["train", str(data), "--out", str(run), "--preset", "cpu", "--no-report", "--quiet", *settings]
    start = time.perf_counter()
    if name == "one process":
        wait([medseg(*train, "--folds", str(folds), threads=cores)], log)
    elif name == "DDP":
        wait([medseg(*train, "--folds", str(folds), "--devices", str(folds), "--strategy", "ddp", threads=max(1, cores // folds))], log)
    else:
        wait([medseg(*train, "--folds", str(folds), "--plan-only", threads=cores)], log)
        start = time.perf_counter()  # the plan is written before the folds start: the scheduler's job
        base = ["train", str(data), "--out", str(run), "--resume", "--no-report", "--quiet"]
        wait([medseg(*base, "--fold", str(k), threads=max(1, cores // folds)) for k in range(folds)], log)
    seconds = time.perf_counter() - start
    wait([medseg("tune", str(run), "--no-report", "--quiet", threads=cores)], log)
    tuning = json.loads((run / "postprocess.json").read_text())
    return {"arm": name, "seconds": seconds, "cross_fitted": tuning.get("cross_fitted"), "score_after": tuning.get("score_after")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SHARED / "uns-mini", help="Labelled data folder (default: uns-mini).")
    parser.add_argument("--folds", type=int, default=2, help="Folds of the run, and processes of the parallel arms.")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="A configuration override.")
    parser.add_argument("--batch", type=int, default=16, help="Frames a training step sees (DDP: split among its ranks).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures here.")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    work = Path(tempfile.mkdtemp(prefix="medseg-parallel-"))
    log = work / "bench.log"
    settings = [item for override in args.overrides for item in ("--set", override)]
    results = []
    try:
        for name in ("one process", "DDP", "fold processes"):
            batch = args.batch // args.folds if name == "DDP" else args.batch
            arm_settings = [*settings, "--set", f"trainer.batch_size={batch}", "--set", "trainer.accelerator=cpu"]
            results.append(arm(name, args.data, work / name.replace(" ", "-"), args.folds, arm_settings, log, cores))
            print(json.dumps(results[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'arm':<16}{'training wall s':>16}{'cross-fitted':>14}{'tuned score':>13}")
    for row in results:
        crossed, tuned = (float("nan") if row[key] is None else row[key] for key in ("cross_fitted", "score_after"))
        print(f"{row['arm']:<16}{row['seconds']:>16.1f}{crossed:>14.4f}{tuned:>13.4f}")
    one = results[0]["seconds"]
    print("one process / arm (wall): " + ", ".join(f"{row['arm']} {one / row['seconds']:.2f}x" for row in results[1:]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
