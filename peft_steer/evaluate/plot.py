"""The steering curve: behavior score against multiplier, one line per method, drawn (needs matplotlib) or as a
text table; and the sweep's picture, the score and what it costs against multiplier, with the references beside.

Every title is wrapped to the width the figure gives it, so that no text leaves the picture.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from matplotlib.text import Text

__all__ = ["plot_steering_curve", "plot_sweep", "score_table", "steering_curve_figure", "sweep_figure"]

PLOTTING_HINT = "plotting needs matplotlib: pip install 'peft-steer[plotting]'"


def score_table(curves: Mapping[str, Mapping[float, float]], signed: Collection[str] = ()) -> str:
    """``{column: {multiplier: value}}`` as a text table: one row per multiplier of the first column, ascending, one
    right-aligned column per name, three decimals (with a sign for the columns named in ``signed``)."""
    names = list(curves)
    widths = [max(10, len(name)) for name in names]
    lines = [f"{'multiplier':>10}" + "".join(f"  {name:>{width}}" for name, width in zip(names, widths))]
    for m in sorted(next(iter(curves.values()), {})):
        cells = (
            f"  {curves[name][m]:>{'+' if name in signed else ''}{width}.3f}" for name, width in zip(names, widths)
        )
        lines.append(f"{m:>+10g}" + "".join(cells))
    return "\n".join(lines)


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(PLOTTING_HINT) from None
    return plt


def _fit_width(figure: Figure, artist: Text, margin: float = 4.0) -> None:
    """Wrap ``artist``'s text at spaces until it fits between the figure's edges around its own centre (a title
    centred on an axes that sits right of the y label has less room on its right)."""
    text = artist.get_text()
    renderer = figure.canvas.get_renderer()
    chars = len(text)
    for _ in range(12):
        box = artist.get_window_extent(renderer)
        centre = (box.x0 + box.x1) / 2
        room = 2 * min(centre - figure.bbox.x0, figure.bbox.x1 - centre) - 2 * margin
        if box.width <= room or chars <= 8:
            return
        chars = max(8, min(chars - 1, math.floor(chars * room / box.width)))
        artist.set_text(textwrap.fill(text, chars, break_long_words=False))


def steering_curve_figure(
    curves: Mapping[str, Mapping[float, float]], title: str = "Steering curve", ylabel: str = "behavior score"
) -> Figure:
    """The steering curve of ``{method: {multiplier: score}}`` as a matplotlib figure (close it when done)."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5.5, 4))
    for method, points in curves.items():
        xs = sorted(points)
        axes.plot(xs, [points[x] for x in xs], marker="o", label=method)
    axes.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    axes.set_xlabel("multiplier")
    axes.set_ylabel(ylabel)
    axes.legend()
    figure.tight_layout()
    _fit_width(figure, axes.set_title(title))
    figure.tight_layout()
    return figure


def plot_steering_curve(
    curves: Mapping[str, Mapping[float, float]],
    out_path: str | os.PathLike,
    title: str = "Steering curve",
    ylabel: str = "behavior score",
) -> str:
    """Write a PNG of ``{method: {multiplier: score}}`` and return its path."""
    return _saved(steering_curve_figure(curves, title, ylabel), out_path)


def sweep_figure(
    scores: Mapping[str, Mapping[float, float]],
    drift: Mapping[str, Mapping[float, float]],
    *,
    references: Mapping[str, float] | None = None,
    recommended: Collection[float] = (),
    max_drift: float | None = None,
    title: str = "Steering sweep",
    score_label: str = "behavior score",
) -> Figure:
    """The sweep as a figure of two panels sharing the multiplier axis (close it when done).

    Args:
        scores: ``{method: {multiplier: behavior score}}``, one line each on the upper panel.
        drift: ``{method: {multiplier: drift in nats}}``, one line each on the lower panel (same colours).
        references: ``{label: score}`` drawn as horizontal lines across the upper panel (the prompting baseline:
            the unsteered model told to show the behavior, or its opposite).
        recommended: Multipliers marked by a dotted vertical line on both panels (the recommended strengths).
        max_drift: The drift budget, a dashed horizontal line on the lower panel.
        title: The figure's title, wrapped to its width.
        score_label: The upper panel's y label.
    """
    plt = _pyplot()
    figure, (upper, lower) = plt.subplots(2, 1, figsize=(6.4, 6.4), sharex=True, height_ratios=(3, 2))
    colours = {}
    for method, points in scores.items():
        xs = sorted(points)
        (line,) = upper.plot(xs, [points[x] for x in xs], marker="o", label=method)
        colours[method] = line.get_color()
    for (label, value), style in zip((references or {}).items(), ("--", "-.", ":", "--")):
        upper.axhline(value, color="black", linewidth=1.0, linestyle=style, label=label)
    for method, points in drift.items():
        xs = sorted(points)
        lower.plot(xs, [points[x] for x in xs], marker="o", color=colours.get(method), label=method)
    if max_drift is not None and math.isfinite(max_drift):
        lower.axhline(max_drift, color="firebrick", linewidth=1.0, linestyle="--", label="drift budget")
    for m in recommended:
        for axes in (upper, lower):
            axes.axvline(m, color="seagreen", linewidth=1.0, linestyle=":")
    if recommended:
        lower.plot([], [], color="seagreen", linewidth=1.0, linestyle=":", label="recommended")
    upper.set_ylabel(score_label)
    lower.set_ylabel("drift (nats)")
    lower.set_xlabel("multiplier")
    upper.legend(fontsize="small")
    lower.legend(fontsize="small")
    figure.tight_layout()
    _fit_width(figure, figure.suptitle(title))
    figure.tight_layout()
    return figure


def plot_sweep(
    scores: Mapping[str, Mapping[float, float]],
    drift: Mapping[str, Mapping[float, float]],
    out_path: str | os.PathLike,
    **options: Any,
) -> str:
    """Write `sweep_figure` (``options`` are its keywords) as a PNG and return its path."""
    return _saved(sweep_figure(scores, drift, **options), out_path)


def _saved(figure: Figure, out_path: str | os.PathLike) -> str:
    figure.savefig(out_path, dpi=120, format="png")
    _pyplot().close(figure)
    return os.fspath(out_path)
