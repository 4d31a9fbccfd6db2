"""The steering curve: behavior score against multiplier, one line per method, drawn (needs matplotlib) or as a
text table."""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping

__all__ = ["plot_steering_curve", "score_table"]


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


def plot_steering_curve(
    curves: Mapping[str, Mapping[float, float]],
    out_path: str | os.PathLike,
    title: str = "Steering curve",
    ylabel: str = "behavior score",
) -> str:
    """Write a PNG of ``{method: {multiplier: score}}`` and return its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'peft-steer[plotting]'") from None
    figure, axes = plt.subplots(figsize=(5.5, 4))
    for method, points in curves.items():
        xs = sorted(points)
        axes.plot(xs, [points[x] for x in xs], marker="o", label=method)
    axes.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    axes.set_xlabel("multiplier")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(out_path, dpi=120)
    plt.close(figure)
    return os.fspath(out_path)
