"""BiPO vs CAA vs no steering on the model organism's held-out questions, for all four behaviors.

    python benchmarks/steering_quality.py            # about 4 minutes per behavior on 2 CPU cores

For each behavior: a BiPO vector (block 2, 2 epochs, lr 5e-3) and the CAA vector of the same untagged train pairs,
scored by held-out answer preference at multipliers -2..2, each at its own norm and CAA also rescaled to BiPO's
norm (matched norms). Multiplier 0 is no steering. Writes docs/results/steering_quality.md and .png.
"""

from __future__ import annotations

import argparse
import os

from peft_steer.evaluate import plot_steering_curve
from peft_steer.organism import BEHAVIORS
from trl_integration.organism_demo import steering_comparison

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "results")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--behaviors", nargs="+", default=list(BEHAVIORS), choices=BEHAVIORS)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    lines = [
        "# Steering quality on the model organism",
        "",
        f"`python benchmarks/steering_quality.py` (block 2, {args.epochs:g} epochs, lr 5e-3). Held-out answer "
        "preference (0.5 = ambivalent); multiplier 0 is no steering. 'CAA (BiPO's norm)' is the CAA vector rescaled "
        "to the BiPO vector's norm.",
        "",
    ]
    curves = {}
    for behavior in args.behaviors:
        comparison = steering_comparison(behavior, epochs=args.epochs, matched_norm=True, progress=False)
        methods = list(comparison.curves)
        lines += [f"## {behavior}", "", "| multiplier | " + " | ".join(methods) + " |"]
        lines.append("| ---: |" + " ---: |" * len(methods))
        for m in sorted(comparison.curves["BiPO"]):
            lines.append(f"| {m:+g} | " + " | ".join(f"{comparison.curves[x][m]:.3f}" for x in methods) + " |")
        lines += ["", f"Vector norms: BiPO {comparison.norms['BiPO']:.3f}, CAA {comparison.norms['CAA']:.3f}.", ""]
        for method, points in comparison.curves.items():
            curves[f"{behavior}: {method}"] = points
        print("\n".join(lines[-(len(comparison.curves["BiPO"]) + 5) :]), flush=True)
    with open(os.path.join(args.out, "steering_quality.md"), "w") as file:
        file.write("\n".join(lines))
    bipo_and_caa = {name: points for name, points in curves.items() if "norm" not in name}
    plot_steering_curve(bipo_and_caa, os.path.join(args.out, "steering_quality.png"), title="organism: held-out score")


if __name__ == "__main__":
    main()
