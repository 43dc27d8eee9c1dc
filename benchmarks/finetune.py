"""Fine-tuning and compression of one trained model: what each method costs and what it keeps.

  python benchmarks/finetune.py                                   # about 25 minutes on 2 CPU cores shared with others
  python benchmarks/finetune.py --base=workdirs/quickstart --distill_steps=300   # a trained run: about 10
  python benchmarks/finetune.py --steps=60 --distill_steps=60 --eval_batches=2 --rounds=2   # a smoke run

The model: configs/quickstart.py trained --steps steps on Python's standard library into
WORKDIR/base_STEPS (train.py's run; reused when already there), or the run --base names. Four tables:

a. Full fine-tuning against LoRA (configs/lora_chat.py's adapters: rank 16, alpha 32, on every attention
   and MLP kernel, the base stored in bfloat16) and QLoRA (configs/qlora_chat.py's: the base's kernels in
   NF4), each started from the model (init.checkpoint) and built as train.py builds it: trainable
   parameters; the bytes one device holds of the parameters and of the optimizer state, read from the
   arrays; the median step time over --rounds rounds of --round_steps steps, the three run in turn in
   every round (rotated) so they meet the same machine load, and the median of the per-round ratios.
b. Post-training weight quantization (tools/evaluate.py --quantize): validation loss and perplexity of
   the float32 model, its parameters cast to bfloat16, and its block kernels in int8 (per output
   channel), int4 and NF4 (per group of --quantization_block inputs); weight bytes of the block kernels
   and of the whole model (embeddings and norms stay float32).
c. One-shot magnitude pruning of the block kernels (training/pruning.prune_params), no retraining: 50%
   of each kernel's weights per layer, 50% under one global threshold, and 2:4.
d. Distillation: configs/distill_quickstart.py's student (2 layers of 96) trained --distill_steps steps
   with the model as its teacher, against the same student trained alone for the same steps on the
   same batches (train.py's runs, in WORKDIR/student_*); validation loss, and the median step time
   from their metrics.jsonl.

Every loss is over the same first --eval_batches batches of the validation split (tools/evaluate.py's
evaluate_heldout). Load matters: the header prints the load average at the start.
"""

import dataclasses
import json
import os
import shutil
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from model.quantization import KERNEL_INPUT_AXES  # noqa: E402
from training.cli import skip_absent_tpu  # noqa: E402

_BASE = flags.DEFINE_string("base", "", "A trained run to use (a workdir); default: train configs/quickstart.py.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/loom_bench_finetune", "Scratch directory for the runs made here.")
_STEPS = flags.DEFINE_integer("steps", 600, "Training steps of the quickstart model (without --base).")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 20, "Validation batches of every loss (0: the whole split).")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "(a) timed rounds of each method.")
_ROUND_STEPS = flags.DEFINE_integer("round_steps", 10, "(a) steps per timed round.")
_QUANTIZATION_BLOCK = flags.DEFINE_integer("quantization_block", 64, "(b) int4 / nf4: inputs sharing one scale.")
_DISTILL_STEPS = flags.DEFINE_integer("distill_steps", 600, "(d) training steps of each student.")
_PARTS = flags.DEFINE_list("parts", ["a", "b", "c", "d"], "Which tables to make.")

# The block kernels, whose storage quantization changes.
_KERNELS = tuple(KERNEL_INPUT_AXES)


def _mib(num_bytes: float) -> str:
  return f"{num_bytes / 2**20:.2f}"


def _kernel_bytes(params) -> int:
  """Bytes of the block kernels' leaves (a quantized kernel's codes and scales) in `params`."""
  import jax

  from model.quantization import weight_bytes

  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  names = lambda path: {str(getattr(k, "key", getattr(k, "name", k))) for k in path}  # noqa: E731
  return weight_bytes([leaf for path, leaf in leaves if names(path) & set(_KERNELS)])


def _train(config, workdir: str):
  """train.py's run of `config` in `workdir` (resumed there if it has a checkpoint), quietly."""
  from training.run import train

  start = time.perf_counter()
  result = train(config, workdir)
  print(f"  trained {workdir} to step {config.train.num_steps} ({time.perf_counter() - start:.0f} s)", flush=True)
  return result


