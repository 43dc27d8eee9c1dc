"""A 2-layer student distilled from the trained quickstart model: its softened next-token distributions.

The student (2 layers of 96, 0.43M parameters against the teacher's 1.07M) reads the same data with the
teacher's tokenizer, which distillation needs (the two distributions are compared token by token), and
learns alpha * T^2 * KL(teacher || student) at temperature T, plus (1 - alpha) * the cross-entropy:

  python train.py --config=configs/quickstart.py --workdir=workdirs/quickstart          # the teacher
  python train.py --config=configs/distill_quickstart.py --workdir=workdirs/distill_quickstart
  python train.py --config=configs/distill_quickstart.py --workdir=workdirs/student_scratch \\
      --config.distillation.teacher=''                                                # the same student alone
  python tools/compare.py workdirs/distill_quickstart workdirs/student_scratch

The teacher is the quickstart's workdir and the tokenizer the one it trained and cached there
(TEACHER/tokenizer/sp.model); --config.distillation.teacher=... and --config.data.tokenizer_path=... for
another run. A missing teacher stops the run before anything is built, naming the field.
benchmarks/finetune.py measures the distilled student against the one trained alone.
"""

from configs import quickstart

# The teacher: the quickstart's workdir (README's first command), and the tokenizer cached in it.
TEACHER = "workdirs/quickstart"
TEACHER_TOKENIZER = f"{TEACHER}/tokenizer/sp.model"


def get_config():
  config = quickstart.get_config()
  config.model.update(num_layers=2, embed_dim=96, num_heads=4, mlp_dim=384)
  config.data.tokenizer_path = TEACHER_TOKENIZER
  config.distillation.update(teacher=TEACHER, step=-1, temperature=2.0, alpha=0.5)
  return config
