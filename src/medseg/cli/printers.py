"""What the commands print: the two consoles, progress and warning lines, and a printer per stage's result.

Results go to stdout; progress messages, warnings and errors to stderr. Nothing here imports PyTorch at module level,
so that ``medseg --help`` and a usage error start without it (tests/test_architecture.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from medseg.runs import POSTPROCESS_FILE, StructuresTuning, Tuning

if TYPE_CHECKING:
    from medseg.data.inspector import Inspection
    from medseg.learn.estimate import TrainingPlan
    from medseg.learn.train import TrainedRun
    from medseg.sweep.study import SweepResult

stdout = Console(highlight=False, soft_wrap=True)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def say(quiet: bool) -> Callable[[str], None]:
    """The stages' ``on_message``: each progress line on stderr, none with ``--quiet``."""
    return (lambda line: None) if quiet else (lambda line: stderr.print(escape(line)))


def warn(line: str) -> None:
    """One ``warning:`` line on stderr, shown with --quiet too."""
    stderr.print(f"[yellow]warning:[/yellow] {escape(line)}")


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """:func:`warnings.showwarning` as one ``warning:`` line, without the source line."""
    warn(str(message))


def inspection_json(inspection: Inspection) -> dict:
    """The inspection as a JSON-serialisable dict."""
    return {
        "summary": inspection.summary,
        "problems": [{"kind": p.kind, "path": str(p.path), "message": p.message} for p in inspection.problems],
    }


def print_inspection(inspection: Inspection) -> None:
    """Print the summary table and the problems."""
    summary = inspection.summary
    stdout.print(_label_table(f"{summary['root']} ({summary['layout']} layout)", _summary_rows(summary)))
    if inspection.ok:
        stdout.print("[green]No problems found.[/green]")
        return
    stdout.print(f"[red]{len(inspection.problems)} problem(s):[/red]")
    for problem in inspection.problems:
        stdout.print(f"  [red]{problem.kind}[/red] {escape(str(problem.path))}: {escape(problem.message)}")


