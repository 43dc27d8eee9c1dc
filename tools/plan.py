"""Does a config fit the slice it is meant for, and how fast will it run? Answered from a CPU.

  python tools/plan.py --config=configs/llama3_8b.py --topology=v5p-64
  python tools/plan.py --config=configs/llama3_1b.py --topology=v5e-16 --search
  python tools/plan.py --config=configs/llama3_8b_gpu.py --topology=h100-8

Compiles the real train step for a TPU topology (libtpu compiles ahead of time without a TPU)
and prints per chip the parameter, optimizer-state and batch bytes, the compiler's temporaries
and code against the chip's HBM, the model FLOPs per step, a roofline estimate of the step time
and its MFU, and a verdict. --search tries remat policies, microbatches, tensor-parallel sizes and
loss chunks, fastest estimate first, and prints the first plan that fits with the overrides that
apply it. A GPU that is not attached is planned from the model (an estimate, said so). Exits 1
when the config does not fit.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# libtpu looks for a TPU's metadata; there is none on the machine a plan is made from.
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
# Planning only compiles: other processes may hold libtpu at the same time (its lock file is for
# processes that drive a TPU).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import app, flags  # noqa: E402

from training import planner  # noqa: E402
from training.cli import config_error, define_config_flag, parse_flags  # noqa: E402
from training.validation import ConfigError  # noqa: E402

_CONFIG = define_config_flag(None, "The config file to plan (get_config()).")
_TOPOLOGY = flags.DEFINE_string("topology", None, "v5e-16, v5p-64, v6e-256, v5p:4x4x4, h100-8, or local.")
_SEARCH = flags.DEFINE_bool(
  "search", False, "Search remat, microbatches, mesh and loss chunk for the fastest plan that fits."
)
_MAX_COMPILES = flags.DEFINE_integer("max_compiles", 8, "With --search: compile at most this many candidates.")


def main(argv):
  del argv
  if _TOPOLOGY.value != "local":  # Compile for the named slice; this machine's devices play no part.
    import jax

    jax.config.update("jax_platforms", "cpu")
  try:
    target = planner.resolve_target(_TOPOLOGY.value)
    if _SEARCH.value:
      result = planner.search(_CONFIG.value, target, _MAX_COMPILES.value)
      print(result.report())
      print("apply with: " + result.overrides())
    else:
      result = planner.plan(_CONFIG.value, target)
      print(result.report())
  except ConfigError as e:
    raise config_error(e) from None
  if result.fits is False:
    raise SystemExit(1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "topology"])
  app.run(main, flags_parser=parse_flags)
