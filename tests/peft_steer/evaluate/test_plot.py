"""`score_table`: the text table of scores per multiplier that the demos and `peft-steer eval` print."""

from __future__ import annotations

import pytest

from peft_steer.evaluate import score_table


def test_one_row_per_multiplier_ascending_with_signed_columns():
    curves = {"preference": {1.0: 0.75, -1.0: 0.25, 0.0: 0.5}, "mean margin": {1.0: 1.5, -1.0: -1.5, 0.0: 0.0}}
    lines = score_table(curves, signed={"mean margin"}).splitlines()
    assert lines[0].split() == ["multiplier", "preference", "mean", "margin"]
    assert [line.split() for line in lines[1:]] == [
        ["-1", "0.250", "-1.500"],
        ["+0", "0.500", "+0.000"],
        ["+1", "0.750", "+1.500"],
    ]
    assert len({len(line) for line in lines}) == 1  # the columns line up


LONG_TITLE = (
    "SmolLM2-135M-Instruct, power-seeking: held-out answer preference and drift against multiplier (CAA at block 12, "
    "at the adapter's norm 4.2)"
)


def drawn_texts_outside(figure) -> list[str]:
    """The texts of ``figure`` that a draw puts (partly) outside it. Tick labels of ticks outside an axis' view are
    made but never drawn, so they are left out."""
    from matplotlib.text import Text

    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    hidden = set()
    for axes in figure.axes:
        for axis in (axes.xaxis, axes.yaxis):
            low, high = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if not low - 1e-9 <= tick.get_loc() <= high + 1e-9:
                    hidden.update(map(id, (tick.label1, tick.label2)))
    outside = []
    for text in figure.findobj(Text):
        if not text.get_visible() or not text.get_text() or id(text) in hidden:
            continue
        box, frame = text.get_window_extent(renderer), figure.bbox
        if box.x0 < frame.x0 or box.x1 > frame.x1 or box.y0 < frame.y0 or box.y1 > frame.y1:
            outside.append(text.get_text())
    return outside


def test_the_sweep_figure_keeps_every_text_inside_with_a_long_title(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from peft_steer.evaluate import plot_sweep, sweep_figure

    ms = [-4.0, -2.0, 0.0, 2.0, 4.0]
    scores = {"BiPO": {m: 0.5 + m / 10 for m in ms}, "CAA (block 12)": {m: 0.5 + m / 20 for m in ms}}
    drift = {"BiPO": {m: abs(m) / 5 for m in ms}, "CAA (block 12)": {m: abs(m) / 8 for m in ms}}
    options = dict(references={"prompting for": 0.7, "prompting against": 0.3}, recommended=[2.0, -2.0], max_drift=0.5)
    figure = sweep_figure(scores, drift, title=LONG_TITLE, **options)
    assert drawn_texts_outside(figure) == []
    title = figure.get_suptitle()
    assert "\n" in title and title.replace("\n", " ") == LONG_TITLE  # wrapped, not cut
    labels = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert labels == ["BiPO", "CAA (block 12)", "prompting for", "prompting against"]
    figure.suptitle(LONG_TITLE)  # the check is real: the same title unwrapped leaves the figure
    assert LONG_TITLE in drawn_texts_outside(figure)
    plt.close(figure)
    path = plot_sweep(scores, drift, tmp_path / "sweep.png", title=LONG_TITLE, **options)
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_the_steering_curve_wraps_its_title():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from peft_steer.evaluate import steering_curve_figure

    figure = steering_curve_figure({"BiPO": {-1.0: 0.4, 0.0: 0.5, 1.0: 0.6}}, title=LONG_TITLE)
    assert drawn_texts_outside(figure) == [] and "\n" in figure.axes[0].get_title()
    plt.close(figure)
