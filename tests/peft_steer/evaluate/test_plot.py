"""`score_table`: the text table of scores per multiplier that the demos and `peft-steer eval` print."""

from __future__ import annotations

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
