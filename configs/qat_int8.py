"""The quickstart model trained quantization-aware for int8 weights.

Every forward pass of training and evaluation sees the attention and MLP kernels rounded to int8 (one
absmax scale per output channel; the gradient passes straight through the rounding), so the weights
learn to work as int8 and the quantized model evaluates as the trained one did:

  python train.py --config=configs/qat_int8.py --workdir=workdirs/qat_int8
  python tools/evaluate.py --checkpoint=workdirs/qat_int8 --quantize=int8       # int8 storage: same loss

Or quantization-aware fine-tuning of a trained run (a re-warmup to the same peak, then a short decay):

  python train.py --config=configs/qat_int8.py --workdir=workdirs/qat_int8_ft \\
      --config.init.checkpoint=workdirs/quickstart --config.train.num_steps=200 --config.optimizer.warmup_steps=20 \\
      --config.data.tokenizer_path=workdirs/quickstart/tokenizer/sp.model     # that run's tokenizer, not a new one

--config.quantization.qat=int4 or nf4 (groups of quantization.block=64 inputs) trains for 4-bit weights.
Without any training, post-training quantization applies to any checkpoint (a run, a LoRA run, an
import): python tools/evaluate.py --checkpoint=workdirs/quickstart --quantize=int8 (or int4, nf4);
benchmarks/finetune.py measures what each costs in perplexity on the quickstart model.
"""

from configs import quickstart


def get_config():
  config = quickstart.get_config()
  config.quantization.update(qat="int8", block=64)
  return config
