"""`train(config, workdir)`: the whole run, top to bottom.

config -> mesh -> data -> setup (model, optimizer, shardings: training/setup.py) ->
state (resumed, from init.checkpoint, or fresh) -> hooks -> loop -> samples.
"""

import collections
import dataclasses
import fcntl
import filecmp
import itertools
import json
import os
import socket
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from ml_collections import ConfigDict

import data
import model as model_lib
import sharding
from data.files import atomic_copy, atomic_write, writable_directory
from evaluation.metrics import byte_lengths
from model.decode import generate_past_context
from model.transformer import CHECKPOINT_INDEPENDENT_FIELDS, COMPUTE_DTYPES
from training import distillation, early_stopping, guards, init_from, planner, selection
from training import hooks as hooks_lib
from training import setup as setup_lib
from training.checkpointing import Checkpointer, locate
from training.cpu_memory import keep_step_buffers_mapped
from training.metric_writers import MetricWriter
from training.peak_flops import peak_flops
from training.preemption import Preemption
from training.state import TrainState, split_trainable
from training.validation import ConfigError, profile_step_range, validate
from version import __version__

STEPS_IN_FLIGHT = 2


@dataclasses.dataclass
class RunResult:
  config: ConfigDict
  state: Any
  graphdef: Any
  tokenizer: Any
  last_metrics: dict[str, float]
  eval_history: list[tuple[int, float]]
  eval_history_by_source: dict[str, list[tuple[int, float]]]
  samples: list[str]
  resumed_from: int | None
  preempted: bool
  early_stopped: bool = False  # Stopped (now or before) by train.early_stopping_*: the run is complete.
  best_step: int | None = None  # The best evaluation's step (of train.early_stopping_metric), if tracked.
  best_value: float | None = None
  diverged: str | None = None  # Why a run stopped at a non-finite value (train.on_nonfinite=stop), if it did.


@dataclasses.dataclass
class Start:
  """Where this run starts: its state, and what it was made from."""

  state: TrainState
  step: int
  resumed_from: int | None  # The workdir's checkpoint step this run resumes, if any.
  init_record: dict[str, Any] | None  # init.checkpoint's record, when the run starts from one.
  resume_changes: list[str]  # How the config differs from the resumed checkpoint's run.
  resume_record: dict[str, Any] | None = None  # The resumed checkpoint's record (early-stopping state).


