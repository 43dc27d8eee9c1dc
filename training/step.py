"""The jitted train and eval steps: loss, gradient accumulation, metrics."""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

import sharding
from model.layers import dense
from model.loss import chunked_row_losses, cross_entropy
from training import distillation, guards, selection
from training.state import TrainState, join_trainable, split_trainable

Batch = dict[str, jax.Array]


def row_losses(
  graphdef: nnx.GraphDef, params: nnx.State, batch: Batch, dropout_key=None, z_loss=0.0, label_smoothing=0.0
):
  """Per row: summed cross-entropy over weighted target tokens [B], and the weight total [B].

  With model.loss_chunk, the logits are made that many positions at a time (model/loss.py).
  `z_loss`, `label_smoothing`: train.z_loss and train.label_smoothing (model.loss.cross_entropy).
  """
  model = nnx.merge(graphdef, params)
  if model.cfg.loss_chunk:
    x_BLD = model.hidden_states(batch["inputs"], batch["segment_ids"], batch["positions"], dropout_key)
    return chunked_row_losses(
      x_BLD, model.output_kernel(), batch["targets"], batch["weights"], model.cfg.loss_chunk, z_loss, label_smoothing
    )
  logits_BLV = model(batch["inputs"], batch["segment_ids"], batch["positions"], dropout_key)
  return _row_losses_of_logits(logits_BLV, batch["targets"], batch["weights"], z_loss, label_smoothing)


def _row_losses_of_logits(logits_BLV, targets_BL, weights_BL, z_loss=0.0, label_smoothing=0.0):
  losses_BL = cross_entropy(logits_BLV, targets_BL, z_loss, label_smoothing)
  return jnp.sum(losses_BL * weights_BL, axis=1), jnp.sum(weights_BL, axis=1)


