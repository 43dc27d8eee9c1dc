"""Task metrics of a loom checkpoint: a JSONL task file, or lm-evaluation-harness tasks.

  python tools/evaluate_tasks.py --checkpoint=/runs/tiny --task=evaluation/examples/choice.jsonl --kind=choice
  python tools/evaluate_tasks.py --checkpoint=/runs/tiny --task=evaluation/examples/qa.jsonl --kind=qa
  python tools/evaluate_tasks.py --checkpoint=/runs/tiny --task=translations.jsonl --kind=translation
  python tools/evaluate_tasks.py --checkpoint=/runs/tiny --lm_eval=hellaswag,arc_easy --limit=200
  python tools/evaluate_tasks.py --checkpoint=/runs/tiny --lm_eval=my_task --include_path=my_tasks/

--kind: translation (BLEU, chrF), qa (exact match, token F1) or choice (accuracy by log-likelihood,
raw and per byte / per token); evaluation/tasks.py describes the JSONL fields and
evaluation/examples/ has one file of each. Generation is greedy, up to --max_new_tokens or the
first --stop string. --lm_eval runs lm_eval's tasks (evaluation/requirements.txt installs it), or
the YAML tasks under --include_path. The task file, or lm_eval's presence, is checked before the
model is loaded. --output=FILE.jsonl keeps every example with what the model answered.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402

from training.cli import check_output_path, define_config_flag, parse_flags  # noqa: E402

_CONFIG = define_config_flag(None, "A .py config (default: the checkpoint's own); its model must be the checkpoint's.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A loom workdir, its checkpoints/ directory or checkpoints/STEP.")
_TASK = flags.DEFINE_string("task", "", "A JSONL task file (evaluation/tasks.py).")
_KIND = flags.DEFINE_enum("kind", None, ["translation", "qa", "choice"], "What --task holds.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 32, "Generated tokens per answer at most.")
_STOP = flags.DEFINE_multi_string("stop", ["\n"], "Generation ends at this string (repeatable).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 0, "Rows per batch (0: the config's train.global_batch_size).")
_LM_EVAL = flags.DEFINE_string("lm_eval", "", "Comma-separated lm-evaluation-harness task names.")
_INCLUDE_PATH = flags.DEFINE_string("include_path", None, "A directory of lm_eval YAML tasks.")
_LIMIT = flags.DEFINE_float("limit", None, "lm_eval: examples per task (under 1: a share of them).")
_NUM_FEWSHOT = flags.DEFINE_integer("num_fewshot", None, "lm_eval: few-shot examples (default: the task's).")
_OUTPUT = flags.DEFINE_string("output", "", "--task: a .jsonl file of every example and the model's answer.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if bool(_TASK.value) == bool(_LM_EVAL.value):
    raise SystemExit("evaluate_tasks: pass exactly one of --task (with --kind) and --lm_eval")
  if _TASK.value and not _KIND.value:
    raise SystemExit("evaluate_tasks: --task needs --kind (translation, qa or choice)")
  output = check_output_path(_OUTPUT.value, "--output", "file") if _OUTPUT.value else ""
  from evaluation import loading, tasks

  try:
    info = loading.checkpoint_config(_CHECKPOINT.value, _CONFIG.value)
    if _BATCH_SIZE.value:
      info.config.train.global_batch_size = _BATCH_SIZE.value
    if _TASK.value:
      examples = tasks.read_task(_TASK.value, _KIND.value)
      if _KIND.value == "translation":
        _require("sacrebleu", "BLEU and chrF")
    else:
      _require("lm_eval", "--lm_eval")
    tokenizer = loading.load_tokenizer(info)
    model = loading.load_model(info, tokenizer)
    if _TASK.value:
      results, answers = tasks.evaluate_task(
        model, examples, _KIND.value, max_new_tokens=_MAX_NEW_TOKENS.value, stops=_STOP.value
      )
    else:
      from evaluation import harness

      lm = harness.LoomLM(model=model)
      names = [name.strip() for name in _LM_EVAL.value.split(",") if name.strip()]
      limit = _LIMIT.value if _LIMIT.value is None or _LIMIT.value < 1 else int(_LIMIT.value)
      results = harness.run_harness(
        lm, names, include_path=_INCLUDE_PATH.value, limit=limit, num_fewshot=_NUM_FEWSHOT.value
      )
      answers = []
  except ValueError as e:
    raise SystemExit(f"evaluate_tasks: {e}") from None
  print(json.dumps(results, indent=2, default=str))
  if output:
    with open(output, "w", encoding="utf-8") as f:
      for answer in answers:
        f.write(json.dumps(answer, ensure_ascii=False) + "\n")


def _require(module: str, what: str) -> None:
  try:
    __import__(module)
  except ImportError:
    raise SystemExit(
      f"evaluate_tasks: {what} needs the {module} package: pip install -r evaluation/requirements.txt"
    ) from None


if __name__ == "__main__":
  flags.mark_flags_as_required(["checkpoint"])
  app.run(main, flags_parser=parse_flags)