def train(config: ConfigDict, workdir: str, extra_hooks: Sequence[hooks_lib.Hook] = ()) -> RunResult:
  """Checks the config and the workdir, sets up the model on the mesh, resumes (or initialises) the
  state, trains with the hooks (logging, evaluation, checkpoints, then `extra_hooks`) to the last step
  or SIGTERM, and samples from a finished model."""
  config = _check_config_and_workdir(config, workdir)
  mesh = setup_lib.make_mesh(config)
  datasets, config = _build_datasets(config, workdir)
  setup = setup_lib.build_setup(config, mesh)
  logging.info("model: %.2fM parameters", model_lib.num_params(config.model) / 1e6)
  checkpointer = _open_checkpointer(config, workdir, setup.saved_params)
  start = _resume_or_init(setup, checkpointer, datasets, workdir)
  if jax.process_index() == 0:  # After the resume checks: a refused run leaves the workdir's as it was.
    with atomic_write(os.path.join(workdir, "config.json")) as f:
      f.write(config.to_json(indent=2))
  peak = peak_flops(COMPUTE_DTYPES[config.model.dtype])  # Measured on a CPU: once.
  writer = _open_writer(setup, workdir, start, datasets, peak)
  mixture_stats = hooks_lib.MixtureStats(datasets.names)
  logging_hook, eval_hook, early_stopping_hook, checkpoint_hook, guard_hook = _make_hooks(
    setup, datasets, writer, checkpointer, start, mixture_stats, peak[0]
  )

  # A run that stopped early is complete, as one at num_steps is (unless its patience was raised).
  stopped_before = early_stopping_hook is not None and early_stopping_hook.stop_requested
  state, step, reason = start.state, start.step, None
  batches = _train_batches(
    datasets, mesh, start.step, config.train.stop_at_step or config.train.num_steps, mixture_stats
  )
  first_batch = None if stopped_before else next(batches, None)
  if first_batch is None:
    writer.text(
      f"already at step {start.step}: nothing to train"
      + (f" (it stopped early: {early_stopping_hook.summary()})" if stopped_before else "")
    )
  else:
    teacher = setup.load_teacher()  # config.distillation's, or None.
    if teacher is not None:
      distill = config.distillation
      writer.text(
        f"distilling from {distill.teacher} (temperature {distill.temperature}, alpha {distill.alpha}): the "
        "logged loss is the distillation objective, evaluation the plain cross-entropy"
      )
    reference = setup.load_reference()  # config.selection's (RHO-loss), or None.
    if selection.is_on(config):
      chosen = config.selection
      writer.text(
        f"online batch selection: each step scores {selection.loaded_batch_size(config)} candidate rows and "
        f"trains on the {config.train.global_batch_size} with the highest "
        + (f"loss minus the reference's ({chosen.reference})" if reference is not None else "loss")
      )
    compiled_step = _compile(setup.train_step(teacher, reference), state, first_batch, mesh, writer)
    # The guard hook first: the logging and checkpoint hooks then read its counts up to their step.
    run_hooks = [guard_hook, logging_hook, eval_hook, early_stopping_hook, checkpoint_hook, *extra_hooks]
    run_hooks.append(_profile_hook(config, workdir, writer))  # Last: it starts after a step's other hooks.
    hooks = hooks_lib.Hooks([hook for hook in run_hooks if hook is not None])
    state, step, reason = _loop(
      compiled_step, state, itertools.chain([first_batch], batches), hooks, step, config.train.num_steps
    )
    if reason == hooks_lib.PREEMPTED:
      writer.text(f"preempted (SIGTERM) after step {step}: checkpoint saved; exiting")
    elif reason == hooks_lib.DIVERGED:
      last = checkpointer.latest_step()
      writer.text(
        f"stopped after step {step}: {guard_hook.summary()}"
        + (f"; the last checkpoint is step {last}" if last is not None else "; no checkpoint was saved")
      )
    elif reason == hooks_lib.EARLY_STOPPED:
      # An extra hook (a sweep's trial stopper) may be the one that asked.
      asked = early_stopping_hook is not None and early_stopping_hook.stop_requested
      why = early_stopping_hook.summary() if asked else "a hook asked"
      writer.text(f"stopped early after step {step}: {why}; checkpoint saved")
  checkpointer.close()
  if early_stopping_hook is not None:
    early_stopping_hook.close()

  finished = reason in hooks_lib.COMPLETE  # Trained to the end (or to its early stop) now.
  samples = _samples(config, setup.graphdef, state, datasets.tokenizer) if finished else []
  for text in samples:
    writer.text("--- sample ---\n" + text)
  if finished and config.train.get("plot_curves", False):
    _write_curves(workdir, writer)
  writer.close()
  _unlock_workdir(workdir)
  return RunResult(
    config=config,
    state=state,
    graphdef=setup.graphdef,
    tokenizer=datasets.tokenizer,
    last_metrics=logging_hook.last_logged,
    eval_history=eval_hook.history,
    eval_history_by_source=eval_hook.source_history,
    samples=samples,
    resumed_from=start.resumed_from,
    preempted=reason == hooks_lib.PREEMPTED,
    early_stopped=stopped_before or reason == hooks_lib.EARLY_STOPPED,
    best_step=early_stopping_hook and early_stopping_hook.best_step,
    best_value=early_stopping_hook and early_stopping_hook.best,
    diverged=guard_hook.summary() or None,
  )


def _check_config_and_workdir(config: ConfigDict, workdir: str) -> ConfigDict:
  """Everything that can be checked without data, before anything is built; takes the workdir."""
  setup_lib.use_cpu_devices(config)
  config = validate(config, jax.device_count())
  # A teacher's or selection reference's checkpoint is read after the data are built: a wrong path
  # fails now, naming its field, instead of minutes later.
  fixed_models = [(distillation.FIELD, config.distillation.teacher, config.distillation.step)]
  if selection.reference_of(config):
    fixed_models.append((selection.FIELD, config.selection.reference, config.selection.reference_step))
  for field, path, step in fixed_models:
    if path:
      try:
        locate(path, step, field=f"{field}={path!r}")
      except ValueError as e:
        raise ConfigError(str(e)) from None
  if config.compilation_cache_dir:  # Before anything compiles.
    jax.config.update("jax_compilation_cache_dir", _compilation_cache_dir(config.compilation_cache_dir))
  try:
    writable_directory(workdir)
  except OSError as e:
    raise ConfigError(f"--workdir={workdir} cannot be used as a directory ({e})") from None
  _lock_workdir(workdir)
  keep_step_buffers_mapped()  # On a CPU, the step's large buffers stay mapped (training/cpu_memory.py).
  return config


