"""Runs a sweep: the trials of a config's get_sweep() (training/sweeps.py has the spec's format).

  python tools/sweep.py --config=configs/tiny_sweep.py --workdir=/runs/sweep
  python tools/sweep.py --config=configs/tiny.py --sweep=my_sweep.py --workdir=/runs/sweep --config.train.num_steps=100
  python tools/sweep.py --config=configs/tiny_sweep.py --workdir=/runs/sweep --print_commands

Trials train one after another in this process, each in WORKDIR/trial_NNN_<field=value,...>;
WORKDIR/sweep.json records the spec and each trial's overrides and status, and WORKDIR/results.csv
and results.md the results (the best trial marked). Run the same command again after a stop: it skips
the trials that ended and resumes the unfinished one from its checkpoint. --config.a.b=value overrides
apply to every trial. --print_commands prints one train.py command per trial and runs nothing.
The spec's stop_trials stops trials that fall behind on its metric: the median rule, or successive
halving (configs/tiny_sweep.py:halving); a stopped trial stays stopped when the sweep is run again.
"""

import importlib.util
import inspect
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from training import setup as setup_lib  # noqa: E402
from training import sweeps  # noqa: E402
from training.cli import config_error, define_config_flag, parse_flags  # noqa: E402
from training.validation import ConfigError  # noqa: E402

_CONFIG = define_config_flag(None, "Config file (get_config(), and get_sweep() unless --sweep).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The sweep's directory: sweep.json, results, one workdir per trial.")
_SWEEP = flags.DEFINE_string("sweep", None, "A Python file whose get_sweep() returns the spec (default: --config's).")
_PRINT_COMMANDS = flags.DEFINE_bool("print_commands", False, "Print one train.py command per trial; run nothing.")


def load_sweep(path_and_arg: str, flag: str):
  """get_sweep() of a Python file ("FILE.py" or "FILE.py:arg", as --config takes), or SystemExit."""
  path, _, arg = path_and_arg.partition(":")
  if not os.path.isfile(path):
    raise SystemExit(f"flag error: {flag}={path}: no such file")
  module_spec = importlib.util.spec_from_file_location("loom_sweep_file", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # noqa: BLE001 -- the file's own error, in one line.
    raise SystemExit(f"config error: {path}: {type(e).__name__}: {e}") from None
  get_sweep = getattr(module, "get_sweep", None)
  if get_sweep is None:
    raise SystemExit(f"config error: {path} defines no get_sweep() (training/sweeps.py describes the spec)")
  takes_arg = bool(inspect.signature(get_sweep).parameters)
  return get_sweep(arg) if arg and takes_arg else get_sweep()


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config_file = flags.FLAGS["config"].config_filename
  try:
    spec = sweeps.check_spec(
      load_sweep(_SWEEP.value or config_file, "--sweep" if _SWEEP.value else "--config"), _CONFIG.value
    )
    if _PRINT_COMMANDS.value:
      base_flags = [arg for arg in sys.argv[1:] if arg.startswith("--config.")]
      for line in sweeps.print_commands(spec, config_file, _WORKDIR.value, base_flags):
        print(line)
      return
    setup_lib.use_cpu_devices(_CONFIG.value)  # Before anything starts JAX's backend.
    rows = sweeps.run_sweep(_CONFIG.value, spec, _WORKDIR.value)
  except ConfigError as e:
    raise config_error(e) from None
  print(f"sweep: {sweeps.results_summary(rows)}; {os.path.join(_WORKDIR.value, 'results.md')}")


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  flags.mark_flag_as_required("workdir")
  app.run(main, flags_parser=parse_flags)