def _base_run(workdir: str) -> str:
  """The run the benchmark measures: --base, or the quickstart trained --steps steps here."""
  if _BASE.value:
    return _BASE.value
  from configs import quickstart

  config = quickstart.get_config()
  steps = _STEPS.value
  config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, max(1, steps // 10))
  config.train.update(
    num_steps=steps, eval_every=0, checkpoint_every=steps, num_samples=0, log_every=max(1, steps // 6)
  )
  run = os.path.join(workdir, f"base_{steps}")
  _train(config, run)
  return run


def _evaluate(model, datasets) -> dict:
  from evaluation.heldout import evaluate_heldout

  return evaluate_heldout(model, datasets, "validation", _EVAL_BATCHES.value)["all"]


def _fine_tuning_table(info, datasets) -> list[str]:
  """(a): full fine-tuning, LoRA and QLoRA from the same checkpoint on the same batches."""
  import jax
  import numpy as np

  import sharding
  from configs import lora_chat, qlora_chat
  from training import init_from
  from training.run import STEPS_IN_FLIGHT
  from training.setup import build_setup
  from training.validation import validate

  rounds, round_steps = _ROUNDS.value, _ROUND_STEPS.value
  methods = {"full fine-tuning": None, "LoRA": lora_chat.get_config().lora, "QLoRA": qlora_chat.get_config().lora}
  built = {}
  for name, lora in methods.items():
    config = info.config.copy_and_resolve_references()
    config.init.checkpoint = info.workdir
    config.train.update(num_steps=rounds * round_steps + 1, microbatches=1)
    if lora is not None:
      config.lora.update(**lora.to_dict())
    config = validate(config, jax.device_count(), tokenizer_vocab_size=datasets.tokenizer.vocab_size)
    setup = build_setup(config)
    state, _ = init_from.initial_state(config.init, setup)
    batch = sharding.global_batch_from_local(_model_inputs(next(datasets.train_batches(0, 1))), setup.mesh)
    start = time.perf_counter()
    step = setup.train_step().lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    trained = sum(leaf.size for leaf in jax.tree.leaves(setup.saved_params(state.params)))
    built[name] = dict(
      config=config,
      setup=setup,
      state=state,
      step=step,
      compile_s=compile_s,
      trained=trained,
      total=sum(leaf.size for leaf in jax.tree.leaves(state.params)),
      params_bytes=sharding.bytes_per_device(state.params),
      opt_bytes=sharding.bytes_per_device(state.opt_state),
      round_ms=[],
    )
    print(f"  (a) {name}: compiled in {compile_s:.1f} s", flush=True)

  names = list(built)
  batches = datasets.train_batches(0, rounds * round_steps)
  for r in range(rounds):
    host = [_model_inputs(next(batches)) for _ in range(round_steps)]
    for name in names[r % len(names) :] + names[: r % len(names)]:  # Rotated: none always runs first.
      entry = built[name]
      device = [sharding.global_batch_from_local(b, entry["setup"].mesh) for b in host]
      state, in_flight = entry["state"], []
      start = time.perf_counter()
      for batch in device:  # At most STEPS_IN_FLIGHT ahead of the devices, as train.py.
        state, metrics = entry["step"](state, batch)
        in_flight.append(metrics["loss"])
        if len(in_flight) > STEPS_IN_FLIGHT:
          in_flight.pop(0).block_until_ready()
      metrics["loss"].block_until_ready()  # The round's last step.
      entry["round_ms"].append(1000 * (time.perf_counter() - start) / round_steps)
      entry["state"] = state

  full = built["full fine-tuning"]
  rows = [
    "| method | trainable params | % of model | params MiB/device | optimizer MiB/device | step ms (median) "
    "| step time / full (median of rounds, IQR) | compile s |",
    "|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for name, entry in built.items():
    ratios = np.array(entry["round_ms"]) / np.array(full["round_ms"])
    rows.append(
      f"| {name} | {entry['trained']:,} | {100 * entry['trained'] / full['total']:.2f}% "
      f"| {_mib(entry['params_bytes'])} | {_mib(entry['opt_bytes'])} | {np.median(entry['round_ms']):.1f} "
      f"| {np.median(ratios):.2f}x "
      f"({np.percentile(ratios, 25):.2f}-{np.percentile(ratios, 75):.2f}) | {entry['compile_s']:.1f} |"
    )
  lora = built["LoRA"]["config"].lora
  note = (
    f"LoRA rank {lora.rank}, alpha {lora.alpha:g}, dropout {lora.dropout:g} on {lora.targets}; base "
    f"{lora.base_dtype} (QLoRA: nf4, block {built['QLoRA']['config'].lora.quantization_block}); {rounds} rounds "
    f"of {round_steps} steps, batch {full['config'].train.global_batch_size} x {full['config'].data.seq_len}; "
    "ratio: median (interquartile) over rounds"
  )
  return rows + ["", note]


def _model_inputs(batch):
  """The per-source row counts feed mixture metrics, not the model."""
  return {name: value for name, value in batch.items() if name != "source_counts"}


def _quantization_table(model, datasets, reference: dict) -> list[str]:
  """(b): the model's parameters cast to bfloat16, and its block kernels quantized after training."""
  import jax
  import jax.numpy as jnp

  from evaluation import loading
  from model.quantization import weight_bytes

  def as_bfloat16(leaf):
    return leaf.astype(jnp.bfloat16) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf

  block = _QUANTIZATION_BLOCK.value
  variants = {
    "float32 (trained)": model,
    "bfloat16 (cast)": dataclasses.replace(model, params=jax.jit(lambda p: jax.tree.map(as_bfloat16, p))(model.params)),
    "int8 (per channel)": loading.quantized(model, "int8", block),
    f"int4 (block {block})": loading.quantized(model, "int4", block),
    f"nf4 (block {block})": loading.quantized(model, "nf4", block),
  }
  full_bytes, full_kernels = weight_bytes(model.params), _kernel_bytes(model.params)
  rows = [
    "| weights | val loss | perplexity | vs float32 | block kernels MiB | all weights MiB | size vs float32 |",
    "|---|---:|---:|---:|---:|---:|---:|",
  ]
  for name, variant in variants.items():
    metrics = reference if variant is model else _evaluate(variant, datasets)
    size, kernels = weight_bytes(variant.params), _kernel_bytes(variant.params)
    change = "" if variant is model else f"{100 * (metrics['perplexity'] / reference['perplexity'] - 1):+.2f}%"
    smaller = "1.00x" if variant is model else f"{full_bytes / size:.2f}x smaller"
    rows.append(
      f"| {name} | {metrics['loss']:.4f} | {metrics['perplexity']:.3f} | {change} | {_mib(kernels)}"
      + ("" if variant is model else f" ({full_kernels / kernels:.1f}x smaller)")
      + f" | {_mib(size)} | {smaller} |"
    )
    print(f"  (b) {rows[-1]}", flush=True)
  return rows


def _pruning_table(model, datasets, reference: dict) -> list[str]:
  """(c): one-shot magnitude pruning of the block kernels, evaluated without retraining."""
  from training.pruning import prune_params, sparsity_report

  variants = {
    "50% unstructured, per layer": dict(structure="unstructured", scope="layer", sparsity=0.5),
    "50% unstructured, global": dict(structure="unstructured", scope="global", sparsity=0.5),
    "2:4 (50%)": dict(structure="2:4", sparsity=0.5),
  }
  rows = [
    "| pruning (one-shot, no retraining) | kernel sparsity | val loss | perplexity | vs dense |",
    "|---|---:|---:|---:|---:|",
    f"| none (dense) | 0.0% | {reference['loss']:.4f} | {reference['perplexity']:.3f} | |",
  ]
  for name, fields in variants.items():
    params = prune_params(model.params, **fields)
    metrics = _evaluate(dataclasses.replace(model, params=params), datasets)
    rows.append(
      f"| {name} | {100 * sparsity_report(params)['overall']:.1f}% | {metrics['loss']:.4f} "
      f"| {metrics['perplexity']:.3f} | {100 * (metrics['perplexity'] / reference['perplexity'] - 1):+.1f}% |"
    )
    print(f"  (c) {rows[-1]}", flush=True)
  return rows


def _median_step_ms(workdir: str) -> float:
  """The median step_time_ms of a run's logged steps (metrics.jsonl), its first log line (compiling) left out."""
  import numpy as np

  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    times = [r["step_time_ms"] for r in map(json.loads, f) if "step_time_ms" in r]
  return float(np.median(times[1:] or times))


def _distillation_table(info, datasets, teacher: dict, workdir: str) -> list[str]:
  """(d): the student distilled from the model against the same student trained alone."""
  import model as model_lib
  from configs import distill_quickstart
  from evaluation import loading

  steps = _DISTILL_STEPS.value
  student = distill_quickstart.get_config()
  runs = {}
  for name, teacher_dir in (("distilled", info.workdir), ("alone", "")):
    config = info.config.copy_and_resolve_references()
    config.model.update(
      **{field: student.model[field] for field in ("num_layers", "embed_dim", "num_heads", "mlp_dim")},
      head_dim=0,  # Derived from the student's own width and heads.
      num_kv_heads=0,
    )
    config.data.tokenizer_path = loading.tokenizer_path(info)  # The teacher's tokenizer.
    config.distillation.update(**student.distillation.to_dict())
    config.distillation.teacher = teacher_dir
    config.init.checkpoint = ""
    config.lora.rank = 0
    config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, max(1, steps // 10))
    config.train.update(
      num_steps=steps, eval_every=0, checkpoint_every=steps, num_samples=0, log_every=max(1, steps // 10)
    )
    run = os.path.join(workdir, f"student_{name}")
    shutil.rmtree(run, ignore_errors=True)  # Fresh: the two runs differ only in the teacher.
    _train(config, run)
    loaded = loading.load_model(loading.checkpoint_config(run), datasets.tokenizer)
    runs[name] = dict(
      metrics=_evaluate(loaded, datasets),
      params=model_lib.num_params(loaded.config.model),
      step_ms=_median_step_ms(run),
    )
  alone = runs["alone"]["metrics"]
  rows = [
    "| model | params | training | val loss | perplexity | vs student alone | step ms (median) |",
    "|---|---:|---|---:|---:|---:|---:|",
    f"| teacher | {model_lib.num_params(info.config.model):,} | the model measured above | {teacher['loss']:.4f} "
    f"| {teacher['perplexity']:.3f} | | |",
  ]
  d = student.distillation
  labels = {
    "distilled": f"{steps} steps distilled (T={d.temperature:g}, alpha={d.alpha:g})",
    "alone": f"{steps} steps, cross-entropy alone",
  }
  for name, run in runs.items():
    m = run["metrics"]
    rows.append(
      f"| student, {name} | {run['params']:,} | {labels[name]} | {m['loss']:.4f} | {m['perplexity']:.3f} "
      f"| {m['loss'] - alone['loss']:+.4f} loss | {run['step_ms']:.1f} |"
    )
  return rows


def main(argv):
  del argv
  skip_absent_tpu()
  logging.set_verbosity(logging.ERROR)  # Orbax warns at every read-only restore of the base.
  import jax

  from evaluation import heldout, loading

  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  load = os.getloadavg()
  print(
    f"{jax.devices()[0].platform} x {jax.device_count()}, jax {jax.__version__}, {os.cpu_count()} cores, "
    f"load average {load[0]:.1f} at the start",
    flush=True,
  )
  start = time.perf_counter()
  base = _base_run(workdir)
  info = loading.checkpoint_config(base)
  datasets = heldout.heldout_datasets(info, info.config.train.global_batch_size)
  model = loading.load_model(info, datasets.tokenizer)
  m = model.config.model
  print(
    f"model: {base} step {info.step}, {sum(leaf.size for leaf in jax.tree.leaves(model.params)):,} parameters "
    f"({m.num_layers} layers of {m.embed_dim}, vocabulary {m.vocab_size}); losses over "
    f"{_EVAL_BATCHES.value or 'all'} validation batches of {datasets.global_batch_size} x {info.config.data.seq_len}",
    flush=True,
  )
  reference = _evaluate(model, datasets)
  tables = {}
  if "a" in _PARTS.value:
    tables["a. Full fine-tuning, LoRA and QLoRA"] = _fine_tuning_table(info, datasets)
  if "b" in _PARTS.value:
    tables["b. Post-training weight quantization"] = _quantization_table(model, datasets, reference)
  if "c" in _PARTS.value:
    tables["c. One-shot magnitude pruning"] = _pruning_table(model, datasets, reference)
  if "d" in _PARTS.value:
    tables["d. Distillation"] = _distillation_table(info, datasets, reference, workdir)
  for title, rows in tables.items():
    print(f"\n{title}\n")
    print("\n".join(rows))
  load = os.getloadavg()
  print(f"\n{time.perf_counter() - start:.0f} s in all; load average {load[0]:.1f} at the end")


if __name__ == "__main__":
  app.run(main)
