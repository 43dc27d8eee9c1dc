"""Llama 3 8B on one node of 8 NVIDIA H100 (80 GB) GPUs, fully sharded (fsdp over the 8 GPUs).

512K tokens a step (64 x 8192), cuDNN flash attention (model.attention=auto picks it on GPUs).
Without a GPU attached, tools/plan.py --topology=h100-8 estimates its memory from the model.
"""

from configs import llama3_8b

SLICES = ("h100-8",)


def get_config(slice_name: str = "h100-8"):
  del slice_name
  config = llama3_8b.get_config("v5p-64")
  config.model.update(remat="full", loss_chunk=1024)
  config.train.update(global_batch_size=64, microbatches=2)  # Half the estimated memory: margin for an estimate.
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  return config