def _compilation_cache_dir(path: str) -> str:
  """The path, created if local: JAX would otherwise skip an unwritable cache with only a warning."""
  path = os.path.expanduser(path)
  if "://" not in path:  # gs:// and other remote paths are JAX's (etils') to open.
    try:
      writable_directory(path)
    except OSError as e:
      raise ConfigError(
        f"compilation_cache_dir={path!r} cannot be used as a directory ({e}); "
        "give a writable directory, or '' for no cache"
      ) from None
  return path


def _build_datasets(config: ConfigDict, workdir: str) -> tuple[data.Datasets, ConfigDict]:
  """The input, and the config validated against its tokenizer."""
  try:
    datasets = data.build_datasets(
      config.data,
      global_batch_size=config.train.global_batch_size,
      seed=config.seed,
      workdir=workdir,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      train_batch_size=selection.loaded_batch_size(config),  # Online selection's candidate batch.
    )
  except ValueError as e:  # data/ names the data.* field at fault; report it like any config error.
    raise ConfigError(str(e)) from e
  config = validate(config, jax.device_count(), tokenizer_vocab_size=datasets.tokenizer.vocab_size)
  _keep_tokenizer(config.data, workdir)
  try:  # Sampling comes at the end of the run; a prompt the tokenizer cannot encode fails now.
    datasets.tokenizer.encode_batch([config.train.sample_prompt])
  except ValueError as e:
    raise ConfigError(f"train.sample_prompt={config.train.sample_prompt!r}: {e}") from None
  if config.optimizer.warmup_steps >= config.train.num_steps:
    logging.warning(
      "optimizer.warmup_steps=%d >= train.num_steps=%d: the learning rate warms up for the "
      "whole run and never reaches optimizer.learning_rate",
      config.optimizer.warmup_steps,
      config.train.num_steps,
    )
  return datasets, config


def _keep_tokenizer(data_cfg: ConfigDict, workdir: str) -> None:
  """A sentencepiece model named by data.tokenizer_path (another run's, a distillation teacher's) is
  copied to WORKDIR/tokenizer/sp.model, so this run's checkpoints evaluate and sample without that file."""
  path = data_cfg.tokenizer_path
  if jax.process_index() != 0 or data_cfg.tokenizer != "sentencepiece" or not path:
    return
  kept = os.path.join(workdir, "tokenizer", "sp.model")
  if os.path.abspath(path) != os.path.abspath(kept) and not (os.path.isfile(kept) and filecmp.cmp(path, kept, False)):
    os.makedirs(os.path.dirname(kept), exist_ok=True)
    atomic_copy(path, kept)


def _open_checkpointer(config: ConfigDict, workdir: str, saved_params) -> Checkpointer:
  checkpointer = Checkpointer(
    os.path.join(workdir, "checkpoints"),
    keep=config.train.keep_checkpoints,
    keep_every=config.train.keep_checkpoints_every,
    saved_params=saved_params,
  )
  try:
    writable_directory(checkpointer.directory)
  except OSError as e:
    raise ConfigError(f"--workdir={workdir}: cannot write checkpoints to {checkpointer.directory} ({e})") from None
  return checkpointer