def token_losses(
  graphdef: nnx.GraphDef, params: nnx.State, batch: Batch, dropout_key=None, z_loss=0.0, label_smoothing=0.0
):
  """Summed cross-entropy over weighted target tokens, and the weight total."""
  loss_sum_B, weight_B = row_losses(graphdef, params, batch, dropout_key, z_loss, label_smoothing)
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
  trainable=None,
  params_transform=None,
  teacher=None,
  sparsity_of=None,
  z_loss: float = 0.0,
  label_smoothing: float = 0.0,
  select_rows: int = 0,
  reference=None,
):
  """A jitted `step(state, batch) -> (state, metrics)` with the state donated.

  The loss is the mean over all weighted tokens of the global batch; with
  microbatches, summed losses and gradients are accumulated and divided once
  by the total weight, so k microbatches equal one step on the whole batch.
  `trainable` (an nnx filter, training/setup.py's): only those parameters are
  differentiated and updated, the rest pass through as they are (a LoRA base).
  `params_transform`: applied to the parameters the forward pass sees (QAT's fake quantization).
  `teacher`: (graphdef, params, temperature, alpha) of knowledge distillation (training/distillation.py);
  the step then takes the teacher's parameters as an argument at every call (a BoundStep), never as
  constants compiled into it. `sparsity_of`: with pruning, logs the kernels' fraction of zeros.
  `z_loss`, `label_smoothing`: train.z_loss and train.label_smoothing, in the trained (and logged)
  loss alone; evaluation reports the plain cross-entropy.
  `select_rows`: online batch selection (training/selection.py; 0: off). The batch is the candidate
  batch: a forward pass without gradient scores each row by the current model's mean cross-entropy
  (minus `reference`'s, (graphdef, params) of a fixed model: RHO-loss), and the step trains
  (microbatches, loss, gradients) on the `select_rows` highest-scoring rows alone.
  Fixed models' parameters (a teacher's, a reference's) are arguments of every call (a BoundStep),
  never constants compiled into the step.

  Divergence guards (training/guards.py): an update after which the loss, the gradient norm or a
  trained parameter is not finite is skipped (parameters and optimizer state as they were; the step
  counter advances, so the next batch is the next step's); `metrics["nonfinite"]` says which came
  first (guards.nonfinite_code). With a spike_guard optimizer (train.spike_factor), its update is given
  the loss, and `metrics["spike"]` says whether it skipped the update as a spike.
  """
  transform = params_transform or (lambda params: params)

  def losses(params, batch, dropout_key, teacher_params):
    if teacher is None:
      return token_losses(graphdef, params, batch, dropout_key, z_loss, label_smoothing)
    teacher_graphdef, _, temperature, alpha = teacher
    return distillation.token_losses_with_teacher(
      graphdef, params, teacher_graphdef, teacher_params, batch, temperature, alpha, dropout_key
    )

  def grads_and_loss(trained, frozen, batch, dropout_key, teacher_params):
    (loss_sum, weight), grads = jax.value_and_grad(
      lambda t: losses(transform(join_trainable(t, frozen)), batch, dropout_key, teacher_params), has_aux=True
    )(trained)
    return grads, loss_sum, weight

  def row_scores(model_graphdef, params, batch):
    """Per row of the candidate batch: the plain cross-entropy sum and target weight, without dropout
    or regularisers; a microbatch at a time with train.microbatches, as the training pass runs."""
    if microbatches == 1:
      return row_losses(model_graphdef, params, batch)
    loss_kB, weight_kB = jax.lax.map(
      lambda micro: row_losses(model_graphdef, params, micro), _split_microbatches(batch, microbatches)
    )
    return loss_kB.swapaxes(0, 1).reshape(-1), weight_kB.swapaxes(0, 1).reshape(-1)  # Back to the batch's order.

  def step(state: TrainState, batch: Batch, fixed=None) -> tuple[TrainState, dict[str, Any]]:
    fixed = fixed or {}
    teacher_params = fixed.get("teacher")
    with sharding.activation_rules(mesh, rules):
      dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step) if dropout else None
      trained, frozen = split_trainable(state.params, trainable)
      selection_metrics = {}
      if select_rows:
        loss_sum_B, weight_B = row_scores(graphdef, transform(state.params), batch)
        reference_loss_sum_B = None if reference is None else row_scores(reference[0], fixed["reference"], batch)[0]
        batch, selection_metrics = selection.select(batch, loss_sum_B, weight_B, select_rows, reference_loss_sum_B)
      if microbatches == 1:
        grads, loss_sum, weight = grads_and_loss(trained, frozen, batch, dropout_key, teacher_params)
      else:

        def accumulate(carry, micro):
          index, micro_batch = micro
          key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
          grads, loss_sum, weight = grads_and_loss(trained, frozen, micro_batch, key, teacher_params)
          return jax.tree.map(jnp.add, carry, (grads, loss_sum, weight)), None

        zeros = (jax.tree.map(jnp.zeros_like, trained), jnp.zeros(()), jnp.zeros(()))
        micro = (jnp.arange(microbatches), _split_microbatches(batch, microbatches))
        (grads, loss_sum, weight), _ = jax.lax.scan(accumulate, zeros, micro)
      weight = jnp.maximum(weight, 1.0)
      grads = jax.tree.map(lambda g: g / weight, grads)
      loss, grad_norm = loss_sum / weight, optax.tree.norm(grads)
      spike_guarded = guards.spike_of(state.opt_state) is not None
      updates, opt_state = tx.update(grads, state.opt_state, trained, **({"loss": loss} if spike_guarded else {}))
      updated = optax.apply_updates(trained, updates)
      nonfinite = guards.nonfinite_code(loss, grad_norm, updated)
      trained, opt_state = guards.keep_old_if(nonfinite > 0, (trained, state.opt_state), (updated, opt_state))
    metrics = {
      "loss": loss,
      "learning_rate": schedule(state.step),
      "grad_norm": grad_norm,
      "param_norm": optax.tree.norm(trained),  # Of the trained parameters (a LoRA run's adapters).
      "tokens": weight,
      "nonfinite": nonfinite,
      **selection_metrics,
    }
    if spike_guarded:  # A step skipped as non-finite is counted as that, not as a spike.
      metrics["spike"] = guards.spike_of(opt_state) & (nonfinite == 0)
    if sparsity_of is not None:
      metrics["sparsity"] = sparsity_of(trained)
    params = join_trainable(trained, frozen)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  fixed = {}
  if teacher is not None:
    fixed["teacher"] = teacher[1]
  if reference is not None:
    if not select_rows:
      raise ValueError("make_train_step: a selection reference model scores rows only with select_rows > 0")
    fixed["reference"] = reference[1]
  if not fixed:
    return jax.jit(
      step, in_shardings=(state_shardings, None), out_shardings=(state_shardings, None), donate_argnums=(0,)
    )
  fixed_shardings = jax.tree.map(lambda leaf: leaf.sharding, fixed)
  jitted = jax.jit(
    step,
    in_shardings=(state_shardings, None, fixed_shardings),
    out_shardings=(state_shardings, None),
    donate_argnums=(0,),
  )
  return BoundStep(jitted, (fixed,))


@dataclasses.dataclass(frozen=True)
class BoundStep:
  """A jitted `f(state, batch, *bound)` used as `step(state, batch)`: the bound arrays (fixed models'
  parameters: a teacher's, a selection reference's) are arguments of every call, so they are neither
  compiled in as constants nor copied. `lower(...).compile()` gives a compiled step bound the same way."""

  function: Any
  bound: tuple

  def __call__(self, state, batch):
    return self.function(state, batch, *self.bound)

  def lower(self, state, batch) -> "BoundStep":
    return BoundStep(self.function.lower(state, batch, *self.bound), self.bound)

  def compile(self) -> "BoundStep":
    return BoundStep(self.function.compile(), self.bound)

  def __getattr__(self, name):  # memory_analysis(), cost_analysis(), as_text() of the wrapped stage.
    return getattr(self.function, name)


