"""Every shipped pod config on each slice it names, planned from this machine (tools/plan.py's planner).

  python benchmarks/pod_plans.py            # all of them, a few minutes on 2 cores
  python benchmarks/pod_plans.py --only=llama3_8b

TPU slices are compiled for with libtpu (memory from the compiler, per chip); a GPU node without
a GPU here is estimated from the model. Step time and MFU are the planner's roofline estimate.
Prints a Markdown table (benchmarks/README.md and the README carry it).
"""

import importlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # Compile for the named slices, not for this machine.

from absl import app, flags  # noqa: E402

from training import planner  # noqa: E402
from training.accelerators import GiB  # noqa: E402

POD_CONFIGS = ("gpt2_124m", "llama3_1b", "llama3_8b", "llama3_70b", "llama3_8b_gpu")
_ONLY = flags.DEFINE_list("only", [], "Config names to plan (default: all pod configs).")


def pod_plans(names=POD_CONFIGS):
  """(config name, slice, Plan) for every slice each pod config names."""
  for name in names:
    module = importlib.import_module(f"configs.{name}")
    for slice_name in module.SLICES:
      yield name, slice_name, planner.plan(module.get_config(slice_name), planner.resolve_target(slice_name))


def main(argv):
  del argv
  print(
    "| config | slice | mesh (data, fsdp, tensor) | batch x length | microbatches | remat | attention "
    "| loss chunk | GiB per chip / HBM | memory from | compile s | est. step s | est. MFU |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  start = time.perf_counter()
  for name, slice_name, result in pod_plans(_ONLY.value or POD_CONFIGS):
    total = result.total_bytes or result.floor_bytes()
    s = result.settings
    print(
      f"| {name} | {slice_name} | {result.mesh['data']}, {result.mesh['fsdp']}, {result.mesh['tensor']} "
      f"| {result.batch.split(' (')[0]} | {s['microbatches']} | {s['remat']} | {s['attention']} "
      f"| {s['loss_chunk']} | {'' if result.fits else 'over: '}{total / GiB:.1f} / {result.hbm_bytes / GiB:.1f} "
      f"| {'compiler' if result.compile_seconds is not None else 'estimate'} "
      f"| {'-' if result.compile_seconds is None else f'{result.compile_seconds:.0f}'} "
      f"| {result.step_seconds:.2f} | {result.mfu:.0%} |",
      flush=True,
    )
  print(f"\n{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
  app.run(main)