def _resume_or_init(setup: setup_lib.Setup, checkpointer: Checkpointer, datasets: data.Datasets, workdir: str) -> Start:
  """Resumes from the latest checkpoint in the workdir, else starts from init.checkpoint or afresh."""
  config = setup.config
  resumed_from, passed_over = checkpointer.latest_resumable_step()
  if passed_over and resumed_from is None:
    raise ConfigError(
      f"{checkpointer.directory} holds no checkpoint this run can resume from "
      f"({'; '.join(f'step {step} {why}' for step, why in passed_over)}); a parameters-only "
      "checkpoint (tools/hf_import.py writes one) starts a run as --config.init.checkpoint "
      "in a new --workdir; else move the directory aside to start afresh"
    )
  for step_passed, why in passed_over:  # Newer steps a damaged disk or a half-finished deletion left.
    logging.warning(
      "checkpoint step %d %s: set aside as %s; resuming from step %d",
      step_passed,
      why,
      checkpointer.set_aside(step_passed),
      resumed_from,
    )
  init_record = resume_record = None
  resume_changes: list[str] = []
  if resumed_from is None and config.init.checkpoint:
    try:
      state, init_record = init_from.initial_state(config.init, setup)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    logging.info("initialised from %s step %d", init_record["directory"], init_record["restored_step"])
  elif resumed_from is None:
    state = setup.init_state()
  else:
    resume_record = checkpointer.record(resumed_from)
    # train.spike_factor toggled changes the optimizer state's layout: one clear error, before the restore.
    guards.check_resume(
      resume_record.get("config", {}), config.train, os.path.join(checkpointer.directory, str(resumed_from))
    )
    resume_changes = _resume_changes(resume_record, config, workdir)
    saved_rows = resume_record.get("data", {}).get("rows", {})
    resume_changes += [
      f"data.sources.{name}: its rows differ from the checkpointed run's (files, tokenizer "
      "or packing changed), so the batches from here on are not the ones that run would have read"
      for name, rows_id in datasets.rows_ids.items()
      if saved_rows.get(name, rows_id) != rows_id
    ]
    try:
      state, record = checkpointer.restore(resumed_from, setup.saved_abstract_state())
    except Exception as e:  # noqa: BLE001 -- a damaged array file: say which checkpoint, and what to do.
      step_dir = os.path.join(checkpointer.directory, str(resumed_from))
      raise ConfigError(
        f"{step_dir} cannot be restored ({type(e).__name__}: {str(e)[:200]}); move it aside "
        f"(mv {step_dir} {step_dir}.damaged) to resume from the step before it"
      ) from None
    if setup.lora:  # The checkpoint holds the adapters; the frozen base is rebuilt as the run began.
      state = state.replace(params=init_from.with_base(setup, state.params))
    logging.info("resumed from step %d (data position %s)", resumed_from, record.get("data"))
  return Start(
    state=state,
    step=int(jax.device_get(state.step)),
    resumed_from=resumed_from,
    init_record=init_record,
    resume_changes=resume_changes,
    resume_record=resume_record,
  )


def _open_writer(
  setup: setup_lib.Setup, workdir: str, start: Start, datasets: data.Datasets, peak: tuple[float, str]
) -> MetricWriter:
  """The metric writer, which starts the log with what this run is and where it starts from; `peak`:
  training/peak_flops.py's FLOP/s and their source."""
  config = setup.config
  # Records past the restored step are rewritten by this run; with nothing restored, those at the
  # start step too (an evaluation of init.checkpoint that a killed earlier attempt logged).
  writer = MetricWriter(
    workdir, config.train.num_steps, resume_step=start.step if start.resumed_from is not None else start.step - 1
  )
  peak, peak_source = peak
  init_record = start.init_record
  writer.text(
    f"loom: {model_lib.num_params(config.model) / 1e6:.2f}M parameters, "
    f"{model_lib.flops_per_token(config.model, config.data.seq_len) / 1e6:.1f} MFLOPs/token, "
    f"peak {peak / 1e9:.0f} GFLOP/s ({peak_source}), mesh {dict(setup.mesh.shape)}, "
    + (
      f"resumed at step {start.step}"
      if start.resumed_from is not None
      else f"initialised from {init_record['directory']} step {init_record['restored_step']}"
      if init_record
      else "fresh start"
    )
  )
  if setup.lora:
    writer.text(_lora_memory_line(setup, start.state))
  if start.resume_changes:
    writer.text("resumed with changes from the checkpointed run: " + "; ".join(start.resume_changes))
  if datasets.bad_data_counts:  # Counted while the data was read, before the first step.
    writer.write(start.step, {f"data/skipped/{reason}": count for reason, count in datasets.bad_data_counts.items()})
  return writer


