"""``medseg report``: one self-contained HTML page that says how good a run is and where it fails.

The page (``RUN/report.html``, every image inline, no network requests) and its figures as PNGs
(``RUN/report/``) show: warnings first, the headline figures, the data and the configuration, training
curves per fold, the tuning curves, the evaluation of the held-out frames (each predicted by the model
that did not train on it) and a gallery of overlays, worst frames first. Every figure has a one-line
caption that says how to read it.
"""

from __future__ import annotations

import base64
import html
import io as byte_io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from medseg import metrics, runs  # noqa: E402
from medseg.datasets import load_dataset  # noqa: E402
from medseg.engine import load_samples, read_metrics  # noqa: E402
from medseg.evaluate import score_frames  # noqa: E402
from medseg.io import atomic_write  # noqa: E402
from medseg.predict import POSTPROCESS_FILE, Run, device_for, load_fold_model, oof_groups, open_run, predict_frames, read_postprocess  # noqa: E402
from medseg.train import data_options  # noqa: E402

REPORT_FILE = "report.html"
FIGURES_DIR = "report"
GALLERY_WORST = 12
GALLERY_RANDOM = 12
RISING_EPOCHS = 3
FOLD_SPREAD = 0.15
TRUTH_COLOUR = "#22c55e"
PREDICTION_COLOUR = "#f43f5e"


@dataclass
class Figure:
    """One figure of the page: its file name, its PNG bytes and its caption."""

    name: str
    png: bytes
    caption: str


@dataclass
class ReportData:
    """Everything the page shows, gathered from the run folder and one out-of-fold prediction pass."""

    run: Run
    rows: list[dict]
    counts: np.ndarray
    fold_metrics: dict[int, list[dict]]
    tuned: dict | None
    data_summary: dict | None
    versions: dict
    samples: dict = field(default_factory=dict)


def build_report(path: Path, tta: str = "hflip", on_message: Callable[[str], None] = print) -> Path:
    """Write ``RUN/report.html`` and ``RUN/report/*.png`` for a trained run.

    Args:
        path: The run folder.
        tta: Test-time augmentation for the held-out predictions.
        on_message: Receives progress lines.

    Returns:
        The HTML file.
    """
    data = gather(open_run(path), tta, on_message)
    figures = [*training_figures(data), *tuning_figures(data), *evaluation_figures(data)]
    gallery = gallery_figures(data, tta)
    folder = data.run.path / FIGURES_DIR
    for figure in [*figures, *gallery]:
        with atomic_write(folder / figure.name, "wb") as stream:
            stream.write(figure.png)
    page = render(data, figures, gallery)
    with atomic_write(data.run.path / REPORT_FILE) as stream:
        stream.write(page)
    return data.run.path / REPORT_FILE


def gather(run: Run, tta: str, on_message: Callable[[str], None]) -> ReportData:
    """Read the run's files and score its held-out frames."""
    dataset = load_dataset(run.data, data_options(run.config))
    ids = [record.id for record in dataset.train]
    groups = oof_groups(run, ids)
    held_out = {i for group in groups.values() for i in group}
    samples = load_samples([r for r in dataset.train if r.id in held_out], data_options(run.config))
    rows, counts = score_frames(run, groups, samples, tta, on_message)
    tuned_path = run.path / POSTPROCESS_FILE
    summary_path = run.path / runs.DATA_SUMMARY_FILE
    return ReportData(
        run=run,
        rows=rows,
        counts=counts,
        fold_metrics={fold.fold: read_metrics(fold.metrics) for fold in run.folds if fold.metrics.is_file()},
        tuned=runs.read_json(tuned_path) if tuned_path.is_file() else None,
        data_summary=runs.read_json(summary_path) if summary_path.is_file() else None,
        versions=runs.read_json(run.path / runs.VERSIONS_FILE),
        samples=samples,
    )


def warnings_of(data: ReportData) -> list[str]:
    """What a reader must know before trusting the numbers."""
    found = []
    weights = data.versions.get("encoder_weights") or {}
    if weights.get("warning"):
        found.append(weights["warning"])
    found += _degenerate_warnings(data.rows)
    for fold, rows in data.fold_metrics.items():
        losses = [float(row["val_loss"]) for row in rows]
        if len(losses) > RISING_EPOCHS and all(b > a for a, b in zip(losses[-RISING_EPOCHS - 1 :], losses[-RISING_EPOCHS:])):
            found.append(f"fold {fold}: the validation loss rose for the last {RISING_EPOCHS} epochs (over-fitting); the best checkpoint is kept")
    scores = fold_scores(data)
    if len(scores) > 1 and max(scores.values()) - min(scores.values()) > FOLD_SPREAD:
        listed = ", ".join(f"fold {fold} {score:.3f}" for fold, score in scores.items())
        found.append(f"fold scores differ widely ({listed}): the estimate depends on which subjects are held out")
    if data.tuned is None:
        found.append("the run is not tuned: threshold 0.5 and no minimum area; `medseg tune RUN` usually helps")
    return found