def _label_table(title: str, rows: list[tuple[str, str]]) -> Table:
    """A headerless table of (label, value) rows: labels in bold, values right-aligned."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    for label, value in rows:
        table.add_row(label, value)
    return table


def _summary_rows(summary: dict) -> list[tuple[str, str]]:
    share = summary["empty_share"]
    area = summary["mask_area"]
    rows = [
        ("train images", str(summary["train_images"])),
        ("with a mask (non-empty)", str(summary["non_empty"])),
        ("empty masks", str(summary["empty"])),
        ("empty share", "-" if share is None else f"{share:.1%}"),
        ("subjects", "unknown" if summary["subjects"] is None else str(summary["subjects"])),
        ("image sizes (WxH)", ", ".join(f"{size}: {count}" for size, count in summary["image_sizes"].items()) or "-"),
        ("mask area min / median / max (px)", "-" if area is None else f"{area['min']} / {area['median']:g} / {area['max']}"),
        ("test images", str(summary["test_images"])),
    ]
    if summary["sample_submission"]:
        rows.append(("sample submission rows", str(summary["sample_submission_rows"])))
    for name, facts in (summary.get("classes") or {}).items():
        area = facts["mask_area"]
        areas = "" if area is None else f"; area {area['min']} / {area['median']:g} / {area['max']} px"
        rows.append((f"class {name}: with / without", f"{facts['with']} / {facts['without']}{areas}"))
    for pair, frames in (summary.get("overlapping_frames") or {}).items():
        rows.append((f"frames where {pair} overlap", str(frames)))
    return rows


def print_trained(trained: TrainedRun) -> None:
    """The run folder and how each fold ended."""
    stdout.print(f"run folder: {escape(str(trained.path))}")
    for result in trained.results:
        stdout.print(
            f"  fold {result.fold}: best validation loss {result.best_val_loss:.4f}, "
            f"score {result.best_val_score:.4f} ({result.epochs} epochs)"
        )


def print_untrained(trained: TrainedRun, untrained: list[int], data: Path) -> None:
    """The folds of the run still to train, and how (folds in parallel: one process a fold, then tune)."""
    if not untrained:
        stdout.print(f"every fold of the run is trained: medseg tune {escape(str(trained.path))}")
        return
    folds = ", ".join(map(str, untrained))
    stdout.print(f"still to train: fold(s) {folds} of {len(trained.plan.folds)}; each in its own process (any that sees the folder):")
    stdout.print(f"  medseg train {escape(str(data))} --out {escape(str(trained.path))} --resume --fold K")
    stdout.print(f"then, once every fold is done: medseg tune {escape(str(trained.path))}")


def print_plan(plan: TrainingPlan, out: Path) -> None:
    """The plan and estimate of ``train --dry-run``, one line each."""
    stdout.print(f"plan for {escape(str(out))} (--dry-run: nothing written)")
    for line in plan.lines():
        stdout.print(f"  {escape(line)}")


def print_tuning(tuning: Tuning | StructuresTuning, run: Path) -> None:
    """The tuned post-processing and its score (per structure, for several), and the file written."""
    frames = f"{tuning.frames} {'out-of-fold' if tuning.out_of_fold else 'validation'} frames"
    if isinstance(tuning, StructuresTuning):
        for name, block in tuning.classes.items():
            stdout.print(f"{name}: {_setting(block)}: score {block.score_after:.4f} (untuned {block.score_before:.4f}{_honest(block)})")
        overall = f"{tuning.score_after:.4f} (untuned {tuning.score_before:.4f}{_honest(tuning)})"
        stdout.print(f"mean over (frame, structure) on {frames}: {overall}")
    else:
        from medseg.learn.metrics import DEFAULT_THRESHOLD

        untuned = f", presence above {DEFAULT_THRESHOLD}" if tuning.presence_head else ""
        stdout.print(
            f"{_setting(tuning)}: score {tuning.score_after:.4f} on {frames} "
            f"(untuned: threshold {DEFAULT_THRESHOLD}, no minimum area{untuned}: {tuning.score_before:.4f}{_honest(tuning)})"
        )
    stdout.print(f"written: {Path(run) / POSTPROCESS_FILE}")


def _setting(tuning: Tuning) -> str:
    presence = f", presence above {tuning.presence_threshold:.2f}" if tuning.presence_head else ""
    return f"threshold {tuning.threshold:.2f}, minimum area {tuning.min_area} px{presence}"


def _honest(tuning: Tuning | StructuresTuning) -> str:
    if tuning.cross_fitted is None:
        return ""
    return f"; cross-fitted, what to expect on new subjects: {tuning.cross_fitted:.4f}"


def print_sweep(result: SweepResult) -> None:
    """The study's trials by state, its best trial, the outer fold's score and the files written."""
    tally = ", ".join(f"{count} {state.lower()}" for state, count in sorted(result.counts.items()))
    stdout.print(
        f"study {escape(result.study_name)} in {escape(result.storage)}: "
        f"{sum(result.counts.values())} trials ({tally}); {result.added} added now"
    )
    completed = result.counts.get("COMPLETE", 0)
    if result.best is not None:
        stdout.print(f"best trial #{result.best.number}: cross-fitted score {result.best.value:.4f} (optimistic: the best of {completed})")
    if result.outer is not None:
        outer = result.outer
        stdout.print(
            f"outer fold {outer['outer_fold']} of {outer['outer_folds']} ({len(outer['frames'])} frames no trial saw): {outer['score']:.4f}"
        )
    stdout.print(f"written: {', '.join(escape(str(path)) for path in result.written)}")


def print_evaluation(summary: dict) -> None:
    """Print the evaluation summary as a table."""
    stdout.print(_label_table(f"{summary['data']}: {summary['mode']}", _evaluation_rows(summary)))
    stdout.print(f"written: {summary['out']}/per_image.csv, summary.json")


def _evaluation_rows(summary: dict) -> list[tuple[str, str]]:
    post = summary["postprocess"]
    rows = [
        ("frames (empty truth)", f"{summary['n_images']} ({summary['n_empty_truth']})"),
        ("competition score", _number(summary["score"])),
        ("Dice on non-empty truths", _number(summary["dice_nonempty"])),
        ("IoU", _number(summary["iou"])),
        ("presence precision / recall", f"{_number(summary['presence_precision'])} / {_number(summary['presence_recall'])}"),
        ("false positives on empty frames", f"{summary['presence_empty_false_positives']} of {summary['n_empty_truth']}"),
    ]
    if "classes" in summary:
        rows[0] = ("(frame, structure) pairs (empty truth)", rows[0][1])
        for name, facts in summary["classes"].items():
            rows.append((f"{name}: score / Dice on non-empty", f"{_number(facts['score'])} / {_number(facts['dice_nonempty'])}"))
            rows.append((f"{name}: post-processing", _post_text(post[name])))
    else:
        rows.append(("post-processing", _post_text(post)))
    if "left_out" in summary:
        left_out = summary["left_out"]
        scored = "scored, by the ensemble of all folds" if left_out["scored"] else "not scored (--skip-excluded)"
        rows.append(("frames left out of training", f"{left_out['frames']} ({scored})"))
    return rows


def _post_text(post: dict) -> str:
    return f"threshold {post['threshold']:.2f}, min area {post['min_area']} px{'' if post['tuned'] else ' (not tuned)'}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
