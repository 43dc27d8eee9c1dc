"""Divergence guards: updates that would make the state non-finite, or follow a loss spike, are skipped.

The train step (training/step.py) checks, in this order, that the loss, the gradient norm and every
updated parameter are finite (`nonfinite_code`); on a non-finite one it keeps the old parameters and
optimizer state, so no state, and hence no checkpoint, ever holds a non-finite value. Loss spikes
(train.spike_factor) are caught by `spike_guard`, an Optax transformation around the optimizer whose
state is the window of recent losses: being optimizer state, it is checkpointed and restored with the
rest, so a resumed run skips exactly the steps an unbroken one would. It wraps the optimizer only
when spike detection is on, so checkpoints of runs without it keep their layout.

`GuardHook` reads each step's verdict once the step has finished (the loop keeps STEPS_IN_FLIGHT
steps in flight and waits for the oldest), so it adds no device sync; with train.on_nonfinite=stop
it ends the run (DIVERGED) naming the quantity and the step, else it counts the skipped steps, which
the logged metrics report as `skipped_steps` (cumulative over the run, resumes included).
"""

import collections
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from training import hooks as hooks_lib

ON_NONFINITE = ("stop", "skip")  # train.on_nonfinite's choices.
LOSS, GRAD_NORM, FIRST_PARAM = 1, 2, 3  # nonfinite_code's values; 0: all finite.


def param_paths(params) -> list[str]:
  """'blocks/attn/wq'-style names of the leaves of `params`, in the order nonfinite_code numbers them."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  names = []
  for path, _ in flat:
    keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", "")))) for k in path]
    names.append("/".join(k for k in keys if k and k != "value"))
  return names


def nonfinite_code(loss: jax.Array, grad_norm: jax.Array, params) -> jax.Array:
  """The first non-finite quantity as an int32: 0 none, LOSS, GRAD_NORM, or FIRST_PARAM + i for the
  i-th leaf of `params` (param_paths' order). One reduction per leaf: no copy of the parameters."""
  finite_P = jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(params)])
  first_param = FIRST_PARAM + jnp.argmin(finite_P).astype(jnp.int32)  # argmin: the first False.
  code = jnp.where(jnp.all(finite_P), 0, first_param)
  code = jnp.where(jnp.isfinite(grad_norm), code, GRAD_NORM)
  return jnp.where(jnp.isfinite(loss), code, LOSS).astype(jnp.int32)


def keep_old_if(skip: jax.Array, old, new):
  """`old` where `skip`, else `new`, leaf by leaf (the state before a skipped update, or after it)."""
  return jax.tree.map(lambda o, n: jnp.where(skip, o, n), old, new)


def describe(code: int, paths: list[str]) -> str:
  """nonfinite_code's value in words: "loss", "grad_norm" or "parameter blocks/attn/wq"."""
  if code == LOSS:
    return "loss"
  if code == GRAD_NORM:
    return "grad_norm"
  index = code - FIRST_PARAM
  return f"parameter {paths[index]}" if 0 <= index < len(paths) else "parameters"


class SpikeGuardState(NamedTuple):
  inner: optax.OptState  # The wrapped optimizer's state.
  losses_W: jax.Array  # The last `window` finite losses, a ring buffer (float32 [W]).
  count: jax.Array  # Finite losses seen (int32): the next slot is count % W; full once count >= W.
  spike: jax.Array  # Whether the last update was skipped as a spike (bool): the step reports it.


def spike_guard(inner: optax.GradientTransformation, factor: float, window: int):
  """`inner`, except that an update whose `loss` (an extra argument of update) exceeds `factor` times
  the median of the last `window` finite losses is skipped: zero updates, `inner`'s state unchanged.
  Detection starts once the window is full; every finite loss enters it, spikes too, so a lasting
  change of level is followed after window/2 steps instead of being skipped for ever."""

  def init(params):
    return SpikeGuardState(
      inner=inner.init(params),
      losses_W=jnp.zeros((window,), jnp.float32),
      count=jnp.zeros((), jnp.int32),
      spike=jnp.zeros((), bool),
    )

  def update(updates, state: SpikeGuardState, params=None, *, loss, **extra_args):
    del extra_args
    loss = jnp.asarray(loss, jnp.float32)
    finite = jnp.isfinite(loss)
    median = jnp.median(state.losses_W)
    spike = finite & (state.count >= window) & (loss > factor * median)
    new_updates, new_inner = inner.update(updates, state.inner, params)
    new_updates = jax.tree.map(lambda u: jnp.where(spike, jnp.zeros_like(u), u), new_updates)
    new_inner = keep_old_if(spike, state.inner, new_inner)
    losses_W = jnp.where(finite, state.losses_W.at[state.count % window].set(loss), state.losses_W)
    count = state.count + finite.astype(jnp.int32)
    return new_updates, SpikeGuardState(new_inner, losses_W, count, spike)

  return optax.GradientTransformationExtraArgs(init, update)


def with_spike_guard(tx: optax.GradientTransformation, train_cfg) -> optax.GradientTransformation:
  """`tx` wrapped in spike_guard with train.spike_factor > 0, else `tx` itself (the state's layout,
  and so its checkpoints, unchanged)."""
  if not train_cfg.spike_factor:
    return tx
  return spike_guard(tx, train_cfg.spike_factor, train_cfg.spike_window)