def _degenerate_warnings(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    if all(row["pred_empty"] for row in rows) and any(not row["truth_empty"] for row in rows):
        return ["every held-out prediction is empty although the truth has masks: the model has collapsed to 'no structure'"]
    if all(not row["pred_empty"] for row in rows) and any(row["truth_empty"] for row in rows):
        return ["every held-out prediction has a mask, also on frames without one: presence is not learned"]
    return []


def fold_scores(data: ReportData) -> dict[int, float]:
    """Competition score of each fold's held-out frames."""
    by_fold: dict[int, list[float]] = {}
    for row in data.rows:
        by_fold.setdefault(int(row["fold"]), []).append(float(row["dice"]))
    return {fold: float(np.mean(values)) for fold, values in sorted(by_fold.items())}


def _png(figure: plt.Figure) -> bytes:
    buffer = byte_io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def training_figures(data: ReportData) -> list[Figure]:
    """Loss, learning rate, validation score and throughput per epoch, one figure per fold."""
    figures = []
    for fold, rows in data.fold_metrics.items():
        if not rows:
            continue
        epochs = [int(row["epoch"]) for row in rows]
        column = {name: [float(row[name]) for row in rows] for name in ("train_loss", "val_loss", "val_score", "lr", "images_per_s")}
        best = epochs[int(np.argmin(column["val_loss"]))]
        figure, axes = plt.subplots(1, 4, figsize=(15, 3.2))
        axes[0].plot(epochs, column["train_loss"], label="train", marker=".")
        axes[0].plot(epochs, column["val_loss"], label="validation", marker=".")
        axes[0].axvline(best, color="#16a34a", linestyle="--", label=f"best (epoch {best})")
        if len(epochs) < data.run.config.trainer.max_epochs:
            axes[0].axvline(epochs[-1], color="#dc2626", linestyle=":", label="early stop")
        axes[0].set_title("loss")
        axes[0].legend(fontsize=8)
        axes[1].semilogy(epochs, column["lr"], marker=".")
        axes[1].set_title("learning rate (log)")
        axes[2].plot(epochs, column["val_score"], marker=".", color="#7c3aed")
        axes[2].set_title("validation score (threshold 0.5)")
        axes[3].plot(epochs, column["images_per_s"], marker=".", color="#0891b2")
        axes[3].set_title("training images/s")
        for axis in axes:
            axis.set_xlabel("epoch")
            axis.grid(alpha=0.3)
        caption = (
            f"Fold {fold}: training and validation loss per epoch (lower is better; the dashed line is the kept checkpoint), "
            "the learning rate (each step down is a halving on a plateau), the validation score at threshold 0.5 before tuning, "
            "and throughput."
        )
        figures.append(Figure(f"training_fold_{fold}.png", _png(figure), caption))
    return figures


def tuning_figures(data: ReportData) -> list[Figure]:
    """Score against threshold, minimum area and (with a presence head) presence threshold, the choice marked."""
    if data.tuned is None:
        return []
    tuned = data.tuned
    thresholds, areas, scores = np.array(tuned["thresholds"]), np.array(tuned["min_areas"]), np.array(tuned["scores"])
    row = int(np.argmin(np.abs(thresholds - tuned["threshold"])))
    column = int(np.flatnonzero(areas == tuned["min_area"])[0])
    presence = tuned.get("presence_head", False)
    figure, axes = plt.subplots(1, 3 if presence else 2, figsize=(16 if presence else 11, 3.4))
    axes[0].plot(thresholds, scores[:, column], marker=".")
    axes[0].plot([thresholds[row]], [scores[row, column]], "o", color="#dc2626", markersize=10, label="chosen")
    axes[0].set_xlabel("probability threshold")
    axes[0].set_title(f"score vs threshold (min area {tuned['min_area']} px)")
    axes[1].plot(areas, scores[row], marker=".")
    axes[1].plot([areas[column]], [scores[row, column]], "o", color="#dc2626", markersize=10, label="chosen")
    axes[1].set_xlabel("minimum mask area (px, original size)")
    axes[1].set_title(f"score vs minimum area (threshold {tuned['threshold']:.2f})")
    if presence:
        levels, best = np.array(tuned["presence_thresholds"]), np.array(tuned["presence_scores"])
        chosen = int(np.argmin(np.abs(levels - tuned["presence_threshold"])))
        axes[2].plot(levels, best, marker=".")
        axes[2].plot([levels[chosen]], [best[chosen]], "o", color="#dc2626", markersize=10, label="chosen")
        axes[2].set_xlabel("presence threshold (0: off, 1: every mask empty)")
        axes[2].set_title("best score vs presence threshold")
    for axis in axes:
        axis.set_ylabel("competition score")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    caption = (
        f"Tuning on {tuned['frames']} {'out-of-fold' if tuned['out_of_fold'] else 'validation'} frames: the score for each threshold at the "
        f"chosen minimum area (left) and for each minimum area at the chosen threshold (middle)"
        f"{', the best score at each presence threshold (right)' if presence else ''}; the red point is the choice. "
        f"Score before tuning {tuned['score_before']:.3f}, after {tuned['score_after']:.3f}."
    )
    return [Figure("tuning.png", _png(figure), caption)]


def evaluation_figures(data: ReportData) -> list[Figure]:
    """Histogram of per-frame scores, presence confusion, Dice against true mask area."""
    if not data.rows:
        return []
    dice = np.array([float(row["dice"]) for row in data.rows])
    truth_area = np.array([int(row["truth_area"]) for row in data.rows])
    truth_empty = np.array([bool(row["truth_empty"]) for row in data.rows])
    pred_empty = np.array([bool(row["pred_empty"]) for row in data.rows])
    figure, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    axes[0].hist(dice, bins=np.linspace(0, 1, 21), color="#2563eb", edgecolor="white")
    axes[0].set_xlabel("per-frame score (Dice; 1 for an empty frame predicted empty)")
    axes[0].set_ylabel("frames")
    confusion = np.array([[np.sum(~truth_empty & ~pred_empty), np.sum(~truth_empty & pred_empty)], [np.sum(truth_empty & ~pred_empty), np.sum(truth_empty & pred_empty)]])
    axes[1].imshow(confusion, cmap="Blues")
    for (i, j), value in np.ndenumerate(confusion):
        axes[1].text(j, i, str(value), ha="center", va="center", fontsize=14, color="black" if value < confusion.max() / 2 else "white")
    axes[1].set_xticks([0, 1], ["predicted: mask", "predicted: empty"])
    axes[1].set_yticks([0, 1], ["truth: mask", "truth: empty"])
    axes[1].set_title("presence")
    axes[2].scatter(truth_area[~truth_empty], dice[~truth_empty], s=12, color="#2563eb", label="frames with a mask")
    axes[2].scatter(np.zeros(np.sum(truth_empty)), dice[truth_empty], s=12, color="#f97316", label="empty frames (area 0)")
    axes[2].set_xlabel("true mask area (px)")
    axes[2].set_ylabel("score")
    axes[2].legend(fontsize=8)
    for axis in (axes[0], axes[2]):
        axis.grid(alpha=0.3)
    caption = (
        "Held-out frames, each predicted by the model that did not train on it, after the post-processing: the spread of per-frame "
        "scores (a pile at 0 is frames the model gets entirely wrong), whether a structure was found where there is one (diagonal = right), "
        "and whether small structures are harder."
    )
    return [Figure("evaluation.png", _png(figure), caption)]


def gallery_figures(data: ReportData, tta: str) -> list[Figure]:
    """Overlays of the worst frames, then of randomly chosen ones."""
    if not data.rows:
        return []
    order = sorted(range(len(data.rows)), key=lambda i: float(data.rows[i]["dice"]))
    worst = order[:GALLERY_WORST]
    rest = [i for i in order if i not in set(worst)]
    chosen = worst + sorted(np.random.default_rng(0).choice(rest, size=min(GALLERY_RANDOM, len(rest)), replace=False).tolist())
    post = read_postprocess(data.run)
    device = device_for(data.run.config)
    models = {fold.fold: load_fold_model(data.run, fold, device) for fold in data.run.folds}
    figures = []
    for rank, index in enumerate(chosen):
        row = data.rows[index]
        frame, truth = data.samples[row["id"]]
        prediction = next(predict_frames([models[int(row["fold"])]], [frame], data.run.config, tta))
        label = "worst" if rank < len(worst) else "random"
        figure = overlay(frame, truth.astype(bool), prediction.probs, prediction.mask(post))
        caption = f"{row['id']} (fold {row['fold']}): score {float(row['dice']):.3f}, true area {row['truth_area']} px, predicted {row['pred_area']} px"
        figures.append(Figure(f"gallery_{label}_{rank:02d}_{row['id']}.png", _png(figure), caption))
    return figures


def overlay(frame: np.ndarray, truth: np.ndarray, probs: np.ndarray, prediction: np.ndarray) -> plt.Figure:
    """The frame with the true (green) and predicted (red) outlines, beside the probability heat map."""
    figure, axes = plt.subplots(1, 2, figsize=(6.4, 2.5))
    for axis in axes:
        axis.imshow(frame, cmap="gray", vmin=0, vmax=255)
        axis.set_axis_off()
    if truth.any():
        axes[0].contour(truth, levels=[0.5], colors=[TRUTH_COLOUR], linewidths=1.5)
    if prediction.any():
        axes[0].contour(prediction, levels=[0.5], colors=[PREDICTION_COLOUR], linewidths=1.5)
    heat = axes[1].imshow(np.ma.masked_less(probs, 0.05), cmap="inferno", vmin=0, vmax=1, alpha=0.75)
    figure.colorbar(heat, ax=axes[1], fraction=0.04, pad=0.02)
    figure.subplots_adjust(wspace=0.02)
    return figure


def render(data: ReportData, figures: list[Figure], gallery: list[Figure]) -> str:
    """The HTML page."""
    by_name = {figure.name: figure for figure in figures}
    sections = [
        _section("warnings", "Warnings", _warnings_html(warnings_of(data))),
        _section("headline", "How good is it", _headline_html(data)),
        _section("data", "Data", _data_html(data)),
        _section("config", "Configuration", f"<details><summary>config.yaml</summary><pre>{html.escape((data.run.path / runs.CONFIG_FILE).read_text())}</pre></details>"),
        _section("training", "Training", "".join(_figure_html(f) for name, f in by_name.items() if name.startswith("training_")) or "<p>No epochs recorded.</p>"),
        _section("folds", "Folds", _folds_html(data)),
        _section("tuning", "Tuning", _figure_html(by_name["tuning.png"]) if "tuning.png" in by_name else "<p>Not tuned yet: run <code>medseg tune RUN</code>.</p>"),
        _section("evaluation", "Held-out evaluation", _figure_html(by_name["evaluation.png"]) if "evaluation.png" in by_name else "<p>No held-out frames.</p>"),
        _section("gallery", "Where it fails", _gallery_html(gallery)),
    ]
    title = f"medseg report: {data.run.path.name}"
    return _PAGE.format(title=html.escape(title), body="\n".join(sections))


def _section(element_id: str, heading: str, body: str) -> str:
    return f'<section id="{element_id}"><h2>{html.escape(heading)}</h2>{body}</section>'


def _figure_html(figure: Figure) -> str:
    encoded = base64.b64encode(figure.png).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{encoded}" alt="{html.escape(figure.name)}"><figcaption>{html.escape(figure.caption)}</figcaption></figure>'


def _warnings_html(found: list[str]) -> str:
    if not found:
        return '<div class="ok">No warnings.</div>'
    return '<div class="warn"><ul>' + "".join(f"<li>{html.escape(item)}</li>" for item in found) + "</ul></div>"


def _headline_html(data: ReportData) -> str:
    summary = metrics.summary(data.counts) if len(data.counts) else {}
    post = read_postprocess(data.run)
    empty_share = summary.get("n_empty_truth", 0) / max(summary.get("n_images", 1), 1)
    tiles = [
        ("competition score", _fmt(summary.get("score")), f"held-out frames; predicting every frame empty would score {empty_share:.3f}"),
        ("Dice on frames with a structure", _fmt(summary.get("dice_nonempty")), "how well it is drawn where it exists"),
        ("presence precision / recall", f"{_fmt(summary.get('presence_precision'))} / {_fmt(summary.get('presence_recall'))}", "is there a structure at all"),
        ("false positives on empty frames", f"{summary.get('presence_empty_false_positives', 0)} of {summary.get('n_empty_truth', 0)}", "masks drawn where there is none"),
    ]
    cards = "".join(f'<div class="tile"><div class="value">{html.escape(value)}</div><div class="label">{html.escape(label)}</div><div class="note">{html.escape(note)}</div></div>' for label, value, note in tiles)
    worst = sorted(data.rows, key=lambda row: float(row["dice"]))[:3]
    failing = ", ".join(f"{row['id']} ({float(row['dice']):.2f})" for row in worst)
    text = (
        f"<p>{summary.get('n_images', 0)} held-out frames, each predicted by the fold model that did not train on it; post-processing: "
        f"threshold {post.threshold:.2f}, minimum area {post.min_area} px"
        f"{f', presence above {post.presence_threshold:.2f}' if post.presence_threshold else ''}"
        f"{' (tuned on these same frames, so the score is somewhat optimistic)' if post.tuned else ' (not tuned)'}. Worst frames: {html.escape(failing)} "
        '(see <a href="#gallery">the gallery</a>).</p>'
    )
    return f'<div class="tiles">{cards}</div>{text}'


def _data_html(data: ReportData) -> str:
    summary = data.data_summary
    if summary is None:
        return f"<p>{html.escape(str(data.run.data))}</p>"
    area = summary.get("mask_area") or {}
    rows = [
        ("data folder", f"{summary['root']} ({summary['layout']} layout)"),
        ("frames", summary["train_images"]),
        ("with a mask / empty", f"{summary['non_empty']} / {summary['empty']} (empty share {summary['empty_share']:.1%})"),
        ("subjects", summary["subjects"] if summary["subjects"] is not None else "unknown"),
        ("image sizes (WxH)", ", ".join(f"{size}: {count}" for size, count in summary["image_sizes"].items())),
        ("mask area min / median / max (px)", f"{area.get('min', '-')} / {area.get('median', '-')} / {area.get('max', '-')}"),
        ("encoder weights", (data.versions.get("encoder_weights") or {}).get("used", "unknown")),
        ("trained with", f"torch {data.versions.get('torch')}, smp {data.versions.get('segmentation-models-pytorch')}, lightning {data.versions.get('lightning')}, GPU {data.versions.get('gpu') or 'none'}"),
    ]
    return _table(rows, "The training data (as inspected when the run started) and the software that trained on it.")


def _folds_html(data: ReportData) -> str:
    scores = fold_scores(data)
    rows = []
    for fold in data.run.folds:
        done = runs.read_json(fold.path / runs.DONE_FILE) if fold.done else {}
        rows.append((f"fold {fold.fold}", f"{done.get('epochs', '-')} epochs{' (stopped early)' if done.get('stopped_early') else ''}, best validation loss {_fmt(done.get('best_val_loss'))}, held-out score {_fmt(scores.get(fold.fold))}"))
    return _table(rows, "Each fold validates on different subjects; similar scores mean the estimate does not hinge on which subjects are held out.")


def _gallery_html(gallery: list[Figure]) -> str:
    if not gallery:
        return "<p>No held-out frames.</p>"
    legend = f'<p class="legend"><span style="color:{TRUTH_COLOUR}">green: true outline</span>, <span style="color:{PREDICTION_COLOUR}">red: predicted outline</span>; right: predicted probability. The worst {GALLERY_WORST} frames first, then {GALLERY_RANDOM} chosen at random.</p>'
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
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1180px; padding: 1.2rem; color: #1f2937; }}
h1 {{ font-size: 1.5rem; margin: 0 0 .8rem; }} h2 {{ font-size: 1.15rem; border-bottom: 1px solid #e5e7eb; padding-bottom: .2rem; }}
.warn {{ background: #fef3c7; border: 1px solid #f59e0b; border-radius: 6px; padding: .2rem 1rem; }}
.ok {{ background: #dcfce7; border: 1px solid #22c55e; border-radius: 6px; padding: .5rem 1rem; }}
.tiles {{ display: grid; grid-template-columns: repeat(auto-fit, minmax(230px, 1fr)); gap: .8rem; }}
.tile {{ border: 1px solid #e5e7eb; border-radius: 8px; padding: .7rem; }}
.tile .value {{ font-size: 1.7rem; font-weight: 650; }} .tile .label {{ font-weight: 600; }} .tile .note {{ color: #6b7280; font-size: .85rem; }}
figure {{ margin: .6rem 0; }} img {{ max-width: 100%; }} figcaption, .caption, .legend {{ color: #4b5563; font-size: .9rem; }}
table {{ border-collapse: collapse; }} th, td {{ text-align: left; padding: .25rem .8rem .25rem 0; border-bottom: 1px solid #f3f4f6; }}
.gallery {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: .6rem; }}
pre {{ background: #f9fafb; padding: .6rem; overflow-x: auto; }}
</style></head>
<body><h1>{title}</h1>
{body}
</body></html>
"""