def _chunked_predictions(x_BLD, kernel_DV, chunk: int):
  """The argmax token of every position [B, L], the logits made `chunk` positions at a time as
  model/loss.py's chunked loss makes them (no gradient here, so nothing is rematerialised)."""
  batch, length, _ = x_BLD.shape
  chunk = min(chunk, length)
  num_chunks = -(-length // chunk)
  x_BLD = jnp.pad(x_BLD, ((0, 0), (0, num_chunks * chunk - length), (0, 0)))
  x_TBCD = x_BLD.reshape(batch, num_chunks, chunk, -1).swapaxes(0, 1)
  kernel_DV = sharding.constrain(kernel_DV, ("act_embed", "vocab"))

  def body(carry, x_BCD):
    logits_BCV = dense(x_BCD, kernel_DV, 1, x_BCD.dtype).astype(jnp.float32)
    return carry, jnp.argmax(logits_BCV, axis=-1)

  _, predictions_TBC = jax.lax.scan(body, None, x_TBCD)
  return predictions_TBC.swapaxes(0, 1).reshape(batch, num_chunks * chunk)[:, :length]


def row_eval_sums(graphdef: nnx.GraphDef, params: nnx.State, batch: Batch, byte_lengths_V: jax.Array):
  """Per row [B]: summed cross-entropy ("loss", row_losses' numbers exactly), target weight
  ("tokens"), weighted targets that are the argmax prediction ("correct") and UTF-8 bytes of the
  weighted targets ("bytes", byte_lengths_V: each token id's byte count)."""
  model = nnx.merge(graphdef, params)
  targets_BL, weights_BL = batch["targets"], batch["weights"]
  if model.cfg.loss_chunk:
    x_BLD = model.hidden_states(batch["inputs"], batch["segment_ids"], batch["positions"])
    kernel_DV = model.output_kernel()
    loss_B, tokens_B = chunked_row_losses(x_BLD, kernel_DV, targets_BL, weights_BL, model.cfg.loss_chunk)
    predictions_BL = _chunked_predictions(x_BLD, kernel_DV, model.cfg.loss_chunk)
  else:
    logits_BLV = model(batch["inputs"], batch["segment_ids"], batch["positions"])
    loss_B, tokens_B = _row_losses_of_logits(logits_BLV, targets_BL, weights_BL)
    predictions_BL = jnp.argmax(logits_BLV, axis=-1)
  correct_B = jnp.sum((predictions_BL == targets_BL) * weights_BL, axis=1)
  bytes_B = jnp.sum(jnp.take(byte_lengths_V, targets_BL, axis=0) * weights_BL, axis=1)
  return {"loss": loss_B, "tokens": tokens_B, "correct": correct_B, "bytes": bytes_B}


def make_eval_step(
  graphdef,
  mesh: Mesh,
  params_shardings,
  rules=sharding.DEFAULT_RULES,
  per_row: bool = False,
  byte_lengths=None,
  params_transform=None,
):
  """A jitted `eval(params, batch) -> (loss_sum, weight)`, summed so batches can be pooled;
  with per_row, both are [B], one per row of the batch.

  With `byte_lengths` (a [V] table of each token id's UTF-8 bytes: evaluation.metrics.byte_lengths),
  it returns row_eval_sums' dict instead, {"loss", "tokens", "correct", "bytes"}, summed or per row;
  the table is one array argument of the compiled step, not a constant folded into it.
  `params_transform`: applied to the parameters first (QAT's fake quantization).
  """
  transform = params_transform or (lambda params: params)
  if byte_lengths is None:

    def evaluate(params, batch):
      with sharding.activation_rules(mesh, rules):
        return (row_losses if per_row else token_losses)(graphdef, transform(params), batch)

    return jax.jit(evaluate, in_shardings=(params_shardings, None))

  def evaluate_sums(params, batch, byte_lengths_V):
    with sharding.activation_rules(mesh, rules):
      sums = row_eval_sums(graphdef, transform(params), batch, byte_lengths_V)
    return sums if per_row else jax.tree.map(jnp.sum, sums)

  jitted = jax.jit(evaluate_sums, in_shardings=(params_shardings, None, None))
  byte_lengths_V = jnp.asarray(byte_lengths, jnp.float32)
  return lambda params, batch: jitted(params, batch, byte_lengths_V)
