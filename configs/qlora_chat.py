"""QLoRA: configs/lora_chat.py with the frozen base's block kernels stored in 4-bit NormalFloat.

The attention and MLP kernels of the imported model are quantized to NF4 (one absmax scale per 64
input rows) when the run starts, the rest of the base kept in bfloat16, and dequantized a layer at a
time inside the step; the rank-16 adapters train in float32 beside them (Dettmers et al. 2023).

  python tools/hf_import.py --hf_dir=/models/SmolLM2-360M-Instruct --output=workdirs/smollm2_360m_instruct
  python train.py --config=configs/qlora_chat.py --workdir=workdirs/qlora_chat \\
      --config.data.sources.chat.paths='/data/chat/*.jsonl'
  python train.py --config=configs/qlora_chat.py:/models/qwen2.5-0.5b-loom --workdir=/runs/qlora_qwen \\
      --config.data.sources.chat.paths='/data/chat/*.jsonl'        # another imported model

Placeholders and their fields: as in configs/lora_chat.py.
"""

from configs import lora_chat


def get_config(imported: str = ""):
  config = lora_chat.get_config(imported)
  config.lora.update(base_quantization="nf4", quantization_block=64)
  return config