def check_resume(saved_config: dict[str, Any], train_cfg, checkpoint: str) -> None:
  """Refuses, with one ConfigError, resuming a checkpoint whose optimizer state has another layout
  than this run's spike guard: train.spike_factor switched on or off (spike_guard wraps the optimizer
  only when it is on), or train.spike_window changed while it is on (the window is a [W] array).
  `saved_config`: the checkpoint's record's config ({} for none: nothing to compare); a record from
  before the guard existed ran without it. Called before anything is restored or compiled."""
  from training.validation import ConfigError  # validation imports this module.

  if not saved_config:
    return
  saved = saved_config.get("train", {})
  old_factor, new_factor = float(saved.get("spike_factor", 0.0) or 0.0), float(train_cfg.spike_factor or 0.0)
  old_window, new_window = saved.get("spike_window"), train_cfg.spike_window
  state = lambda factor: "on" if factor else "off"  # noqa: E731
  if bool(old_factor) != bool(new_factor):
    what = (
      f"train.spike_factor={new_factor:g} turns the loss-spike guard {state(new_factor)}, but {checkpoint} "
      f"was written with train.spike_factor={old_factor:g} (guard {state(old_factor)})"
    )
  elif new_factor and old_window is not None and int(old_window) != new_window:
    what = (
      f"train.spike_window={new_window}, but {checkpoint} was written with train.spike_window={old_window} "
      f"(train.spike_factor={old_factor:g})"
    )
  else:
    return
  raise ConfigError(
    f"{what}: the guard's window of recent losses is part of the optimizer state, so the checkpoint's "
    f"optimizer state does not fit this run's. To resume, keep train.spike_factor={old_factor:g}"
    f"{f' and train.spike_window={old_window}' if old_factor else ''} (--config.train.spike_factor=...); to "
    "change it, start a new run in a new --workdir from this checkpoint's parameters "
    f"(--config.init.checkpoint={checkpoint}; the optimizer state starts afresh)"
  )


def spike_of(opt_state) -> jax.Array | None:
  """The spike flag of a spike_guard state, None for any other optimizer state."""
  return opt_state.spike if isinstance(opt_state, SpikeGuardState) else None


class GuardHook(hooks_lib.Hook):
  """Reads the step's `nonfinite` and `spike` metrics `behind` steps late (finished by then), counts
  skipped updates, and with on_nonfinite="stop" asks the loop to stop at the first non-finite one.

  Runs first among the hooks: the logging hook's `metrics()` call then finds this step's verdict
  queued, and reads it at no cost (the logging hook has waited for the step already).
  """

  stop_reason = hooks_lib.DIVERGED

  def __init__(
    self,
    on_nonfinite: str,
    paths: list[str],
    text: Callable[[str], None],
    behind: int = 2,
    spike_factor: float = 0.0,
    spike_window: int = 0,
    saved: dict[str, Any] | None = None,
  ):
    """`paths`: param_paths of the trained parameters; `text`: a log line; `behind`: steps in flight;
    `saved`: `state_record()` of the checkpoint a resumed run starts from."""
    self.on_nonfinite, self.paths, self.text, self.behind = on_nonfinite, paths, text, behind
    self.spike_factor, self.spike_window = spike_factor, spike_window
    self.pending: collections.deque = collections.deque()
    saved = saved or {}
    self.nonfinite_steps = int(saved.get("nonfinite_steps", 0))
    self.spike_steps = int(saved.get("spike_steps", 0))
    self.diverged: str | None = None  # Why the run stops, once it must.

  def on_step(self, step, state, metrics):
    if "nonfinite" not in metrics:  # A step made without the guards (a test's own).
      return
    self.pending.append((step, metrics["nonfinite"], metrics.get("spike", False), metrics["loss"]))
    while len(self.pending) > self.behind:
      self._read(self.pending.popleft())

  def on_end(self, step, state, metrics, reason):
    self.drain()

  @property
  def stop_requested(self) -> bool:
    return self.diverged is not None

  def drain(self) -> None:
    """Reads every queued verdict (waiting for its step): at a logged or checkpointed step, no wait."""
    while self.pending:
      self._read(self.pending.popleft())

  def metrics(self) -> dict[str, int]:
    """Skipped updates so far, cumulative over the run: the logging hook's extra metrics."""
    self.drain()
    return {
      "skipped_steps": self.nonfinite_steps + self.spike_steps,
      "skipped_steps/nonfinite": self.nonfinite_steps,
      "skipped_steps/spike": self.spike_steps,
    }

  def state_record(self) -> dict[str, int]:
    """What a checkpoint's record holds, so a resumed run continues the counts."""
    self.drain()
    return {"nonfinite_steps": self.nonfinite_steps, "spike_steps": self.spike_steps}

  def summary(self) -> str:
    return self.diverged or ""

  def _read(self, entry) -> None:
    step, code, spike, loss = jax.device_get(entry)
    if int(code):
      self.nonfinite_steps += 1
      what = describe(int(code), self.paths)
      if self.on_nonfinite == "stop":
        if self.diverged is None:
          self.diverged = (
            f"non-finite {what} at step {step}: its update was skipped and the run stops "
            "(train.on_nonfinite=stop); no checkpoint holds a non-finite value"
          )
      else:
        self.text(f"step {step}: non-finite {what}: update skipped (train.on_nonfinite=skip)")
    elif bool(spike):
      self.spike_steps += 1
      self.text(
        f"step {step}: loss {float(loss):.4g} above {self.spike_factor:g} x the median of the last "
        f"{self.spike_window} losses: update skipped (train.spike_factor)"
      )
