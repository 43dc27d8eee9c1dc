"""Plots runs: training loss, evaluation loss (and each source's) and learning rate against step.

  python tools/plot.py workdirs/sc workdirs/sc_bf16 --output=curves.png
  python tools/plot.py workdirs/lr_sweep --output=sweep.png     # a sweep: every trial, and the metric per field

One line per run, its legend the workdir's name. A sweep directory (one with the results.csv that
tools/sweep.py writes; the format is in training/plots.py) adds its trials' curves and one panel of
its final evaluation loss against each swept field (a logarithmic axis for a field spanning more than
10x). Needs matplotlib; draws with its Agg backend (no display). A path that is neither a workdir nor
a sweep directory is one line naming it, exit 1.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training import plots  # noqa: E402


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(prog="plot.py", description="Plot loom runs' curves into a PNG.")
  parser.add_argument("paths", nargs="+", metavar="WORKDIR", help="a loom run's --workdir, or a sweep directory")
  parser.add_argument("--output", default="curves.png", help="the PNG to write (default: curves.png)")
  args = parser.parse_args(argv)
  try:
    plots.plot(args.paths, args.output)
  except plots.PlotError as e:
    raise SystemExit(f"plot: {e}") from None
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main(sys.argv[1:])