def _lora_memory_line(setup: setup_lib.Setup, state: TrainState) -> str:
  """What a LoRA run trains and what its state takes on a device, read from the arrays."""
  lora = setup.config.lora
  adapters, base = split_trainable(state.params, setup.trainable)
  trained = sum(leaf.size for leaf in jax.tree.leaves(adapters))
  total = model_lib.num_params(setup.config.model)
  megabytes = lambda tree: sharding.bytes_per_device(tree) / 2**20
  quantized = "" if lora.base_quantization == "none" else f", {lora.base_quantization} kernels"
  return (
    f"LoRA rank {lora.rank} on {lora.targets}: {trained:,} trainable parameters ({100 * trained / total:.2f}% of "
    f"{total:,}); per device: frozen base {megabytes(base):.2f} MB ({lora.base_dtype}"
    f"{quantized}), adapters {megabytes(adapters):.2f} MB, optimizer state {megabytes(state.opt_state):.2f} MB"
  )


def _make_hooks(
  setup: setup_lib.Setup,
  datasets: data.Datasets,
  writer: MetricWriter,
  checkpointer: Checkpointer,
  start: Start,
  mixture_stats: hooks_lib.MixtureStats,
  peak: float,
) -> tuple[
  hooks_lib.LoggingHook,
  hooks_lib.EvalHook,
  early_stopping.EarlyStoppingHook | None,
  hooks_lib.CheckpointHook,
  guards.GuardHook,
]:
  """Logging, evaluation (of the start too, when continued training starts from init.checkpoint),
  early stopping (with train.early_stopping_metric) and checkpoints, in the order they run after a
  step: a checkpoint's record holds the early-stopping state after that step's evaluation. Then the
  divergence guards' hook (training/guards.py), which runs before them all."""
  config, train_cfg = setup.config, setup.config.train
  guard_hook = guards.GuardHook(
    train_cfg.on_nonfinite,
    guards.param_paths(setup.saved_params(setup.abstract_params)),
    writer.text,
    behind=STEPS_IN_FLIGHT,
    spike_factor=train_cfg.spike_factor,
    spike_window=train_cfg.spike_window,
    saved=(start.resume_record or {}).get("guards"),
  )
  logging_hook = hooks_lib.LoggingHook(
    train_cfg.log_every,
    writer,
    start.step,
    train_cfg.global_batch_size * config.data.seq_len,
    selection.flops_per_trained_token(config, model_lib.flops_per_token(config.model, config.data.seq_len)),
    peak,
    extra_metrics=lambda: {**mixture_stats.metrics(), **guard_hook.metrics()},
  )
  # The eval step also sums each target's UTF-8 bytes (for bits per byte): the tokenizer's table, once.
  table = byte_lengths(datasets.tokenizer, config.model.vocab_size)
  eval_step = setup.eval_step(byte_lengths=table)

  def eval_batches(name):
    def batches():
      for local in datasets.eval_batches(name, train_cfg.eval_batches):
        local.pop("source_counts", None)
        yield sharding.global_batch_from_local(local, setup.mesh)

    return batches

  eval_hook = hooks_lib.EvalHook(
    train_cfg.eval_every,
    eval_step,
    {name: eval_batches(name) for name in datasets.names},
    writer,
    evaluate_at_start=start.init_record is not None,
  )
  init_record = start.init_record

  def record(step: int) -> dict[str, Any]:
    return {
      "step": step,
      "loom_version": __version__,
      "data": {
        "seed": config.seed,
        "next_step": step,
        "sources": dict(zip(datasets.names, datasets.weights)),
        "rows": datasets.rows_ids,
      },
      "config": json.loads(config.to_json()),
      "init": init_record and {k: init_record.get(k) for k in ("directory", "restored_step")},
      **({"early_stopping": early_stopping_hook.state_record()} if early_stopping_hook else {}),
      "guards": guard_hook.state_record(),
    }

  early_stopping_hook = None
  if train_cfg.early_stopping_metric:
    early_stopping_hook = early_stopping.EarlyStoppingHook(
      train_cfg.early_stopping_metric,
      train_cfg.early_stopping_mode,
      train_cfg.early_stopping_patience,
      train_cfg.early_stopping_min_delta,
      early_stopping.latest_evaluation(eval_hook),
      # Beside checkpoints/, never in it: its own directory keeps one step, whatever checkpoints/ keeps.
      Checkpointer(
        os.path.join(os.path.dirname(checkpointer.directory), "best"), keep=1, saved_params=setup.saved_params
      )
      if train_cfg.keep_best_checkpoint
      else None,
      record,
      writer.text,
      saved=(start.resume_record or {}).get("early_stopping"),
    )
  checkpoint_hook = hooks_lib.CheckpointHook(train_cfg.checkpoint_every, checkpointer, record)
  return logging_hook, eval_hook, early_stopping_hook, checkpoint_hook, guard_hook


