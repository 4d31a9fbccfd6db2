"""The steering curve: behavior score against multiplier, one line per method (needs matplotlib)."""

from __future__ import annotations

import os
from collections.abc import Mapping


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
