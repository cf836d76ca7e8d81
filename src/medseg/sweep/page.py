"""``STUDY/study.html``: the sweep's page, one self-contained file (plotly.js inline, nothing fetched).

The first screen says how good the best configuration is, each figure named for what it is: the best trial's
cross-fitted score (optimistic: the best of N trials) and, with ``--outer-fold``, the score of that configuration
on frames no trial saw (nested cross-validation). Then the best configuration, the search space, Optuna's
plots (optimisation history, fold scores per trial, parameter importances, slices) and every trial.

Parameter importances use Optuna's PED-ANOVA evaluator, which needs no scikit-learn (Optuna's fANOVA does); they
need two completed trials, and the page says so in their place before there are.
"""

from __future__ import annotations

import html
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from medseg.files import atomic_write
from medseg.learn.metrics import DEFAULT_THRESHOLD
from medseg.sweep import outputs
from medseg.sweep.space import Space

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; padding: 0 1rem; color: #222; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
.tiles { display: flex; gap: 1rem; flex-wrap: wrap; }
.tile { border: 1px solid #ccc; border-radius: 6px; padding: .8rem 1rem; flex: 1 1 320px; }
.tile .label { font-weight: 600; } .tile .value { font-size: 2.2rem; margin: .3rem 0; } .tile .note { color: #555; font-size: .9rem; }
.honest { border-color: #2a7; background: #f3fbf6; } .optimistic { border-color: #d90; background: #fffaf0; }
table { border-collapse: collapse; font-size: .85rem; } td, th { border: 1px solid #ddd; padding: .25rem .5rem; text-align: left; }
th { background: #f4f4f4; } .note { color: #555; } code { background: #f4f4f4; padding: 0 .2rem; }
.COMPLETE { } .PRUNED { color: #a60; } .FAIL { color: #b00; } .RUNNING { color: #06c; }
"""


def write_page(study: optuna.Study, path: Path, outer: dict[str, Any] | None, space: Space) -> Path:
    """Write the study page atomically.

    Args:
        study: The study.
        path: ``STUDY/study.html``.
        outer: The outer fold's result (``outer.json``), or ``None``.
        space: The search space of this sweep.
    """
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    plots = _Plots()
    sections = [
        _headline(study, outer, len(complete)),
        _best(study),
        _space(space),
        _section("history", "Optimisation history", plots.figure(optuna.visualization.plot_optimization_history, study, complete, 1)),
        _section(
            "folds",
            "Fold scores (the pruner's intermediate values)",
            plots.figure(optuna.visualization.plot_intermediate_values, study, complete, 1),
        ),
        _section("importance", "Parameter importances (PED-ANOVA)", plots.figure(_importances, study, complete, 2)),
        _section("slices", "Value against each parameter", plots.figure(optuna.visualization.plot_slice, study, complete, 1)),
        _trials(study),
    ]
    title = f"medseg sweep: {study.study_name}"
    page = (
        f"<!doctype html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n{''.join(sections)}\n</body></html>\n"
    )
    with atomic_write(path) as stream:
        stream.write(page)
    return path


class _Plots:
    """Optuna's plotly figures as HTML; plotly.js goes inline with the first one only."""

    def __init__(self) -> None:
        self.first = True

    def figure(self, plot: Callable[[optuna.Study], Any], study: optuna.Study, complete: list, needed: int) -> str:
        if len(complete) < needed:
            return _note(f"needs {needed} completed trial(s); the study has {len(complete)}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                figure = plot(study)
        except (ValueError, RuntimeError, ArithmeticError, LookupError, TypeError) as error:  # the page says why, the sweep goes on
            return _note(f"not drawn: {type(error).__name__}: {html.escape(str(error))}")
        text = figure.to_html(full_html=False, include_plotlyjs=self.first, config={"displaylogo": False, "responsive": True})
        self.first = False
        return text


def _importances(study: optuna.Study):
    return optuna.visualization.plot_param_importances(study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())


def _headline(study: optuna.Study, outer: dict[str, Any] | None, completed: int) -> str:
    best = outputs.best_trial(study)
    counts = outputs.state_counts(study)
    tally = ", ".join(f"{count} {state.lower()}" for state, count in sorted(counts.items()))
    if best is None:
        return _section(
            "headline",
            "How good is the best configuration?",
            _note(f"No trial completed ({tally}); the table below gives each one's reason."),
        )
    optimistic = _tile(
        f"best trial's cross-fitted score (optimistic: the best of {completed})",
        f"{best.value:.4f}",
        f"trial #{best.number}; each fold scored with the post-processing tuned on the other folds, but the configuration "
        f"is the one that scored best of {completed} on these same frames, so this figure flatters it",
        "optimistic",
    )
    if outer is not None and outer.get("trial") == best.number:
        honest = _tile(
            f"outer fold {outer['outer_fold']} of {outer['outer_folds']} ({len(outer['frames'])} frames no trial saw)",
            f"{outer['score']:.4f}",
            f"trial #{best.number}'s configuration trained on every other frame and scored on the outer fold "
            "(nested cross-validation): what to expect on new subjects",
            "honest",
        )
    else:
        honest = _tile(
            "outer fold: not measured",
            "-",
            "run the sweep with --outer-fold K to keep one subject group out of the whole search and score the chosen "
            "configuration on it at the end",
            "",
        )
    summary = f"<p class='note'>{len(study.trials)} trial(s): {html.escape(tally)}.</p>"
    return _section("headline", "How good is the best configuration?", f"<div class='tiles'>{optimistic}{honest}</div>{summary}")


def _tile(label: str, value: str, note: str, kind: str) -> str:
    return (
        f"<div class='tile {kind}'><div class='label'>{html.escape(label)}</div><div class='value'>{html.escape(value)}</div>"
        f"<div class='note'>{html.escape(note)}</div></div>"
    )


def _best(study: optuna.Study) -> str:
    best = outputs.best_trial(study)
    if best is None:
        return _section("best", "Best configuration", _note("none yet"))
    rows = "".join(
        f"<tr><td><code>{html.escape(key)}</code></td><td>{html.escape(_shown(value))}</td></tr>" for key, value in best.params.items()
    )
    tuned = best.user_attrs.get(outputs.TUNED_ATTR)
    extra = (
        f" Tuned on all its out-of-fold frames it scored {tuned:.4f} (flattered by tuning on the frames it is scored on)." if tuned else ""
    )
    body = (
        f"<p>Trial #{best.number}, value {best.value:.4f}.{extra} Train it with "
        f"<code>medseg train DATA --out RUN --config {html.escape(outputs.BEST_FILE)}</code> "
        "(every fold, then tuned, as the trial was).</p>"
        f"<table><tr><th>key</th><th>value</th></tr>{rows}</table>"
    )
    return _section("best", "Best configuration", body)


def _space(space: Space) -> str:
    rows = "".join(
        f"<tr><td><code>{html.escape(param.key)}</code></td><td>{html.escape(param.describe())}</td></tr>" for param in space.params
    )
    return _section("space", f"Search space ({html.escape(space.source)})", f"<table><tr><th>key</th><th>values</th></tr>{rows}</table>")


def _trials(study: optuna.Study) -> str:
    rows, keys = outputs.trial_rows(study)
    columns = [*outputs.COLUMNS[:7], *keys]
    head = "".join(f"<th>{html.escape(column)}</th>" for column in columns)
    body = "".join(
        f"<tr class='{row['state']}'>" + "".join(f"<td>{html.escape(_shown(row[column]))}</td>" for column in columns) + "</tr>"
        for row in rows
    )
    note = _note(
        "value: the cross-fitted out-of-fold score; tuned_on_all: tuned and scored on the same frames; "
        f"fold_scores: each fold's validation score at threshold {DEFAULT_THRESHOLD}."
    )
    return _section("trials", "Every trial", f"{note}<table><tr>{head}</tr>{body}</table>")


def _section(anchor: str, title: str, body: str) -> str:
    return f"<section id='{anchor}'><h2>{title}</h2>{body}</section>\n"


def _shown(value: Any) -> str:
    """A cell's text: floats (the parameters Optuna drew) to 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _note(text: str) -> str:
    return f"<p class='note'>{text}</p>"
