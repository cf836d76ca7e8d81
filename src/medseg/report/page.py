"""``medseg report``: one self-contained HTML page that says how good a run is and where it fails.

The page (``RUN/report.html``, every image inline, no network requests) and its figures as PNGs
(``RUN/report/``) show: warnings first, the headline figures, the data (and the frames left out of training,
with their reasons), the configuration, training
curves per fold, the tuning curves, the evaluation of the held-out frames (each predicted by the model
that did not train on it) and a gallery of overlays, worst frames first. Every figure has a one-line
caption that says how to read it.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.data.datasets import load_dataset
from medseg.data.samples import Sample
from medseg.files import atomic_write, inside, safe_file_name
from medseg.infer.heldout import HeldOutFrame, held_out_frames
from medseg.infer.predict import PostProcess, postprocess_of
from medseg.learn import metrics
from medseg.learn.metrics import DEFAULT_THRESHOLD
from medseg.learn.pseudo import ENSEMBLE, read_examples
from medseg.report.evaluate import score_frames
from medseg.report.figures import (
    PREDICTION_COLOUR,
    STRUCTURE_COLOURS,
    TRUTH_COLOUR,
    Figure,
    evaluation_figures,
    overlay,
    png,
    training_figures,
    tuning_figures,
)
from medseg.runs import (
    POSTPROCESS_FILE,
    PSEUDO_EXAMPLES_FILE,
    FoldResult,
    Run,
    StructuresTuning,
    Tuning,
    Versions,
    open_run,
    read_metrics,
)

GALLERY_WORST = 12
GALLERY_RANDOM = 12
RISING_EPOCHS = 3
FOLD_SPREAD = 0.15


@dataclass(frozen=True)
class _Kept:
    score: tuple[float, int]  # the frame's score, then its arrival: ties go to the earlier frame
    key: float
    frame: HeldOutFrame
    row: dict


class GalleryPicker:
    """Keeps, while the held-out frames stream past, the ones the gallery shows: the worst frames, then a
    random choice among the rest, so that no frame is predicted twice and only a few stay in memory.

    Each frame draws a random key as it arrives; a frame is kept while it is among the ``worst`` lowest
    scores or among the ``worst + random`` lowest keys. At the end the gallery is the ``worst`` lowest
    scores and, of the other kept frames, the ``random`` lowest keys: a uniform choice among the rest.

    Args:
        worst: Frames with the lowest scores to show.
        random: Frames to show at random among the others.
        seed: Seed of the random keys.
    """

    def __init__(self, worst: int = GALLERY_WORST, random: int = GALLERY_RANDOM, seed: int = 0) -> None:
        self.worst = worst
        self.random = random
        self._rng = np.random.default_rng(seed)
        self._arrived = 0
        self._kept: list[_Kept] = []

    def offer(self, frame: HeldOutFrame, row: dict) -> None:
        """Consider one scored frame (the ``observe`` of :func:`medseg.report.evaluate.score_frames`)."""
        self._kept.append(_Kept((float(row["dice"]), self._arrived), float(self._rng.random()), frame, row))
        self._arrived += 1
        by_score = sorted(self._kept, key=lambda item: item.score)[: self.worst]
        by_key = sorted(self._kept, key=lambda item: item.key)[: self.worst + self.random]
        keep = {id(item) for item in by_score + by_key}
        self._kept = [item for item in self._kept if id(item) in keep]

    def chosen(self) -> tuple[list[tuple[HeldOutFrame, dict]], list[tuple[HeldOutFrame, dict]]]:
        """The worst frames, worst first, and the random ones in order of score, each with its row."""
        worst = sorted(self._kept, key=lambda item: item.score)[: self.worst]
        rest = [item for item in self._kept if all(item is not other for other in worst)]
        lucky = sorted(sorted(rest, key=lambda item: item.key)[: self.random], key=lambda item: item.score)
        return [(item.frame, item.row) for item in worst], [(item.frame, item.row) for item in lucky]


@dataclass
class ReportData:
    """Everything the page shows, gathered from the run folder and one out-of-fold prediction pass.

    Attributes:
        run: The run.
        rows: One row per held-out frame (see :mod:`medseg.report.evaluate`).
        counts: tp/fp/fn of each held-out frame after the post-processing.
        fold_metrics: The ``metrics.csv`` rows of each fold.
        tuned: The tuning, if the run is tuned.
        posts: The post-processing of each structure the scores and overlays used.
        data_summary: The inspector's summary of the training data, if the run kept it.
        versions: The software the run trained with.
        worst: The gallery's worst frames with their rows, worst first.
        lucky: The gallery's frames chosen at random among the rest.
    """

    run: Run
    rows: list[dict]
    counts: np.ndarray
    fold_metrics: dict[int, list[dict]]
    tuned: Tuning | StructuresTuning | None
    posts: list[PostProcess]
    data_summary: dict | None
    versions: Versions
    worst: list[tuple[HeldOutFrame, dict]] = field(default_factory=list)
    lucky: list[tuple[HeldOutFrame, dict]] = field(default_factory=list)


@dataclass(frozen=True)
class ReportRequest:
    """What ``medseg report`` writes the page of.

    Attributes:
        run: The run folder.
        tta: Test-time augmentation of the held-out predictions; ``None``: the tuning's (so that the page scores the
            tuned setting on the predictions it was tuned on, and reads the ones tune kept), ``hflip`` before tuning.
    """

    run: Path
    tta: str | None = None


def build_report(request: ReportRequest, *, on_message: Callable[[str], None] = print, samples: Mapping[str, Sample] | None = None) -> Path:
    """Write ``RUN/report.html`` and ``RUN/report/*.png`` for a trained run.

    Args:
        request: The run and the TTA of its held-out predictions.
        on_message: Receives progress lines.
        samples: The run's frames and masks, already decoded (``train`` hands its own), so that they are not read again.

    Returns:
        The HTML file.
    """
    run = open_run(request.run)
    data = gather(run, request.tta or run.tuned_tta(), on_message, samples)
    figures = [
        *training_figures(data.fold_metrics, data.run.config.trainer.max_epochs),
        *tuning_figures(data.tuned),
        *evaluation_figures(data.rows),
    ]
    gallery = gallery_figures(data)
    figures += pseudo_figures(data.run)
    for figure in [*figures, *gallery]:
        with atomic_write(inside(data.run.figures_dir, safe_file_name(figure.name)), "wb") as stream:
            stream.write(figure.png)
    page = render(data, figures, gallery)
    with atomic_write(data.run.report_file) as stream:
        stream.write(page)
    return data.run.report_file


def gather(run: Run, tta: str, on_message: Callable[[str], None], samples: Mapping[str, Sample] | None = None) -> ReportData:
    """Read the run's files and score its held-out frames, keeping the gallery's frames as they pass."""
    dataset = load_dataset(run.data, run.config.data)
    picker = GalleryPicker()
    frames = held_out_frames(run, dataset, True, tta, on_message, samples=samples)
    tuned = run.tuning()
    posts = postprocess_of(run, tuned)
    rows, counts = score_frames(frames, posts, observe=picker.offer, classes=run.classes)
    worst, lucky = picker.chosen()
    return ReportData(
        run=run,
        rows=rows,
        counts=counts,
        fold_metrics={fold.fold: read_metrics(fold.metrics) for fold in run.folds if fold.metrics.is_file()},
        tuned=tuned,
        posts=posts,
        data_summary=run.data_summary(),
        versions=run.versions(),
        worst=worst,
        lucky=lucky,
    )


def warnings_of(data: ReportData) -> list[str]:
    """What a reader must know before trusting the numbers."""
    found = []
    weights = data.versions.encoder_weights
    if weights is not None and weights.warning:
        found.append(weights.warning)
    for name, rows in _rows_by_structure(data).items():
        found += [f"{name}: {warning}" if name else warning for warning in _degenerate_warnings(rows)]
    for fold, rows in data.fold_metrics.items():
        losses = [float(row["val_loss"]) for row in rows]
        if len(losses) > RISING_EPOCHS and all(b > a for a, b in zip(losses[-RISING_EPOCHS - 1 :], losses[-RISING_EPOCHS:])):
            found.append(
                f"fold {fold}: the validation loss rose for the last {RISING_EPOCHS} epochs (over-fitting); the best checkpoint is kept"
            )
    scores = fold_scores(data)
    if len(scores) > 1 and max(scores.values()) - min(scores.values()) > FOLD_SPREAD:
        listed = ", ".join(f"fold {fold} {score:.3f}" for fold, score in scores.items())
        found.append(f"fold scores differ widely ({listed}): the estimate depends on which subjects are held out")
    if data.tuned is None:
        found.append(f"the run is not tuned: threshold {DEFAULT_THRESHOLD} and no minimum area; `medseg tune RUN` usually helps")
    return found


def _degenerate_warnings(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    if all(row["pred_empty"] for row in rows) and any(not row["truth_empty"] for row in rows):
        return ["every held-out prediction is empty although the truth has masks: the model has collapsed to 'no structure'"]
    if all(not row["pred_empty"] for row in rows) and any(row["truth_empty"] for row in rows):
        return ["every held-out prediction has a mask, also on frames without one: presence is not learned"]
    return []


def _rows_by_structure(data: ReportData) -> dict[str, list[dict]]:
    """The held-out rows of each structure (one group, named ``""``, for a run of one)."""
    if not data.run.classes:
        return {"": data.rows}
    return {name: [row for row in data.rows if row["class"] == name] for name in data.run.classes}


def fold_scores(data: ReportData) -> dict[int, float]:
    """Competition score of each fold's held-out frames."""
    by_fold: dict[int, list[float]] = {}
    for row in data.rows:
        by_fold.setdefault(int(row["fold"]), []).append(float(row["dice"]))
    return {fold: float(np.mean(values)) for fold, values in sorted(by_fold.items())}


def gallery_figures(data: ReportData) -> list[Figure]:
    """Overlays of the worst frames, then of randomly chosen ones, from the predictions the scores came from."""
    figures = []
    for label, chosen in (("worst", data.worst), ("random", data.lucky)):
        for frame, row in chosen:
            rank = len(figures)
            figure = overlay(frame.image, frame.truth, frame.prediction.probs, frame.prediction.mask(data.posts))
            caption = _gallery_caption(row)
            figures.append(Figure(f"gallery_{label}_{rank:02d}_{row['id']}.png", png(figure), caption))
    return figures


def pseudo_figures(run: Run) -> list[Figure]:
    """The pseudo-labelled frames a run kept, each with its teacher's mask outlined (none for a run without them)."""
    if run.plan.pseudo is None:
        return []
    figures = []
    for rank, (sample_id, frame, mask) in enumerate(read_examples(run.path / PSEUDO_EXAMPLES_FILE)):
        masks = mask[None] if mask.ndim == 2 else mask
        figure = overlay(frame, np.zeros_like(masks), masks.astype(np.float32), masks)
        caption = f"{sample_id}: the teacher's pseudo-label, {int(masks.sum())} px" if masks.any() else f"{sample_id}: sure to be empty"
        figures.append(Figure(f"pseudo_{rank:02d}_{sample_id}.png", png(figure), caption))
    return figures


def _gallery_caption(row: dict) -> str:
    """What an overlay shows: the frame's score and areas (each structure's, for several)."""
    head = f"{row['id']} (fold {row['fold']}): score {float(row['dice']):.3f}"
    if "classes" not in row:
        return f"{head}, true area {row['truth_area']} px, predicted {row['pred_area']} px"
    parts = [
        f"{part['class']} {float(part['dice']):.3f} (true {part['truth_area']} px, predicted {part['pred_area']} px)"
        for part in row["classes"]
    ]
    return f"{head} (mean over structures): {'; '.join(parts)}"


def render(data: ReportData, figures: list[Figure], gallery: list[Figure]) -> str:
    """The HTML page."""
    by_name = {figure.name: figure for figure in figures}
    sections = [
        _section("warnings", "Warnings", _warnings_html(warnings_of(data))),
        _section("headline", "How good is it", _headline_html(data)),
        _section("data", "Data", _data_html(data)),
        *([_section("excluded", "Left-out frames", _excluded_html(data.run))] if data.run.plan.excluded else []),
        *([_section("pseudo", "Pseudo-labels", _pseudo_html(data.run, by_name))] if data.run.plan.pseudo else []),
        _section(
            "config",
            "Configuration",
            f"<details><summary>config.yaml</summary><pre>{html.escape(data.run.config_file.read_text())}</pre></details>",
        ),
        _section(
            "training",
            "Training",
            "".join(_figure_html(f) for name, f in by_name.items() if name.startswith("training_")) or "<p>No epochs recorded.</p>",
        ),
        _section("folds", "Folds", _folds_html(data)),
        _section("tuning", "Tuning", _tuning_html(data, [figure for name, figure in by_name.items() if name.startswith("tuning")])),
        _section(
            "evaluation",
            "Held-out evaluation",
            _figure_html(by_name["evaluation.png"]) if "evaluation.png" in by_name else "<p>No held-out frames.</p>",
        ),
        _section("gallery", "Where it fails", _gallery_html(gallery, data.run.classes)),
    ]
    title = f"medseg report: {data.run.path.name}"
    return _PAGE.format(title=html.escape(title), body="\n".join(sections))


def _section(element_id: str, heading: str, body: str) -> str:
    return f'<section id="{element_id}"><h2>{html.escape(heading)}</h2>{body}</section>'


def _figure_html(figure: Figure) -> str:
    encoded = base64.b64encode(figure.png).decode("ascii")
    image = f'<img src="data:image/png;base64,{encoded}" alt="{html.escape(figure.name)}">'
    return f"<figure>{image}<figcaption>{html.escape(figure.caption)}</figcaption></figure>"


def _warnings_html(found: list[str]) -> str:
    if not found:
        return '<div class="ok">No warnings.</div>'
    return '<div class="warn"><ul>' + "".join(f"<li>{html.escape(item)}</li>" for item in found) + "</ul></div>"


def _headline_html(data: ReportData) -> str:
    tiles = _tiles(
        data.counts,
        "held-out frames; predicting every frame" if not data.run.classes else "held-out (frame, structure) pairs; predicting every pair",
    )
    rows = [f'<div class="tiles">{tiles}</div>']
    for name, indices in _structure_rows(data).items():
        per_structure = _tiles(data.counts[indices], f"held-out frames, {name}; predicting every frame")
        rows.append(f'<h3>{html.escape(name)}</h3><div class="tiles">{per_structure}</div>')
    summary = metrics.summary(data.counts) if len(data.counts) else {}
    worst = sorted(data.rows, key=lambda row: float(row["dice"]))[:3]
    failing = ", ".join(f"{row['id']}{' ' + row['class'] if 'class' in row else ''} ({float(row['dice']):.2f})" for row in worst)
    unit = "(frame, structure) pairs" if data.run.classes else "frames"
    text = (
        f"<p>{summary.get('n_images', 0)} held-out {unit}, each predicted by the fold model that did not train on it; "
        f"post-processing: {html.escape(_post_text(data))}. Worst {'pairs' if data.run.classes else 'frames'}: {html.escape(failing)} "
        '(see <a href="#gallery">the gallery</a>).</p>'
    )
    return "".join(rows) + text


def _tiles(counts: np.ndarray, scored: str) -> str:
    """The four headline tiles of a set of (frame or frame-structure) counts; ``scored`` says what they count."""
    summary = metrics.summary(counts) if len(counts) else {}
    empty_share = summary.get("n_empty_truth", 0) / max(summary.get("n_images", 1), 1)
    tiles = [
        ("competition score", _fmt(summary.get("score")), f"{scored} empty would score {empty_share:.3f}"),
        ("Dice on frames with a structure", _fmt(summary.get("dice_nonempty")), "how well it is drawn where it exists"),
        (
            "presence precision / recall",
            f"{_fmt(summary.get('presence_precision'))} / {_fmt(summary.get('presence_recall'))}",
            "is there a structure at all",
        ),
        (
            "false positives on empty frames",
            f"{summary.get('presence_empty_false_positives', 0)} of {summary.get('n_empty_truth', 0)}",
            "masks drawn where there is none",
        ),
    ]
    return "".join(
        f'<div class="tile"><div class="value">{html.escape(value)}</div><div class="label">{html.escape(label)}</div>'
        f'<div class="note">{html.escape(note)}</div></div>'
        for label, value, note in tiles
    )


def _structure_rows(data: ReportData) -> dict[str, np.ndarray]:
    """The indices of each structure's rows (and counts); empty for a run of one structure."""
    names = np.array([row.get("class", "") for row in data.rows])
    return {name: np.flatnonzero(names == name) for name in data.run.classes}


def _post_text(data: ReportData) -> str:
    rules = list(zip(data.run.classes or [""], data.posts, strict=True))
    parts = [
        f"{name + ': ' if name else ''}threshold {rule.threshold:.2f}, minimum area {rule.min_area} px"
        f"{f', presence above {rule.presence_threshold:.2f}' if rule.presence_threshold else ''}"
        for name, rule in rules
    ]
    tuned = rules[0][1].tuned
    return "; ".join(parts) + (" (tuned on these same frames, so the score is somewhat optimistic)" if tuned else " (not tuned)")


def _data_html(data: ReportData) -> str:
    summary = data.data_summary
    if summary is None:
        return f"<p>{html.escape(str(data.run.data))}</p>"
    area = summary.get("mask_area") or {}
    rows = [
        ("data folder", f"{summary['root']} ({summary['layout']} layout)"),
        ("frames", _frames_text(summary["train_images"], len(data.run.plan.excluded))),
        ("with a mask / empty", f"{summary['non_empty']} / {summary['empty']} (empty share {summary['empty_share']:.1%})"),
        ("subjects", summary["subjects"] if summary["subjects"] is not None else "unknown"),
        ("image sizes (WxH)", ", ".join(f"{size}: {count}" for size, count in summary["image_sizes"].items())),
        ("mask area min / median / max (px)", f"{area.get('min', '-')} / {area.get('median', '-')} / {area.get('max', '-')}"),
        *((f"{name}: with / without", f"{facts['with']} / {facts['without']}") for name, facts in (summary.get("classes") or {}).items()),
        *((f"frames where {pair} overlap", frames) for pair, frames in (summary.get("overlapping_frames") or {}).items()),
        ("encoder weights", data.versions.encoder_weights.used if data.versions.encoder_weights else "unknown"),
        ("trained with", _software(data.versions)),
    ]
    return _table(rows, "The training data (as inspected when the run started) and the software that trained on it.")


def _pseudo_html(run: Run, by_name: dict[str, Figure]) -> str:
    """What the run learnt from frames without labels: the teacher, the rule, each fold's source and count, examples."""
    record = run.plan.pseudo
    sources = {fold: "the fold ensemble" if source == ENSEMBLE else f"fold {source}'s model" for fold, source in record.sources.items()}
    rows = [
        ("teacher", f"{record.teacher} (run id {record.teacher_run_id})"),
        ("frames", f"{record.frames}: {len(record.ids)} frames"),
        ("rule", ", ".join(f"{key} {value:g}" for key, value in record.rule.items())),
        *((f"fold {fold}", f"{record.kept.get(fold, 0)} frames from the teacher's {sources[fold]}") for fold in sorted(record.sources)),
    ]
    caption = (
        "Frames without labels the teacher was sure of, added to each fold's training frames (never validated, tuned or scored "
        "on); each fold learnt from a teacher model that did not train on its validation frames."
    )
    examples = [figure for name, figure in by_name.items() if name.startswith("pseudo_")]
    gallery = '<div class="gallery">' + "".join(_figure_html(figure) for figure in examples) + "</div>" if examples else ""
    return _table(rows, caption) + gallery


def _excluded_html(run: Run) -> str:
    """The frames the run left out of training (``train --exclude``), each with its reason."""
    rows = [(frame, reason or "-") for frame, reason in run.plan.excluded.items()]
    return _table(
        rows,
        f"{len(rows)} labelled frame(s) left out of training, validation and tuning (medseg train --exclude; listed in run.json); "
        "they are in no fold and not scored on this page. medseg evaluate still scores them by default, with the ensemble of "
        "every fold (--skip-excluded leaves them out).",
    )


def _frames_text(trained: int, left_out: int) -> str:
    return f"{trained} ({left_out} more left out of training: see below)" if left_out else str(trained)


def _folds_html(data: ReportData) -> str:
    scores = fold_scores(data)
    rows = []
    for fold in data.run.folds:
        rows.append((f"fold {fold.fold}", f"{_ending(fold.result())}, held-out score {_fmt(scores.get(fold.fold))}"))
    return _table(
        rows, "Each fold validates on different subjects; similar scores mean the estimate does not hinge on which subjects are held out."
    )


def _tuning_html(data: ReportData, figures: list[Figure]) -> str:
    if figures:
        return "".join(_figure_html(figure) for figure in figures)
    if data.tuned is None:
        return "<p>Not tuned yet: run <code>medseg tune RUN</code>.</p>"
    if isinstance(data.tuned, StructuresTuning):
        return "<p>The tuning in postprocess.json records no search to show.</p>"
    return (
        f"<p>Post-processing set in {html.escape(POSTPROCESS_FILE)} without a search (threshold {data.tuned.threshold:.2f}, "
        f"minimum area {data.tuned.min_area} px): <code>medseg tune RUN --force</code> searches it.</p>"
    )


def _software(versions: Versions) -> str:
    packages = ", ".join(
        f"{label} {versions.package(name)}"
        for label, name in (("torch", "torch"), ("smp", "segmentation-models-pytorch"), ("lightning", "lightning"))
    )
    return f"{packages}, GPU {versions.gpu or 'none'}"


def _ending(result: FoldResult | None) -> str:
    if result is None:
        return "- epochs, best validation loss -"
    return f"{result.epochs} epochs{' (stopped early)' if result.stopped_early else ''}, best validation loss {_fmt(result.best_val_loss)}"


def _gallery_html(gallery: list[Figure], classes: list[str]) -> str:
    if not gallery:
        return "<p>No held-out frames.</p>"
    if classes:
        colours = ", ".join(
            f'<span style="color:{STRUCTURE_COLOURS[index % len(STRUCTURE_COLOURS)]}">{html.escape(name)}</span>'
            for index, name in enumerate(classes)
        )
        outlines = f"{colours}: true outline solid, predicted outline dashed; right: the highest predicted probability."
    else:
        outlines = (
            f'<span style="color:{TRUTH_COLOUR}">green: true outline</span>, '
            f'<span style="color:{PREDICTION_COLOUR}">red: predicted outline</span>; right: predicted probability.'
        )
    legend = f'<p class="legend">{outlines} The worst {GALLERY_WORST} frames first, then {GALLERY_RANDOM} chosen at random.</p>'
    return legend + '<div class="gallery">' + "".join(_figure_html(figure) for figure in gallery) + "</div>"


def _table(rows: list[tuple], caption: str) -> str:
    body = "".join(f"<tr><th>{html.escape(str(label))}</th><td>{html.escape(str(value))}</td></tr>" for label, value in rows)
    return f'<table>{body}</table><p class="caption">{html.escape(caption)}</p>'


def _fmt(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1180px; padding: 1.2rem;
       color: #1f2937; }}
h1 {{ font-size: 1.5rem; margin: 0 0 .8rem; }} h2 {{ font-size: 1.15rem; border-bottom: 1px solid #e5e7eb; padding-bottom: .2rem; }}
.warn {{ background: #fef3c7; border: 1px solid #f59e0b; border-radius: 6px; padding: .2rem 1rem; }}
.ok {{ background: #dcfce7; border: 1px solid #22c55e; border-radius: 6px; padding: .5rem 1rem; }}
.tiles {{ display: grid; grid-template-columns: repeat(auto-fit, minmax(230px, 1fr)); gap: .8rem; }}
.tile {{ border: 1px solid #e5e7eb; border-radius: 8px; padding: .7rem; }}
.tile .value {{ font-size: 1.7rem; font-weight: 650; }} .tile .label {{ font-weight: 600; }}
.tile .note {{ color: #6b7280; font-size: .85rem; }}
figure {{ margin: .6rem 0; }} img {{ max-width: 100%; }} figcaption, .caption, .legend {{ color: #4b5563; font-size: .9rem; }}
table {{ border-collapse: collapse; }} th, td {{ text-align: left; padding: .25rem .8rem .25rem 0; border-bottom: 1px solid #f3f4f6; }}
.gallery {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: .6rem; }}
pre {{ background: #f9fafb; padding: .6rem; overflow-x: auto; }}
</style></head>
<body><h1>{title}</h1>
{body}
</body></html>
"""
