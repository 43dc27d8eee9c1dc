"""An example sweep on the tiny config: learning rate by warmup, a 2x2 grid, trials that fall behind stopped.

  python tools/sweep.py --config=configs/tiny_sweep.py --workdir=/tmp/tiny_sweep           # the median rule
  python tools/sweep.py --config=configs/tiny_sweep.py:random --workdir=/tmp/tiny_random
  python tools/sweep.py --config=configs/tiny_sweep.py:halving --workdir=/tmp/tiny_halving  # successive halving

get_sweep() returns plain data (training/sweeps.py describes the format): config files import nothing of loom.
"""

from configs import tiny


def get_config(method: str = "grid"):
  del method  # The sweep's (get_sweep); the config is the same.
  config = tiny.get_config()
  config.train.update(eval_every=10, num_samples=0)  # Four evaluations a trial for the median rule to compare.
  return config


def get_sweep(method: str = "grid"):
  stop_trials = {"rule": "median", "warmup_evaluations": 1, "min_finished": 2}
  if method == "random":
    return {
      "method": "random",
      "num_trials": 4,
      "seed": 0,
      "fields": {
        "optimizer.learning_rate": {"log_uniform": [1e-4, 1e-2]},
        "optimizer.warmup_steps": {"int": [0, 10]},
      },
      "stop_trials": stop_trials,
    }
  if method == "halving":
    # Rungs at steps 10 and 20 of 40 (evaluated: eval_every=10); from the second trial on, a trial continues
    # past a rung only while it is in the better half of the trials that reached it.
    stop_trials = {"rule": "halving", "min_steps": 10, "reduction_factor": 2}
  elif method != "grid":
    raise ValueError(f"configs/tiny_sweep.py:{method}: grid, random or halving")
  return {
    "method": "grid",
    "fields": {"optimizer.learning_rate": [1e-3, 3e-3], "optimizer.warmup_steps": [0, 5]},
    "stop_trials": stop_trials,
  }
