"""Online batch selection: score a larger candidate batch, train on its most useful rows.

With selection.fraction f < 1 the data pipeline loads a candidate batch of train.global_batch_size / f
rows. Inside the jitted step a forward pass without gradient scores every candidate row; the step
then trains on the train.global_batch_size rows with the highest scores (so a run with and without
selection trains on the same number of tokens per step, at the same learning rate). The score of a
row is the current model's mean cross-entropy over its target tokens (Loshchilov & Hutter 2015's
online batch selection), or with selection.reference, that minus a fixed reference model's mean
cross-entropy on the row: the reducible holdout loss of RHO-loss (Mindermann et al. 2022), which
passes over rows that are hard because they are noise (the reference cannot learn them either) and
rows already learnt, in favour of rows that are learnable and not yet learnt. The candidate and
selected row counts are static, so the step compiles once and both batches shard over the
data-parallel axes.
"""

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

import sharding

Batch = dict[str, jax.Array]

FIELD = "config.selection.reference"


def is_on(config: ConfigDict) -> bool:
  """Whether config.selection selects (a config.json from before it existed has none: off)."""
  selection = config.get("selection")
  return selection is not None and selection.fraction < 1.0


def reference_of(config: ConfigDict) -> str:
  """config.selection.reference when selecting, else '' (older configs have neither)."""
  return config.selection.get("reference", "") if is_on(config) else ""


def candidate_rows(fraction: float, global_batch_size: int) -> int:
  """The candidate batch's rows: round(train.global_batch_size / fraction)."""
  return int(round(global_batch_size / fraction))


def loaded_batch_size(config: ConfigDict) -> int:
  """The global batch the data pipeline loads for training: the candidate batch when selecting."""
  if not is_on(config):
    return config.train.global_batch_size
  return candidate_rows(config.selection.fraction, config.train.global_batch_size)


def step_selection(config: ConfigDict) -> int:
  """The train step's `select_rows` for a validated config: 0 when selection is off (fraction 1.0),
  else the rows it trains on, train.global_batch_size."""
  return config.train.global_batch_size if is_on(config) else 0


def flops_per_trained_token(config: ConfigDict, flops_per_token: float) -> float:
  """Model FLOPs a step spends per trained token, counting online selection's scoring pass: a forward
  pass (a third of the training FLOPs) over 1/fraction as many candidate tokens. A reference model's
  forward pass is not counted (as a distillation teacher's is not)."""
  if not is_on(config):
    return flops_per_token
  return flops_per_token * (1.0 + loaded_batch_size(config) / config.train.global_batch_size / 3.0)


def check_config(fraction: float, global_batch_size: int, microbatches: int, batch_shards: int) -> None:
  """Raises ValueError naming config.selection.fraction when the step could not use it: outside (0, 1],
  or a candidate batch (train.global_batch_size / fraction) that is not a whole number of rows, or not
  one train.microbatches * the data-parallel size (mesh.data*mesh.fsdp) divides: candidates are
  scored a microbatch at a time and shard over the data-parallel axes as the batch does."""
  unit = microbatches * batch_shards
  # Fractions giving a candidate batch of a multiple of `unit` rows, up to 16x the trained batch.
  allowed = [
    global_batch_size / (k * unit) for k in range(-(-global_batch_size // unit), 16 * global_batch_size // unit + 1)
  ]
  allowed = [a for a in allowed if 0 < a <= 1]
  shown = ", ".join(f"{a:.4g}" for a in allowed[:12]) + (", ..." if len(allowed) > 12 else "")
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"config.selection.fraction={fraction}: not in (0, 1]; allowed: {shown} (1.0: off)")
  if fraction == 1.0:
    return
  exact = global_batch_size / fraction
  count = candidate_rows(fraction, global_batch_size)
  if abs(exact - count) > 1e-6 * count or count % unit:
    raise ValueError(
      f"config.selection.fraction={fraction}: the candidate batch, train.global_batch_size={global_batch_size} "
      f"/ {fraction} = {exact:g} rows, is not a whole multiple of train.microbatches * mesh.data * "
      f"mesh.fsdp = {unit}; allowed: {shown} (1.0: off)"
    )


def select(
  batch: Batch, loss_sum_B: jax.Array, weight_B: jax.Array, count: int, reference_loss_sum_B: jax.Array | None = None
) -> tuple[Batch, dict[str, jax.Array]]:
  """The `count` rows of the candidate `batch` with the highest scores, and the selection's metrics.

  loss_sum_B, weight_B: per row, the current model's summed cross-entropy and the target weight
  (training.step.row_losses); reference_loss_sum_B: the reference model's summed cross-entropy (RHO-loss),
  or None. A row's score is its mean loss per target token, minus the reference's with one; rows without
  targets (padding) score 0. Metrics (token-weighted mean losses): selection/fraction (of the candidate
  rows trained on), selection/loss_selected and selection/loss_all (the current model on the selected
  and on all candidate rows: their gap is what selecting bought this step), and with a reference,
  selection/reference_loss_selected and selection/reference_loss_all.
  """
  num_rows = loss_sum_B.shape[0]
  per_token = jnp.maximum(weight_B, 1.0)
  score_B = loss_sum_B / per_token
  if reference_loss_sum_B is not None:
    score_B = score_B - reference_loss_sum_B / per_token
  _, index_S = jax.lax.top_k(score_B, count)
  index_S = jnp.sort(index_S)  # Keeps the batch's row order, so selecting every row is the batch itself.

  def take(x):
    return sharding.constrain(jnp.take(x, index_S, axis=0), ("act_batch",) + (None,) * (x.ndim - 1))

  def mean(sum_B, rows=None):
    if rows is None:
      return jnp.sum(sum_B) / jnp.maximum(jnp.sum(weight_B), 1.0)
    return jnp.sum(sum_B[rows]) / jnp.maximum(jnp.sum(weight_B[rows]), 1.0)

  selected = jax.tree.map(take, batch)
  metrics = {
    "selection/fraction": jnp.asarray(count / num_rows, jnp.float32),
    "selection/loss_selected": mean(loss_sum_B, index_S),
    "selection/loss_all": mean(loss_sum_B),
  }
  if reference_loss_sum_B is not None:
    metrics["selection/reference_loss_selected"] = mean(reference_loss_sum_B, index_S)
    metrics["selection/reference_loss_all"] = mean(reference_loss_sum_B)
  return selected, metrics
