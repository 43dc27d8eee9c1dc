"""Compares runs: a Markdown table of their steps, tokens, train time, and final and best metrics.

  python tools/compare.py /runs/baseline /runs/rope /runs/swiglu

One column per workdir; rows: steps (of the config's num_steps), tokens trained on, train time
(the logged step times summed: no compiling, evaluation or checkpointing), the last training loss,
and every eval_* metric the runs logged, its final value and its best (the highest for an
accuracy, else the lowest) with the step it came from; and the best checkpoint's step where one is
kept (train.keep_best_checkpoint). A workdir that cannot be read is one line naming it, exit 1.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training import reports  # noqa: E402


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(prog="compare.py", description="Compare loom runs as a Markdown table.")
  parser.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="a loom run's --workdir")
  args = parser.parse_args(argv)
  try:
    runs = reports.compare(args.workdirs)
  except reports.RunError as e:
    raise SystemExit(f"compare: {e}") from None
  print(reports.markdown(runs))


if __name__ == "__main__":
  main(sys.argv[1:])
