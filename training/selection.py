"""Online batch selection: train on the rows of each batch the current model finds hardest.

The data pipeline's global batch is the candidate batch. Inside the jitted step, a forward pass
without gradient scores every row by the current model's mean cross-entropy over its target tokens;
the step then takes its gradient on the `selection.fraction` of rows with the highest score alone
(Loshchilov & Hutter's online batch selection; RHO-loss, Mindermann et al. 2022, without a
reference model: its score is this one minus a reference model's loss). The number of selected rows
is static (round(fraction * batch)), so the step compiles once and the selected batch shards over
the data-parallel axes as the candidate batch does.
"""

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

import sharding

Batch = dict[str, jax.Array]


def selected_rows(fraction: float, global_batch_size: int) -> int:
  """How many of the batch's rows a step trains on: round(fraction * batch)."""
  return int(round(fraction * global_batch_size))


def step_selection(config: ConfigDict) -> int:
  """The train step's `select_rows` for a validated config: 0 when selection is off (fraction 1.0,
  or a config from before config.selection existed), else the static number of selected rows."""
  selection = config.get("selection")
  if selection is None or selection.fraction >= 1.0:
    return 0
  return selected_rows(selection.fraction, config.train.global_batch_size)


def check_config(fraction: float, global_batch_size: int, microbatches: int, batch_shards: int) -> None:
  """Raises ValueError naming config.selection.fraction when the step could not use it: outside (0, 1], or
  selecting a row count that train.microbatches * the data-parallel size (mesh.data*mesh.fsdp) does not
  divide, so the selected batch could not be split and sharded as the candidate batch is."""
  unit = microbatches * batch_shards
  allowed = [k * unit / global_batch_size for k in range(1, global_batch_size // unit + 1)]
  shown = ", ".join(f"{a:g}" for a in allowed[:16]) + (", ..." if len(allowed) > 16 else "")
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"config.selection.fraction={fraction}: not in (0, 1]; allowed: {shown} (1.0: off)")
  if fraction == 1.0:
    return
  count = selected_rows(fraction, global_batch_size)
  if count == 0 or count % unit:
    raise ValueError(
      f"config.selection.fraction={fraction}: selects round({fraction} * train.global_batch_size="
      f"{global_batch_size}) = {count} rows, not a positive multiple of train.microbatches * mesh.data * "
      f"mesh.fsdp = {unit}; allowed: {shown} (1.0: off)"
    )


def select(batch: Batch, loss_sum_B: jax.Array, weight_B: jax.Array, count: int) -> tuple[Batch, dict[str, jax.Array]]:
  """The `count` rows of `batch` with the highest mean loss per target token, and their metrics.

  loss_sum_B, weight_B: per row, the summed cross-entropy and the target weight (training.step.row_losses).
  Rows without targets (padding) score 0. Metrics: selection/fraction (of the rows), selection/
  loss_selected and selection/loss_all (token-weighted mean loss of the selected and of all rows).
  """
  num_rows = loss_sum_B.shape[0]
  score_B = loss_sum_B / jnp.maximum(weight_B, 1.0)
  _, index_S = jax.lax.top_k(score_B, count)
  index_S = jnp.sort(index_S)  # Keeps the batch's row order, so selecting every row is the batch itself.

  def take(x):
    return sharding.constrain(jnp.take(x, index_S, axis=0), ("act_batch",) + (None,) * (x.ndim - 1))

  selected = jax.tree.map(take, batch)
  metrics = {
    "selection/fraction": jnp.asarray(count / num_rows, jnp.float32),
    "selection/loss_selected": jnp.sum(loss_sum_B[index_S]) / jnp.maximum(jnp.sum(weight_B[index_S]), 1.0),
    "selection/loss_all": jnp.sum(loss_sum_B) / jnp.maximum(jnp.sum(weight_B), 1.0),
  }
  return selected, metrics