def _profile_hook(config: ConfigDict, workdir: str, writer: MetricWriter) -> hooks_lib.ProfileHook | None:
  """With train.profile_steps: a trace of those steps in WORKDIR/profile."""
  steps = profile_step_range(config.train)
  if steps is None:
    return None
  directory = os.path.join(os.path.abspath(workdir), "profile")
  writer.text(f"profiling steps {steps[0]}-{steps[1]} into {directory}")
  return hooks_lib.ProfileHook(*steps, directory, writer.text)


def _write_curves(workdir: str, writer: MetricWriter) -> None:
  """WORKDIR/curves.png (training/plots.py), where matplotlib is installed. The run is complete and
  saved by now, so a plot that fails is a warning, not a failed run."""
  if jax.process_index() != 0:
    return
  try:
    from training import plots

    path = plots.write_curves(workdir)
  except ImportError as e:
    logging.warning("no curves.png: matplotlib is not importable (%s); pip install matplotlib", e)
    return
  except Exception as e:  # noqa: BLE001 -- see the docstring.
    logging.warning("no curves.png: plotting failed (%s: %s)", type(e).__name__, e)
    return
  writer.text(f"curves: {path} (python tools/plot.py {workdir} --output=FILE redraws them)")


def _train_batches(
  datasets: data.Datasets, mesh, start_step: int, stop_step: int, mixture_stats: hooks_lib.MixtureStats
):
  """The global batches of steps start_step + 1 to stop_step, their sources counted as they pass."""
  for local in datasets.train_batches(start_step, stop_step):
    mixture_stats.add(local.pop("source_counts"))
    yield sharding.global_batch_from_local(local, mesh)


def _compile(train_step, state: TrainState, first_batch, mesh, writer: MetricWriter):
  """The step compiled ahead of time, so that no logged step time includes compiling, and checked
  to fit the devices' memory before the first step, not at its first allocation."""
  compile_start = time.perf_counter()
  try:
    compiled_step = train_step.lower(state, first_batch).compile()
  except Exception as e:  # noqa: BLE001 -- a TPU compiler refuses a step that does not fit its memory.
    too_big = planner.compile_error(e)
    if too_big is None:
      raise
    raise too_big from None
  planner.check_fits(compiled_step, mesh.devices.flat[0])
  writer.text(f"compiled the train step in {time.perf_counter() - compile_start:.1f}s")
  return compiled_step


def _loop(
  compiled_step, state: TrainState, batches, hooks: hooks_lib.Hook, step: int, num_steps: int
) -> tuple[TrainState, int, str]:
  """Trains on every batch, or until SIGTERM or a hook's stop request; the state, its step, and why
  the loop ended (hooks_lib.FINISHED at num_steps, else PREEMPTED, EARLY_STOPPED or STOPPED)."""
  metrics: dict[str, Any] = {}
  hooks.on_start(step, state)
  in_flight = collections.deque()
  with Preemption() as preemption:
    for batch in batches:
      state, metrics = compiled_step(state, batch)
      step += 1
      # Dispatch runs at most STEPS_IN_FLIGHT steps ahead of the devices: enough to prepare the
      # next batch while a step runs, and XLA's CPU runtime can deadlock at a collective's
      # rendezvous when hundreds of multi-device steps are queued (seen with 2 CPU devices).
      in_flight.append(metrics["loss"])
      if len(in_flight) > STEPS_IN_FLIGHT:
        in_flight.popleft().block_until_ready()
      hooks.on_step(step, state, metrics)
      # Every host asks both, every step: the preemption sync point is a step all hosts reach, and
      # the stop request comes from an evaluation every host made of the same global arrays.
      stop_requested, preempted = hooks.stop_requested, preemption.reached(step)
      if stop_requested or preempted:  # A run that is complete ends as one, preempted or not.
        reason = hooks.stop_reason if stop_requested else hooks_lib.PREEMPTED
        hooks.on_end(step, state, metrics, reason)
        return state, step, reason
    # Batches end at train.stop_at_step too: that is no finished run (no final evaluation or samples).
    reason = hooks_lib.FINISHED if step == num_steps else hooks_lib.STOPPED
    hooks.on_end(step, state, metrics, reason)
  return state, step, reason


