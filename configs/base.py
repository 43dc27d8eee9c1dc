"""Every config field loom knows, with its default. Other configs start from here.

A field that is not in this file is an error, so a typo in a config or an
override fails loudly before anything runs.
"""

from ml_collections import ConfigDict

# Every field of a data source (config.data.sources.NAME), with its default.
SOURCE_DEFAULTS = dict(
  kind="text",  # text | jsonl | parquet | tfds | chat | stdlib | prepared
  paths="",  # comma-separated globs (text, jsonl, parquet, chat); a directory (prepared)
  max_files=0,  # keep the first N matched files after sorting (0: all)
  field="text",  # the jsonl / parquet column / tfds feature holding the text
  name="",  # tfds dataset, e.g. "lm1b", "c4/en:3.0.1"
  split="train",  # tfds split, e.g. "train[:1%]"
  data_dir="",  # tfds data_dir ("": tfds's default)
  max_documents=0,  # stop reading after N documents (0: all)
  weight=1.0,  # share of the training examples (weights are normalised)
)


def source(**fields) -> ConfigDict:
  """A data source with every field present, so `--config.data.sources.NAME.FIELD=...` works."""
  unknown = set(fields) - set(SOURCE_DEFAULTS)
  if unknown:
    raise ValueError(f"unknown data source field(s) {sorted(unknown)}; fields: {', '.join(SOURCE_DEFAULTS)}")
  return ConfigDict({**SOURCE_DEFAULTS, **fields})


