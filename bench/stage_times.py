"""What the stages after training cost: ``tune``, ``report`` and ``evaluate RUN DATA`` on a trained run, and the whole
``train --folds N`` (which tunes and reports at its end), for two versions of medseg side by side.

Each arm runs in its own process with ``PYTHONPATH`` set to one version's ``src/``: ``before`` a git commit (checked out
into a temporary worktree), ``after`` this checkout. Per arm: ``train DATA --folds N --preset P`` timed whole, then
``tune RUN --force --no-report``, ``report RUN`` and ``evaluate RUN DATA --force`` timed one by one on the same run. Every
stage's frames predicted are counted (the ensemble's per-batch function is wrapped), so the table shows how often each
held-out frame was predicted; the last line gives the ratios before / after.

    python bench/stage_times.py --before 75d4ceb --folds 5 --preset cpu   # both arms: 30 min on 2 idle cores (7 with 3 epochs)
    python bench/stage_times.py --arm-only after --folds 2 --set trainer.max_epochs=1   # one arm, a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
STAGES = ("train", "tune", "report", "evaluate")

# Run in the arm's process: time one medseg command in-process, counting the frames the ensemble predicts.
_ARM = """
import json, sys, time
import medseg.infer.predict as predict
counted = [0]
original = predict._probs
def counting(prob_fn, frames, *args, **kwargs):
    counted[0] += len(frames)
    return original(prob_fn, frames, *args, **kwargs)
predict._probs = counting
from medseg.cli import main
start = time.perf_counter()
code = main(sys.argv[1:])
print(json.dumps({"seconds": time.perf_counter() - start, "predicted": counted[0], "code": code}))
"""


def run_stage(src: Path, arguments: list[str], log: Path) -> dict:
    """One medseg command in a fresh process on the code in ``src``: its seconds, frames predicted and exit code."""
    environment = {**os.environ, "PYTHONPATH": str(src)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "a") as stream:
        stream.write(f"$ medseg {' '.join(arguments)}\n")
        stream.flush()
        done = subprocess.run(
            [sys.executable, "-c", _ARM, *arguments], env=environment, stdout=subprocess.PIPE, stderr=stream, text=True, check=False
        )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["cpu_seconds"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if result["code"] != 0:
        raise SystemExit(f"medseg {' '.join(arguments)} exited {result['code']}; see {log}")
    return result


def run_arm(name: str, src: Path, data: Path, out: Path, folds: int, preset: str, overrides: list[str]) -> dict:
    """Train a run with one version of medseg, then time its stages after training."""
    run = out / name / "run"
    log = out / f"{name}.log"
    sets = [item for key in overrides for item in ("--set", key)]
    train = ["train", str(data), "--out", str(run), "--folds", str(folds), "--preset", preset, "--force", *sets]
    stages = {"train": run_stage(src, train, log)}
    stages["tune"] = run_stage(src, ["tune", str(run), "--force", "--no-report"], log)
    stages["report"] = run_stage(src, ["report", str(run)], log)
    stages["evaluate"] = run_stage(src, ["evaluate", str(run), str(data), "--force"], log)
    for stage, result in stages.items():
        print(
            f"{name:<7} {stage:<9} {result['seconds']:8.1f} s wall {result['cpu_seconds']:8.1f} s CPU "
            f"{result['predicted']:5d} frames predicted",
            flush=True,
        )
    return stages


def worktree(commit: str, folder: Path) -> Path:
    """The ``src/`` of ``commit``, checked out into ``folder``."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder), commit], check=True, capture_output=True)
    return folder / "src"


def table(arms: dict[str, dict]) -> str:
    """Each arm's wall and CPU seconds and frames predicted per stage, the three stages after training together, and
    the ratios (CPU seconds are the fairer figure on a shared machine)."""
    lines = [f"{'stage':<22}" + "".join(f"{name + ' wall s':>14}{name + ' CPU s':>13}{name + ' frames':>15}" for name in arms)]
    for stage in STAGES:
        cells = "".join(
            f"{arm[stage]['seconds']:>14.1f}{arm[stage]['cpu_seconds']:>13.1f}{arm[stage]['predicted']:>15d}" for arm in arms.values()
        )
        lines.append(f"{stage:<22}" + cells)
    after = {name: {key: sum(arm[stage][key] for stage in STAGES[1:]) for key in ("seconds", "cpu_seconds")} for name, arm in arms.items()}
    lines.append(
        f"{'tune+report+evaluate':<22}"
        + "".join(f"{after[name]['seconds']:>14.1f}{after[name]['cpu_seconds']:>13.1f}{'':>15}" for name in arms)
    )
    if {"before", "after"} <= set(arms):
        for key, label in (("seconds", "wall"), ("cpu_seconds", "CPU")):
            ratio = after["before"][key] / after["after"][key]
            whole = arms["before"]["train"][key] / arms["after"]["train"][key]
            lines.append(f"before / after ({label}): tune+report+evaluate {ratio:.2f}x, whole train {whole:.2f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED / "uns-mini", help="Labelled data folder (default: uns-mini).")
    parser.add_argument("--before", default=None, help="Git commit of the 'before' arm (left out: only this checkout).")
    parser.add_argument("--after-src", type=Path, default=ROOT / "src", help="The 'after' arm's src/ (default: this checkout's).")
    parser.add_argument("--arm-only", choices=("before", "after"), default=None, help="Run one arm only.")
    parser.add_argument("--folds", type=int, default=5, help="Folds of the run (train --folds N).")
    parser.add_argument("--preset", default="cpu", help="Preset of the run (train --preset).")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="A configuration override (repeatable)."
    )
    parser.add_argument("--out", type=Path, default=None, help="Working folder (default: a temporary one, removed at the end).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures here.")
    options = parser.parse_args()
    out = options.out or Path(tempfile.mkdtemp(prefix="medseg-stage-times-"))
    out.mkdir(parents=True, exist_ok=True)
    sources = {}
    if options.before and options.arm_only != "after":
        sources["before"] = worktree(options.before, out / "before-src")
    if options.arm_only != "before":
        sources["after"] = options.after_src.resolve()
    try:
        data = options.data.resolve()
        arms = {name: run_arm(name, src, data, out, options.folds, options.preset, options.overrides) for name, src in sources.items()}
    finally:
        if "before" in sources:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(out / "before-src")], check=False)
    print(table(arms))
    if options.json:
        options.json.write_text(json.dumps(arms, indent=2) + "\n")
    if options.out is None:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