_workdir_locks = {}  # Released when train() returns; however the process ends, the OS releases them.


def _lock_workdir(workdir: str) -> None:
  """One run per workdir: a second train.py on it would write the same checkpoint steps and logs."""
  if jax.process_index() != 0:  # The hosts of one multi-host run share the workdir.
    return
  path = os.path.join(os.path.abspath(workdir), ".lock")
  if path in _workdir_locks:  # This process already runs in it (train() called again, as tests do).
    return
  handle = open(path, "a+")
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    handle.seek(0)
    holder = handle.read().strip() or "another process"
    handle.close()
    raise ConfigError(
      f"--workdir={workdir} is in use by a running train.py ({holder}); wait for it to end, or use another --workdir"
    ) from None
  except OSError:  # A filesystem without locks (some network mounts): run unguarded.
    pass
  handle.seek(0)
  handle.truncate()
  handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
  handle.flush()
  _workdir_locks[path] = handle


def _unlock_workdir(workdir: str) -> None:
  handle = _workdir_locks.pop(os.path.join(os.path.abspath(workdir), ".lock"), None)
  if handle is not None:
    handle.close()  # Closing the file releases the lock.


def _flat_fields(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flat_fields(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _resume_changes(record: dict[str, Any], config: ConfigDict, workdir: str) -> list[str]:
  """The config fields that differ from the checkpointed run's, as "field: old -> new" lines.

  A different model (beyond CHECKPOINT_INDEPENDENT_FIELDS: switching on remat after running out
  of memory is the common case) or seed (the data order) is refused: the
  workdir belongs to another run. Anything else (the mesh, the batch, the optimizer, the schedule)
  may change, and is reported so that the log says how the resumed run differs.
  """
  saved = _flat_fields(record.get("config", {}))  # {} for a checkpoint written without one.
  current = _flat_fields(json.loads(config.to_json()))
  changed = {
    field: (saved[field], value) for field, value in current.items() if field in saved and saved[field] != value
  }
  refused = [
    f"{field}: {old!r} in the checkpoint, {new!r} now"
    for field, (old, new) in changed.items()
    if field.startswith("model.") and field.removeprefix("model.") not in CHECKPOINT_INDEPENDENT_FIELDS
  ]
  if "seed" in changed:
    refused.append(f"seed: {changed['seed'][0]} in the checkpoint, {config.seed} now (the data order)")
  if refused:
    raise ConfigError(
      f"{workdir} holds a checkpoint of a different run ({'; '.join(refused)}); "
      "use a new --workdir, or the checkpoint's settings to resume it (of the model, only "
      f"{', '.join(sorted(CHECKPOINT_INDEPENDENT_FIELDS))} may change)"
    )
  return [f"{field}: {old!r} -> {new!r}" for field, (old, new) in changed.items()]


def _samples(config, graphdef, state, tokenizer) -> list[str]:
  train_cfg = config.train
  if train_cfg.num_samples == 0:
    return []
  prompt = tokenizer.encode_batch([train_cfg.sample_prompt])[0].tolist() if train_cfg.sample_prompt else []
  if not prompt:
    prompt = [tokenizer.bos_id if tokenizer.bos_id is not None else 0]
  # With the key/value cache, on the state's mesh; a sample longer than the training length goes on
  # from the last half of its window.
  outputs = generate_past_context(
    graphdef,
    state.params,
    [prompt] * train_cfg.num_samples,
    train_cfg.sample_length,
    window=config.data.seq_len,
    temperature=train_cfg.sample_temperature,
    seed=config.seed,
  )
  return [tokenizer.decode(np.asarray(prompt + tokens)) for tokens in outputs]