def get_config() -> ConfigDict:
  config = ConfigDict()
  config.seed = 0
  # On a CPU host: split it into this many XLA devices, each running its share of
  # the mesh (data parallelism across cores). 0: JAX's default, one CPU device
  # whose ops are multithreaded. -1: one device per core this process may use
  # (its affinity mask), fewer where needed so the mesh fits and the batch divides
  # over it (sharding/mesh.py, resolve_cpu_devices). Ignored on TPU/GPU hosts.
  config.cpu_devices = 0
  # XLA's persistent compilation cache: compiled programs are kept in this directory
  # (local or a shared path such as gs://...) across runs, so a restarted or resumed run,
  # a preempted pod job above all, loads its steps instead of compiling them again.
  # "": off (unless JAX_COMPILATION_CACHE_DIR is set). JAX caches compiles of 1 s or more.
  config.compilation_cache_dir = ""

  config.model = ConfigDict(
    dict(
      vocab_size=0,  # 0: the tokenizer's vocabulary size.
      num_layers=4,
      embed_dim=128,
      num_heads=4,
      num_kv_heads=0,  # 0: num_heads (no grouped-query attention).
      head_dim=0,  # 0: embed_dim // num_heads.
      mlp_dim=512,
      max_seq_len=128,
      norm="layernorm",  # layernorm | rmsnorm
      norm_eps=1e-5,
      position="learned",  # learned | rope
      rope_theta=10000.0,
      mlp="gelu",  # gelu | swiglu
      gelu_approximate=False,  # tanh GELU (GPT-2) instead of exact erf GELU.
      tie_embeddings=True,
      use_bias=False,
      qkv_bias=False,  # biases on q/k/v alone (Qwen2); use_bias already implies them.
      dtype="float32",  # compute dtype: float32 | bfloat16 (parameters stay float32)
      scan_layers=True,  # lax.scan over layers: compile time independent of depth.
      remat="none",  # what a block keeps for the backward pass: none (everything) | full
      # (nothing) | dots (matmul outputs) | proj (the attention projections and
      # the MLP input and output) | offload (proj's, kept in host memory).
      attention="auto",  # auto (the platform's best) | xla ([L, L] scores) | blockwise (online
      # softmax over key blocks, pure JAX) | splash (Pallas TPU kernel) | cudnn
      attention_block=512,  # blockwise / splash: query and key block length.
      loss_chunk=0,  # cross-entropy over this many positions of each row at a time, the
      # output projection recomputed in the backward pass (0: the whole row).
      dropout_rate=0.0,
      init_std=0.02,
    )
  )

  config.data = ConfigDict(
    dict(
      # Named sources mixed by weight; see source() below. Python's standard library by default.
      sources=ConfigDict({"main": source(kind="stdlib")}),
      seq_len=128,
      tokenizer="sentencepiece",  # sentencepiece | byte | char | huggingface (a tokenizer.json)
      tokenizer_path="",  # a sentencepiece .model; "": a prepared source's, or train one on the
      # sources (cached in the workdir).
      tokenizer_vocab_size=4096,
      tokenizer_model_type="bpe",  # bpe | unigram
      validation_fraction=0.1,  # the last share of each source's tokens (of each chunk when prepared).
      shuffle=True,
      windows="shifted",  # aligned | shifted (later epochs at a random offset) | random (nanoGPT's
      # i.i.d. windows, no epochs); see data/pipeline.py.
      bad_data="skip",  # skip (and count in the metrics) | stop: what a bad record does.
      chat_template="chatml",  # how chat sources render messages into tokens.
      chat_loss_on="assistant",  # assistant | all: which chat tokens are loss targets.
      # Text augmentation of training batches (never evaluation ones), reproducible from (seed, step);
      # every probability 0 (the default) makes batches exactly as without it. See data/augment.py.
      augment=ConfigDict(
        dict(
          token_mask=0.0,  # per input token: becomes mask_id (targets stay the clean next tokens).
          mask_id=-1,  # the id token_mask writes; -1: the tokenizer's <unk> (byte and char have none).
          token_replace=0.0,  # per input token: becomes a uniformly random vocabulary token (targets clean).
          span_delete=0.0,  # per row: one span of 1..span_delete_max tokens deleted (the row ends in padding).
          span_delete_max=8,  # the longest deleted span, in tokens (< data.seq_len).
          sentence_shuffle=0.0,  # per row: the sentences of each document in it put in a random order.
          sentence_ends=".!?",  # a token whose text (trailing spaces removed) ends in one of these ends a sentence.
        )
      ),
    )
  )

  # Device mesh; one axis may be -1 (all remaining devices).
  config.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  config.optimizer = ConfigDict(
    dict(
      name="adamw",  # adamw | sgd | adafactor
      learning_rate=1e-3,  # peak
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,
      decay_embeddings=False,  # norms and biases are never decayed.
      momentum=0.9,  # sgd
      nesterov=False,  # sgd
      grad_clip_norm=1.0,  # 0: no clipping.
      schedule="warmup_cosine",  # warmup_cosine | warmup_linear | constant | wsd | rsqrt
      warmup_steps=100,
      min_lr_ratio=0.1,  # final learning rate / peak (cosine, linear, wsd).
      decay_fraction=0.2,  # wsd: share of the steps spent decaying.
    )
  )

  # Start from another run's parameters (continued pre-training, fine-tuning, a converted Hugging
  # Face model) instead of a fresh initialisation. Ignored when the workdir has its own checkpoint
  # (the run then resumes).
  config.init = ConfigDict(
    dict(
      checkpoint="",  # a loom workdir, its checkpoints/ directory, or one checkpoints/STEP.
      step=-1,  # which of its steps (-1: the latest).
      load_optimizer=False,  # also its optimizer state (needs the same optimizer and shapes).
      keep_step=False,  # continue its step counter instead of starting the schedule at 0.
      freeze="",  # comma-separated regexes of parameter paths to keep fixed, e.g.
      # "embed,final_norm" (paths look like blocks/attn/wq).
      freeze_layers="",  # layer indices to keep fixed, e.g. "0-5,7" (every parameter of those blocks).
    )
  )

  # Magnitude pruning of the matmul kernels (training/pruning.py): masks in the optimizer state keep
  # pruned weights exactly zero; they are checkpointed, resumed and sharded with it.
  config.pruning = ConfigDict(
    dict(
      method="none",  # none | magnitude
      structure="unstructured",  # unstructured | 2:4 (2 zeros in every 4 consecutive input weights)
      scope="layer",  # unstructured: layer (the sparsity in each layer slice of each kernel) | global
      # (one threshold over all pruned weights). 2:4 holds per group of 4 either way.
      sparsity=0.5,  # the final fraction of zeros (2:4: exactly 0.5).
      begin_step=0,  # gradual pruning on Zhu & Gupta's cubic schedule from here...
      end_step=0,  # ...to the final sparsity here (== begin_step: one-shot at begin_step).
      every=100,  # recompute the masks every N steps between begin_step and end_step.
      targets="blocks/(attn/(wq|wk|wv|wo)|mlp/(w_up|w_gate|w_down))",  # a regex over kernel paths; embeddings,
      # norms and biases are never pruned (the untied head, path "head", may be).
    )
  )

  # Knowledge distillation (training/distillation.py): the model also learns a fixed teacher's
  # softened next-token distribution. Per target token the loss is alpha * T^2 * KL(teacher || student),
  # both softmaxes at temperature T, plus (1 - alpha) * the cross-entropy with the data's targets.
  # Evaluation stays the plain cross-entropy.
  config.distillation = ConfigDict(
    dict(
      teacher="",  # "": off. A loom workdir, its checkpoints/ directory, one checkpoints/STEP, or a
      # tools/hf_import.py output; its model is its record's, its vocabulary must be this run's.
      step=-1,  # which of its steps (-1: the latest).
      temperature=2.0,  # T > 0: above 1 softens both distributions, exposing the teacher's ranking of unlikely tokens.
      alpha=0.5,  # in [0, 1]: the distillation term's weight; 1 - alpha weights the cross-entropy.
    )
  )

  # LoRA (model/lora.py): low-rank adapters train beside chosen kernels, the rest of the model frozen;
  # gradients and optimizer state exist for the adapters alone, and checkpoints hold only them (the
  # base is rebuilt from init.checkpoint, or from the seed without one). QLoRA: base_quantization.
  config.lora = ConfigDict(
    dict(
      rank=0,  # 0: off (every parameter trains, as init.freeze allows).
      alpha=16.0,  # the adapters' update is scaled by alpha / rank.
      dropout=0.0,  # dropout on the adapters' input, in training.
      targets="blocks/attn/(wq|wk|wv|wo)|blocks/mlp/(w_up|w_gate|w_down)",  # a regex over kernel paths.
      # a regex over parameter path prefixes, as init.freeze's ("embed|head": the embeddings and an
      # untied head): those train in full beside the adapters, in model.param_dtype, and are
      # checkpointed with them (PEFT's modules_to_save). "": none. Not the kernels of lora.targets.
      train_full="",
      base_dtype="bfloat16",  # float32 | bfloat16: the frozen base's stored dtype.
      base_quantization="none",  # none | int8 (per output channel) | nf4 (4-bit NormalFloat): QLoRA's
      # frozen block kernels, dequantized a layer at a time inside the step.
      quantization_block=64,  # nf4: the group of input rows sharing one scale.
    )
  )

  # Quantization-aware training (model/quantization.py): the block kernels are quantized and
  # dequantized in the forward pass of training and evaluation (gradients pass straight through), so
  # the weights learn to survive the quantization that tools/evaluate.py --quantize applies after.
  config.quantization = ConfigDict(
    dict(
      qat="none",  # none | int8 (per output channel) | int4 (symmetric, per group) | nf4 (per group)
      block=64,  # int4 / nf4: the input rows sharing one scale.
    )
  )

  # Online batch selection (training/selection.py): the pipeline loads a candidate batch of
  # train.global_batch_size / fraction rows; a forward pass without gradient scores each row by the
  # current model's mean loss (minus a reference model's: RHO-loss), and the step trains on the
  # train.global_batch_size highest-scoring rows. Logs selection/* (fraction, losses of selected vs all).
  config.selection = ConfigDict(
    dict(
      fraction=1.0,  # the share of the candidate rows trained on; 1.0: off (plain training, no scoring pass).
      reference="",  # "": none. A checkpoint (loom run or tools/hf_import.py output, this run's vocabulary)
      # of a model trained on holdout data: a row's score is then its loss minus the reference's.
      reference_step=-1,  # which of its steps (-1: the latest).
    )
  )

  config.train = ConfigDict(
    dict(
      num_steps=1000,  # the length of the run (and of the learning-rate schedule).
      stop_at_step=0,  # stop here with a checkpoint, as a preemption would; 0: run to num_steps.
      global_batch_size=32,
      microbatches=1,  # gradient accumulation: the batch is split into this many.
      log_every=50,
      eval_every=200,  # 0: only at the end.
      eval_batches=20,  # 0: the whole validation split.
      checkpoint_every=500,
      keep_checkpoints=3,  # the last K checkpoints are kept...
      keep_checkpoints_every=0,  # ...and, beyond them, every step divisible by this (0: none).
      # Early stopping on an evaluated metric: "" (off), "eval_loss", or any value the evaluation
      # logs ("eval_loss/NAME" for source NAME of several, "eval_accuracy", "eval_bits_per_byte").
      early_stopping_metric="",
      early_stopping_mode="auto",  # min | max | auto (max for an accuracy, else min).
      early_stopping_patience=5,  # stop after this many evaluations without improvement (0: never stop).
      early_stopping_min_delta=0.0,  # an improvement must beat the best by more than this to count.
      keep_best_checkpoint=True,  # with early_stopping_metric: the best step's state in WORKDIR/best/,
      # a checkpoint directory of its own that retention (keep_checkpoints) never deletes.
      num_samples=3,  # text samples printed at the end.
      sample_length=200,
      sample_temperature=0.8,
      sample_prompt="",
      plot_curves=True,  # a finished run draws its loss, eval loss and learning rate into WORKDIR/curves.png.
      # "N-M": a JAX profiler trace of steps N to M (inclusive) in WORKDIR/profile, for TensorBoard's
      # profile plugin or Perfetto; "" traces nothing.
      profile_steps="",
      # Regularisers of the trained loss (evaluation reports the plain cross-entropy); 0: off.
      z_loss=0.0,  # PaLM's z-loss: this times log(Z)^2 per target token keeps the softmax normaliser near 1.
      label_smoothing=0.0,  # the target's probability mass spread evenly over the vocabulary (0 <= s < 1).
      # Divergence guards (training/guards.py): an update that makes the loss, gradient norm or a
      # parameter non-finite is always skipped; then "stop" ends the run naming the quantity and
      # the step (the last checkpoint stays), "skip" counts it (skipped_steps) and goes on.
      on_nonfinite="stop",
      spike_factor=0.0,  # skip the update of a loss above this times the running median (0: off; > 1).
      spike_window=100,  # the running median's window: the last this many finite losses (in the state).
    )
  )
  return config
