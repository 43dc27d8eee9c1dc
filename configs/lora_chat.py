"""LoRA fine-tuning of an imported Llama-style chat model on chat JSONL (SmolLM2-360M-Instruct by default).

Import the model once (tools/hf_import.py writes a loom checkpoint, its config.py and the tokenizer.json),
then train rank-16 adapters on every attention and MLP kernel of the frozen bfloat16 base, on your
conversations: one {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]} per
line, rendered with ChatML, the loss on the assistant turns alone.

  python tools/hf_import.py --hf_dir=/models/SmolLM2-360M-Instruct --output=workdirs/smollm2_360m_instruct
  python train.py --config=configs/lora_chat.py --workdir=workdirs/lora_chat \\
      --config.data.sources.chat.paths='/data/chat/*.jsonl'
  python tools/generate.py --checkpoint=workdirs/lora_chat --chat --prompt="What is LoRA?"
  python tools/lora.py merge --checkpoint=workdirs/lora_chat --output=workdirs/lora_chat_merged

Another imported model: name its tools/hf_import.py output after the config file, and its model,
tokenizer and checkpoint are taken from the config.py there (the shapes must be the checkpoint's):

  python train.py --config=configs/lora_chat.py:/models/qwen2.5-0.5b-loom --workdir=/runs/lora_qwen \\
      --config.data.sources.chat.paths='/data/chat/*.jsonl'

The paths below are placeholders until the commands above have made them: the chat data
(CHAT_DATA, to replace with --config.data.sources.chat.paths=...), the import (init.checkpoint,
--config.init.checkpoint=...) and its tokenizer (--config.data.tokenizer_path=...). A missing one stops
the run before anything is built, naming the field and the path it looked for.
configs/qlora_chat.py is this config with an NF4-quantized base (QLoRA).
"""

import importlib.util
import os

from configs import base

# Where the first command above writes SmolLM2-360M-Instruct as a loom checkpoint.
IMPORTED = "workdirs/smollm2_360m_instruct"
# Placeholder: your chat JSONL files (comma-separated globs).
CHAT_DATA = "your_chat_data/*.jsonl"

# SmolLM2-360M-Instruct's config.json as tools/hf_import.py maps it (model/huggingface.py): a Llama
# architecture (RMSNorm, RoPE, SwiGLU, grouped-query attention 15/5) with tied embeddings.
SMOLLM2_360M = dict(
  vocab_size=49152,
  num_layers=32,
  embed_dim=960,
  num_heads=15,
  num_kv_heads=5,
  head_dim=64,
  mlp_dim=2560,
  max_seq_len=8192,
  norm="rmsnorm",
  norm_eps=1e-5,
  position="rope",
  rope_theta=100000.0,
  mlp="swiglu",
  gelu_approximate=False,
  tie_embeddings=True,
  use_bias=False,
  qkv_bias=False,
)


def imported_config(directory: str):
  """The config tools/hf_import.py wrote into `directory` (its config.py's get_config())."""
  path = os.path.join(directory, "config.py")
  if not os.path.isfile(path):
    raise ValueError(
      f"--config=...:{directory}: there is no {path}; import the model there first "
      f"(python tools/hf_import.py --hf_dir=HF_MODEL_DIR --output={directory})"
    )
  spec = importlib.util.spec_from_file_location("loom_imported_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config(imported: str = ""):
  """`imported`: a tools/hf_import.py output directory to take the model, tokenizer and init.checkpoint
  from ("": SmolLM2-360M-Instruct's, imported into IMPORTED)."""
  config = base.get_config()
  if imported:
    source = imported_config(imported)
    config.model.update(**source.model.to_dict())
    config.data.update(tokenizer=source.data.tokenizer, tokenizer_path=source.data.tokenizer_path)
    config.init.checkpoint = source.init.checkpoint
  else:
    config.model.update(**SMOLLM2_360M)
    config.data.update(tokenizer="huggingface", tokenizer_path=os.path.join(IMPORTED, "tokenizer.json"))
    config.init.checkpoint = IMPORTED
  # bfloat16 compute; the output projection's float32 logits (vocabulary 49152) 512 positions at a time.
  config.model.update(dtype="bfloat16", remat="dots", loss_chunk=512, dropout_rate=0.0)
  config.data.sources = {"chat": base.source(kind="chat", paths=CHAT_DATA)}
  config.data.update(seq_len=min(2048, config.model.max_seq_len), chat_template="chatml", chat_loss_on="assistant")
  config.lora.update(
    rank=16,
    alpha=32.0,
    dropout=0.05,
    targets="blocks/attn/(wq|wk|wv|wo)|blocks/mlp/(w_up|w_gate|w_down)",
    # None trained in full: SmolLM2-Instruct's vocabulary has trained ChatML markers already. A base
    # whose tokenizer gained them (a pre-trained, not instruct, model): "embed" (tied, as here; adds
    # vocab_size * embed_dim trained parameters, 47M for SmolLM2-360M) or "embed|head" (untied).
    train_full="",
    base_dtype="bfloat16",
    base_quantization="none",
  )
  # The adapters alone train: a modest peak (LoRA's usual 2e-4) and no weight decay pulling them to 0.
  config.optimizer.update(learning_rate=2e-4, weight_decay=0.0, warmup_steps=50, min_lr_ratio=0.1)
  config.train.update(
    num_steps=1000,
    global_batch_size=16,
    log_every=10,
    eval_every=100,
    eval_batches=20,
    checkpoint_every=200,
    num_samples=0,  # Sample the chat model with tools/generate.py --chat instead.
  )
  return config
