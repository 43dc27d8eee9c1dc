"""The jitted train and eval steps: loss, gradient accumulation, metrics."""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

import sharding
from model.loss import chunked_row_losses
from training.state import TrainState

Batch = dict[str, jax.Array]


def row_losses(graphdef: nnx.GraphDef, params: nnx.State, batch: Batch, dropout_key=None):
  """Per row: summed cross-entropy over weighted target tokens [B], and the weight total [B].

  With model.loss_chunk, the logits are made that many positions at a time (model/loss.py).
  """
  model = nnx.merge(graphdef, params)
  if model.cfg.loss_chunk:
    x_BLD = model.hidden_states(batch["inputs"], batch["segment_ids"], batch["positions"], dropout_key)
    return chunked_row_losses(x_BLD, model.output_kernel(), batch["targets"], batch["weights"], model.cfg.loss_chunk)
  logits_BLV = model(batch["inputs"], batch["segment_ids"], batch["positions"], dropout_key)
  losses_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, batch["targets"])
  weights_BL = batch["weights"]
  return jnp.sum(losses_BL * weights_BL, axis=1), jnp.sum(weights_BL, axis=1)


def token_losses(graphdef: nnx.GraphDef, params: nnx.State, batch: Batch, dropout_key=None):
  """Summed cross-entropy over weighted target tokens, and the weight total."""
  loss_sum_B, weight_B = row_losses(graphdef, params, batch, dropout_key)
  return jnp.sum(loss_sum_B), jnp.sum(weight_B)


def _split_microbatches(batch: Batch, microbatches: int) -> Batch:
  """[B, ...] -> [k, B/k, ...], taking strided rows so every microbatch keeps the batch sharding."""

  def split(x):
    return x.reshape((x.shape[0] // microbatches, microbatches) + x.shape[1:]).swapaxes(0, 1)

  return jax.tree.map(split, batch)


def make_train_step(
  graphdef,
  tx: optax.GradientTransformation,
  schedule,
  mesh: Mesh,
  state_shardings: TrainState,
  microbatches: int = 1,
  dropout: bool = False,
  rules=sharding.DEFAULT_RULES,
):
  """A jitted `step(state, batch) -> (state, metrics)` with the state donated.

  The loss is the mean over all weighted tokens of the global batch; with
  microbatches, summed losses and gradients are accumulated and divided once
  by the total weight, so k microbatches equal one step on the whole batch.
  """

  def grads_and_loss(params, batch, dropout_key):
    (loss_sum, weight), grads = jax.value_and_grad(
      lambda p: token_losses(graphdef, p, batch, dropout_key), has_aux=True
    )(params)
    return grads, loss_sum, weight

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Any]]:
    with sharding.activation_rules(mesh, rules):
      dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step) if dropout else None
      if microbatches == 1:
        grads, loss_sum, weight = grads_and_loss(state.params, batch, dropout_key)
      else:

        def accumulate(carry, micro):
          index, micro_batch = micro
          key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
          grads, loss_sum, weight = grads_and_loss(state.params, micro_batch, key)
          return jax.tree.map(jnp.add, carry, (grads, loss_sum, weight)), None

        zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros(()), jnp.zeros(()))
        micro = (jnp.arange(microbatches), _split_microbatches(batch, microbatches))
        (grads, loss_sum, weight), _ = jax.lax.scan(accumulate, zeros, micro)
      weight = jnp.maximum(weight, 1.0)
      grads = jax.tree.map(lambda g: g / weight, grads)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
    loss = loss_sum / weight
    metrics = {
      "loss": loss,
      "learning_rate": schedule(state.step),
      "grad_norm": optax.tree.norm(grads),
      "param_norm": optax.tree.norm(params),
      "tokens": weight,
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return jax.jit(step, in_shardings=(state_shardings, None), out_shardings=(state_shardings, None), donate_argnums=(0,))


def make_eval_step(graphdef, mesh: Mesh, params_shardings, rules=sharding.DEFAULT_RULES, per_row: bool = False):
  """A jitted `eval(params, batch) -> (loss_sum, weight)`, summed so batches can be pooled;
  with per_row, both are [B], one per row of the batch."""

  def evaluate(params, batch):
    with sharding.activation_rules(mesh, rules):
      return (row_losses if per_row else token_losses)(graphdef, params, batch)

  return jax.jit(evaluate, in_shardings=(params_shardings, None))
